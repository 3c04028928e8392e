"""MLflow tracking from global rank 0 that never stalls or kills training.

Calls go through a background thread in order; when the tracking server is unreachable they are
kept and retried with backoff, so a server outage delays metrics instead of losing them. A call
that keeps failing while the server answers (an artifact store this node cannot write, a rejected
value) is dropped with a warning after 5 tries (about 30 s of backoff), so it cannot hold back
the calls behind it. A server that does not answer at start delays the run itself the same way:
it is opened (or reopened) once the server answers, and the calls queued meanwhile follow. The
run carries a token tag of its tracker, so a retried create whose first reply was lost finds the
run it made instead of leaving it RUNNING beside a second one. The token goes into checkpoints
with the run id: a run that opened only after the last checkpoint (a server that came back at the
end) is still found and continued by the resume.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
OPEN_TOKEN_TAG = "mdlm_tracker_token"


def default_tracking_uri(run_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def sqlite_artifact_dir(uri: str) -> Path | None:
    """Where a new experiment of a sqlite store keeps its artifacts: mlartifacts/ beside the
    database (a store shared by several run_dirs must not keep them in the first run's folder)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).parent / "mlartifacts"


class Tracker:
    def __init__(self, uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                 run_token: str | None = None, artifact_dir: str | Path | None = None, max_pending: int = 100_000,
                 retry_wait_s: float = 2.0, max_wait_s: float = 60.0, system_metrics: bool = False,
                 system_metrics_interval_s: float = 10.0, start_step: int = 0, max_tries: int = 5):
        # MLflow's own HTTP retries would block for minutes per call during an outage; this
        # class retries itself, off the training thread.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow

        self.mlflow = mlflow
        self.uri = uri
        self.client = mlflow.tracking.MlflowClient(uri)
        self.experiment, self.run_name, self.artifact_dir = experiment, run_name, artifact_dir
        self.resume_id = run_id
        self.run_id: str | None = None    # once the run is open in the store
        self.new_run: bool | None = None  # False when the checkpoint's run was reopened
        self.max_pending = max_pending
        self.retry_wait_s, self.max_wait_s = retry_wait_s, max_wait_s
        self.failures = 0      # calls that failed at least once
        self.dropped = 0       # calls dropped because the queue overflowed
        self.rejected = 0      # calls dropped after max_tries failures while the server answered
        self.max_tries = max_tries
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._disabled = False
        # tags the run this tracker creates: a create_run whose reply was lost (the server wrote
        # the run, then the connection failed) is found on the retry instead of made twice; a
        # checkpoint's token finds the run an earlier process opened after that checkpoint
        self.run_token, self._inherited_token = run_token or uuid.uuid4().hex, run_token is not None
        self._create_tried = False
        try:
            try:
                self._open()
            except Exception:
                if not self._server_answers():
                    raise
                self._open()  # once more: a lost reply is found by its token, a refusal raises again
        except Exception as err:
            if self._server_answers():  # the store answers and refuses: a setup error, raised as such
                raise
            # an unreachable server at start delays the run, as an outage later delays metrics
            log.warning("MLflow at %s does not answer (%s): training goes on; the run is opened and every "
                        "queued call delivered once it answers", uri, _reason(err))
            self._queue.append(("open the run", self._open, (), {}))
        self._worker = threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True)
        self._worker.start()
        self.last_step = start_step  # a resumed run's system metrics go on at its step, not at 0
        self.system = SystemMetrics(self, system_metrics_interval_s) if system_metrics else None

    def _open(self) -> None:
        """Reopen the checkpoint's run, or create a new one (and its experiment)."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking.context.registry import resolve_tags

        if self.resume_id:
            try:
                usable = self.client.get_run(self.resume_id).info.lifecycle_stage != "deleted"
            except MlflowException as err:  # unreachable servers raise other errors: retried then
                if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise
                usable = False
            if usable:
                self.client.update_run(self.resume_id, status="RUNNING")
                self.run_id, self.new_run = self.resume_id, False
                return
            log.warning("MLflow run %s of the checkpoint is not in %s (tracked elsewhere before, or "
                        "deleted): this run continues in a new MLflow run", self.resume_id, self.uri)
            self.resume_id = None
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            # A new experiment on a local store keeps its artifacts next to the store, not in
            # ./mlruns of whatever directory the job happened to start in.
            location = Path(self.artifact_dir).resolve().as_uri() if self.artifact_dir else None
            try:
                experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException as err:  # another job created it in the meantime
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        if self._create_tried or self._inherited_token:
            made = self.client.search_runs([experiment_id], f"tags.{OPEN_TOKEN_TAG} = '{self.run_token}'",
                                           max_results=1)
            if made and not self._create_tried:  # made by an earlier process of this training
                self.client.update_run(made[0].info.run_id, status="RUNNING")
                self.run_id, self.new_run = made[0].info.run_id, False
                return
            if made:
                self.run_id, self.new_run = made[0].info.run_id, True
                return
        self._create_tried = True
        run = self.client.create_run(experiment_id, tags={**resolve_tags(), OPEN_TOKEN_TAG: self.run_token},
                                     run_name=self.run_name or None)
        self.run_id, self.new_run = run.info.run_id, True

    # ---- background delivery -------------------------------------------------------------
    def _submit(self, what: str, fn, *args, **kwargs) -> None:
        with self._cond:
            if self._disabled:
                return
            if len(self._queue) >= self.max_pending:
                # the oldest metrics after the head (the worker may be delivering the head right
                # now): metrics.jsonl keeps them and a resume sends them; params, artifacts and
                # tags have no second copy
                victim = next((i for i in range(1, len(self._queue)) if self._queue[i][0] == "log_metrics"),
                              1 if len(self._queue) > 1 else 0)
                del self._queue[victim]
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("MLflow queue full (%d calls): dropping the oldest metrics (metrics.jsonl in the "
                                "run_dir keeps them)", self.max_pending)
            self._queue.append((what, fn, args, kwargs))
            self._cond.notify()

    _bare_run: bool | None = None

    def _on_run(self, fn, *args, new_run_only: bool = False, **kwargs) -> None:
        """fn(run_id, ...), with the run id known when the call is delivered (the run may open late).
        `new_run_only` calls (the config's params and artifacts) go to a new run, and to a reopened
        one that never got its params (an earlier process died with them queued)."""
        if new_run_only and not self.new_run:
            if self._bare_run is None:
                self._bare_run = not self.client.get_run(self.run_id).data.params
            if not self._bare_run:
                return
        fn(self.run_id, *args, **kwargs)

    def _server_answers(self) -> bool:
        try:
            if self.run_id:
                self.client.get_run(self.run_id)
            else:
                self.client.search_experiments(max_results=1)
            return True
        except Exception:
            return False

    def _drain(self) -> None:
        wait = self.retry_wait_s
        tries = 0  # failures of the call at the head while the server answered
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue and self._closing:
                    return
                what, fn, args, kwargs = self._queue[0]
            try:
                fn(*args, **kwargs)
            except Exception as err:
                self.failures += 1
                reason = _reason(err)
                if self._server_answers():
                    tries += 1
                    if tries >= self.max_tries:  # the call itself fails, not the server: let the rest through
                        self.rejected += 1
                        tries, wait = 0, self.retry_wait_s
                        with self._cond:
                            self._queue.popleft()
                            if self.run_id is None:  # no run to log to: tracking stops here
                                self.rejected += len(self._queue)
                                self._queue.clear()
                                self._disabled = True
                            self._cond.notify_all()
                        log.warning("MLflow %s failed %d times while %s answers (%s): dropped; %s", what,
                                    self.max_tries, self.uri, reason,
                                    "no tracking for this run" if self._disabled else "later tracking calls go on")
                        continue
                # the server is down or slow, or the call may succeed on a retry: keep it
                log.warning("MLflow %s failed (%s); retrying in %.0fs, training continues", what, reason, wait)
                with self._cond:
                    if self._closing and self._deadline is not None and time.time() > self._deadline:
                        return
                time.sleep(wait)
                wait = min(wait * 2, self.max_wait_s)
                continue
            wait, tries = self.retry_wait_s, 0
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closing

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until every queued call is delivered (True) or the timeout passes (False)."""
        deadline = time.time() + timeout_s
        with self._cond:
            while self._queue and time.time() < deadline:
                self._cond.wait(timeout=min(1.0, deadline - time.time()))
            return not self._queue

    # ---- the API the trainer uses ------------------------------------------------------
    def log_params(self, params: dict, new_run_only: bool = False) -> None:
        """new_run_only: logged only if the run was created here, not reopened from a checkpoint."""
        clean = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in clean.items()]
        for i in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
            self._submit("log_params", self._on_run, self.client.log_batch, params=items[i:i + 100],
                         new_run_only=new_run_only)

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.last_step = max(self.last_step, step)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._submit("log_metrics", self._on_run, self.client.log_batch, metrics=items)

    def backfill(self, rows: dict[int, dict]) -> None:
        """Log the metrics of rows ({step: {name: value}}) that the run lacks, once it is open: what
        an earlier process of this training still held in its queue when it died (a tracking
        outage). The run's histories are read at delivery, so a retry adds nothing twice."""
        from mlflow.entities import Metric

        def deliver() -> None:
            names = sorted({k for row in rows.values() for k in row})
            have = {k: {m.step for m in self.client.get_metric_history(self.run_id, k)} for k in names}
            now = int(time.time() * 1000)
            missing = [Metric(k, float(v), now, step) for step, row in sorted(rows.items())
                       for k, v in row.items() if step not in have[k]]
            for i in range(0, len(missing), 1000):  # the REST API takes at most 1000 metrics per batch
                self.client.log_batch(self.run_id, metrics=missing[i:i + 1000])
            if missing:
                log.info("MLflow run %s lacked %d metric value(s) of steps %d..%d: sent from metrics.jsonl",
                         self.run_id, len(missing), missing[0].step, missing[-1].step)

        self._submit("backfill metrics", deliver)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, new_run_only: bool = False) -> None:
        self._submit("log_artifact", self._on_run, self.client.log_artifact, str(path), artifact_path,
                     new_run_only=new_run_only)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self._submit("set_tag", self._on_run, self.client.set_tag, key, str(value))

    _deadline: float | None = None

    def end(self, status: str = "FINISHED", timeout_s: float = 120.0) -> bool:
        """Deliver what is queued (up to timeout_s), then close the run. False if calls were lost."""
        if self.system is not None:
            self.system.stop()
        self._submit("set_terminated", self._on_run, self.client.set_terminated, status)
        delivered = self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._deadline = time.time()
            self._cond.notify_all()
        if not delivered:
            log.warning("MLflow: %d tracking calls could not be delivered to %s", len(self._queue), self.uri)
        return delivered and self.dropped == 0 and self.rejected == 0 and not self._disabled


def _reason(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


class SystemMetrics:
    """This node's CPU and memory, and each GPU's utilisation, memory and power (NVML), every
    `interval_s`, under MLflow's `system/` names and at the latest training step. They go through
    the tracker's queue: MLflow's own monitor thread stops for good at the first failed call."""

    def __init__(self, tracker: Tracker, interval_s: float):
        import psutil

        self.psutil, self.tracker, self.interval_s = psutil, tracker, interval_s
        self.gpus = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no NVIDIA driver (CPU box) or no nvidia-ml-py: CPU and memory only
            self.nvml = None
        psutil.cpu_percent()  # the first call only starts the measurement interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)
        self._thread.start()

    def sample(self) -> dict:
        memory = self.psutil.virtual_memory()
        out = {"system/cpu_utilization_percentage": self.psutil.cpu_percent(),
               "system/system_memory_usage_megabytes": memory.used / 2**20,
               "system/system_memory_usage_percentage": memory.percent}
        for i, handle in enumerate(self.gpus):
            try:
                gpu_memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                out[f"system/gpu_{i}_utilization_percentage"] = self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                out[f"system/gpu_{i}_memory_usage_megabytes"] = gpu_memory.used / 2**20
                out[f"system/gpu_{i}_memory_usage_percentage"] = 100.0 * gpu_memory.used / gpu_memory.total
                out[f"system/gpu_{i}_power_usage_watts"] = self.nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            except Exception as err:  # a GPU that stops answering must not stop the sampler
                log.debug("NVML query for GPU %d failed: %s", i, err)
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tracker.log_metrics(self.sample(), self.tracker.last_step)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
