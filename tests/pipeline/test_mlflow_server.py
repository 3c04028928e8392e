"""Tracking to a real `mlflow server` on 127.0.0.1, including the server going down mid-run."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import free_port, run_single
from .test_fault_tolerance import start_training, wait_for_line


class MlflowServer:
    def __init__(self, store: Path, port: int):
        self.store, self.port, self.proc = store, port, None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        self.proc = subprocess.Popen(
            [exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.store}/mlflow.db",
             "--artifacts-destination", str(self.store / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError("mlflow server did not become healthy")

    def stop(self) -> None:
        # SIGKILL to the whole group: after SIGTERM the server's worker kept answering on open
        # keep-alive connections, so the "outage" sometimes began only after training ended.
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    time.sleep(0.2)
            except OSError:
                return
        raise AssertionError(f"mlflow server on port {self.port} still accepts connections")


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "store", free_port())
    (tmp_path / "store").mkdir()
    srv.start()
    yield srv
    srv.stop()


def test_training_survives_a_server_outage_and_delivers_every_metric(markov_data, tmp_path, server):
    run_dir = tmp_path / "run"
    # Enough steps after the outage begins that metrics are certainly logged into it.
    proc = start_training(run_dir, markov_data, "train.max_steps=200", "train.log_every=1",
                          "train.checkpoint_every=0", "eval.max_batches=1", mlflow_uri=server.uri)
    wait_for_line(proc, "step 5/200")
    server.stop()
    # whichever call heads the queue when the server dies reports the outage (under load it can
    # still be one of the start-up artifacts, with every later metric queued behind it)
    lines = wait_for_line(proc, "; retrying in")
    time.sleep(3)
    server.start()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(lines) + out
    client = MlflowClient(server.uri)
    run = client.search_runs(client.get_experiment_by_name("mdlm-pretrain").experiment_id)[0]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, 201))  # nothing lost during the outage
    assert "eval/ppl_bound" in run.data.metrics
    assert run.data.params["train.max_steps"] == "200"
    assert run.info.status == "FINISHED"
    assert "samples" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_server_down_at_start_gets_the_whole_run_once_it_answers(markov_data, tmp_path):
    """The tracking server is down while the whole training runs (restarting, say): training goes
    on, and once the server answers, after the last checkpoint, the run is created with its params
    and every metric since step 1. That checkpoint never knew the run's id: a resume still finds
    the run by its token and continues it, instead of starting a second one."""
    srv = MlflowServer(tmp_path / "store", free_port())
    (tmp_path / "store").mkdir()
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, markov_data, "train.max_steps=60", "train.log_every=1",
                          "train.checkpoint_every=0", "eval.max_batches=1", mlflow_uri=srv.uri)
    try:
        lines = wait_for_line(proc, "does not answer")
        lines += wait_for_line(proc, "checkpoint saved")  # all 60 steps trained without the server
        srv.start()
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, "".join(lines) + out
        resumed = start_training(run_dir, markov_data, "train.max_steps=70", "train.log_every=1",
                                 "train.checkpoint_every=0", "eval.max_batches=1", "--resume", "auto",
                                 mlflow_uri=srv.uri)
        out, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, out
        client = MlflowClient(srv.uri)
        runs = client.search_runs(client.get_experiment_by_name("mdlm-pretrain").experiment_id)
        assert len(runs) == 1, [r.info.run_id for r in runs]
        run = runs[0]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(1, 71))
        assert run.data.params["train.max_steps"] == "60" and run.info.status == "FINISHED"
        assert {"config.yaml", "manifest.json", "samples"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        proc.kill()
        srv.stop()


def test_metrics_an_outage_held_back_from_a_killed_process_reach_the_run_on_resume(markov_data, tmp_path):
    """The server is down, a checkpoint is saved, and the process is killed with its queue: the
    resume sends the run what it lacks up to the checkpoint, from metrics.jsonl, once each."""
    srv = MlflowServer(tmp_path / "store", free_port())
    (tmp_path / "store").mkdir()
    run_dir = tmp_path / "run"
    args = ("train.log_every=1", "train.checkpoint_every=10", "eval.max_batches=1", "sample.num_samples=1",
            "sample.steps=4")
    proc = start_training(run_dir, markov_data, "train.max_steps=100000", *args, mlflow_uri=srv.uri)
    try:
        wait_for_line(proc, "does not answer")
        wait_for_line(proc, "checkpoint saved")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        srv.start()
        resumed = start_training(run_dir, markov_data, "train.max_steps=20", *args, "--resume", "auto",
                                 mlflow_uri=srv.uri)
        out, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, out
        client = MlflowClient(srv.uri)
        [run] = client.search_runs(client.get_experiment_by_name("mdlm-pretrain").experiment_id)
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(1, 21)), steps
        assert "lacked" in out and "sent from metrics.jsonl" in out
        assert run.info.status == "FINISHED"
    finally:
        proc.kill()
        srv.stop()


def test_a_server_that_never_answers_costs_training_nothing(tmp_path, in_process_mlflow):
    from pipeline.tracking import Tracker

    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "exp", retry_wait_s=0.05, max_wait_s=0.1)
    assert tracker.run_id is None  # not opened, not raised
    start = time.time()
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 1.0}, step)
    tracker.log_params({"a": 1}, new_run_only=True)
    assert time.time() - start < 1.0  # queued, not sent from the training thread
    assert tracker.end(timeout_s=2) is False  # undelivered, and said so
    assert time.time() - start < 20


def test_a_full_queue_drops_metrics_never_the_runs_params_and_artifacts(tmp_path, in_process_mlflow):
    """The server is down at start and the queue overflows: the oldest metrics go (metrics.jsonl
    keeps them), the params and the config artifact queued before them reach the run."""
    from pipeline.tracking import Tracker

    srv = MlflowServer(tmp_path / "store", free_port())
    (tmp_path / "store").mkdir()
    (tmp_path / "config.yaml").write_text("a: 1\n")
    tracker = Tracker(srv.uri, "exp", max_pending=20, retry_wait_s=0.05, max_wait_s=0.2)
    try:
        tracker.log_params({"train.max_steps": 60}, new_run_only=True)
        tracker.log_artifact(tmp_path / "config.yaml", new_run_only=True)
        for step in range(1, 41):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        assert tracker.dropped == 40 + 3 - 20  # open, params, artifact and 40 metrics into 20 places
        srv.start()
        assert tracker.flush(120)
        client = MlflowClient(srv.uri)
        assert client.get_run(tracker.run_id).data.params == {"train.max_steps": "60"}
        assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["config.yaml"]
        history = client.get_metric_history(tracker.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(24, 41))
    finally:
        tracker.end(timeout_s=30)
        srv.stop()


def test_a_sqlite_store_keeps_artifacts_beside_its_database(tmp_path):
    from pipeline.tracking import sqlite_artifact_dir

    assert sqlite_artifact_dir(f"sqlite:///{tmp_path}/shared/mlflow.db") == tmp_path / "shared" / "mlartifacts"
    assert sqlite_artifact_dir("sqlite:///mlflow.db") == Path("mlartifacts")
    assert sqlite_artifact_dir("http://127.0.0.1:5000") is None


def test_system_metrics_reach_the_run(markov_data, tmp_path):
    """MLflow's system metrics (CPU, memory; GPU through NVML where there is one) in the same run."""
    run_single(tmp_path, markov_data, "train.max_steps=120", "train.checkpoint_every=0", "eval.max_batches=1",
               "tracking.system_metrics_interval_s=0.5")
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    run = client.search_runs(client.get_experiment_by_name("mdlm-pretrain").experiment_id)[0]
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0.0 <= m.value <= 100.0 * (os.cpu_count() or 1) for m in cpu)
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert run.data.params["tracking.system_metrics"] == "True"


def test_system_sampler_reports_cpu_and_memory_through_the_tracker_queue():
    from pipeline.tracking import SystemMetrics

    class Recorder:  # stands in for the Tracker: only the queue entry point is used
        last_step = 7

        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step):
            self.calls.append((step, metrics))

    recorder = Recorder()
    sampler = SystemMetrics(recorder, 0.1)
    time.sleep(0.5)
    sampler.stop()
    assert len(recorder.calls) >= 2 and all(step == 7 for step, _ in recorder.calls)
    metrics = recorder.calls[-1][1]
    assert 0.0 <= metrics["system/cpu_utilization_percentage"] <= 100.0
    assert 0.0 < metrics["system/system_memory_usage_percentage"] < 100.0
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_a_call_that_keeps_failing_while_the_store_answers_is_dropped_not_retried_forever(tmp_path, in_process_mlflow):
    """An artifact store this node cannot write (missing credentials, a wrong root) must not hold
    back every metric queued behind the run's first artifact."""
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    (tmp_path / "blocker").write_text("a file where the artifact folder should be")
    MlflowClient(uri).create_experiment("exp", artifact_location=(tmp_path / "blocker" / "artifacts").as_uri())
    (tmp_path / "config.yaml").write_text("a: 1\n")
    tracker = Tracker(uri, "exp", retry_wait_s=0.05, max_wait_s=0.1, start_step=40, max_tries=3)
    assert tracker.last_step == 40  # a resumed run's system metrics go on at its step
    try:
        tracker.log_artifact(tmp_path / "config.yaml")
        for step in range(41, 51):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        assert tracker.flush(60)
        assert tracker.rejected == 1 and tracker.failures == tracker.max_tries == 3
    finally:
        delivered = tracker.end(timeout_s=30)
    assert not delivered  # end() reports that a call was lost
    history = MlflowClient(uri).get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(41, 51))


def test_a_resume_whose_mlflow_run_is_not_in_this_store_starts_a_new_run(tmp_path, caplog, in_process_mlflow):
    """A checkpoint carries its MLflow run id; resumed against another store (a server instead of
    the run dir's sqlite, say) or after its run was deleted, training goes on tracked in a new
    MLflow run, not untracked."""
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    client = MlflowClient(uri)
    deleted = client.create_run(client.create_experiment("old")).info.run_id
    client.delete_run(deleted)
    for stale in ("0123456789abcdef0123456789abcdef", deleted, "not-an-id"):
        tracker = Tracker(uri, "exp", run_id=stale)
        try:
            tracker.log_metrics({"train/loss": 1.0}, 7)
            assert tracker.flush(30)
        finally:
            tracker.end(timeout_s=30)
        assert tracker.run_id != stale and f"MLflow run {stale} of the checkpoint is not in" in caplog.text
        assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [7]


@pytest.mark.parametrize("at_start", [True, False])
def test_a_create_run_whose_reply_is_lost_leaves_one_run_not_two(tmp_path, monkeypatch, in_process_mlflow, at_start):
    """The store writes the run, then the reply is lost (a timeout on the way back): the retry
    must find that run, not create a second one and leave the first RUNNING forever. At start the
    store answers at once; later, as when a server that was down comes back, from the queue."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import OPEN_TOKEN_TAG, Tracker

    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    real_create, lost = MlflowClient.create_run, []

    def create_run_reply_lost(self, *args, **kwargs):
        run = real_create(self, *args, **kwargs)
        if not lost:
            lost.append(run.info.run_id)
            raise MlflowException("API request to /api/2.0/mlflow/runs/create failed: Read timed out")
        return run

    monkeypatch.setattr(MlflowClient, "create_run", create_run_reply_lost)
    if not at_start:  # the first open fails before reaching the store, and is queued
        real_get = MlflowClient.get_experiment_by_name
        calls = []

        def store_down_once(self, name):
            calls.append(name)
            if len(calls) <= 2:
                raise MlflowException("API request failed: Connection refused")
            return real_get(self, name)

        monkeypatch.setattr(MlflowClient, "get_experiment_by_name", store_down_once)
        monkeypatch.setattr(Tracker, "_server_answers", lambda self: len(calls) > 2)
    tracker = Tracker(uri, "exp", retry_wait_s=0.05, max_wait_s=0.1)
    try:
        tracker.log_metrics({"train/loss": 0.5}, 1)
        assert tracker.flush(30)
    finally:
        assert tracker.end(timeout_s=30)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [r.info.run_id for r in runs] == lost == [tracker.run_id]
    assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["train/loss"] == 0.5
    assert runs[0].data.tags[OPEN_TOKEN_TAG] == tracker.run_token


def test_a_checkpoint_token_reopens_the_run_an_earlier_process_opened_after_saving(tmp_path, in_process_mlflow):
    """A checkpoint saved before its run opened holds the tracker's token but no run id: the resume
    reopens the run with that token (not a new run, its params not logged again); a token with no
    run yet makes the run and tags it with that token."""
    from pipeline.tracking import OPEN_TOKEN_TAG, Tracker

    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    first = Tracker(uri, "exp")
    first.log_params({"cfg": 1}, new_run_only=True)
    first.log_metrics({"train/loss": 1.0}, 1)
    assert first.end(timeout_s=30)
    again = Tracker(uri, "exp", run_id=None, run_token=first.run_token)
    try:
        assert (again.run_id, again.new_run) == (first.run_id, False)
        assert MlflowClient(uri).get_run(first.run_id).info.status == "RUNNING"
        again.log_params({"only.new": 1}, new_run_only=True)
        again.log_metrics({"train/loss": 0.5}, 2)
        assert again.flush(30)
    finally:
        assert again.end(timeout_s=30)
    fresh = Tracker(uri, "exp", run_token="f" * 32)
    assert fresh.end(timeout_s=30)
    client = MlflowClient(uri)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("exp").experiment_id])}
    assert set(runs) == {first.run_id, fresh.run_id} and fresh.new_run is True
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [1, 2]
    assert "only.new" not in runs[first.run_id].data.params and runs[first.run_id].info.status == "FINISHED"
    assert runs[fresh.run_id].data.tags[OPEN_TOKEN_TAG] == "f" * 32
    # a run whose params never arrived (its process died with them queued) gets them when reopened
    bare = Tracker(uri, "exp2")
    assert bare.end(timeout_s=30)
    reopened = Tracker(uri, "exp2", run_token=bare.run_token)
    reopened.log_params({"cfg": 2}, new_run_only=True)
    assert reopened.end(timeout_s=30) and reopened.new_run is False
    assert client.get_run(bare.run_id).data.params == {"cfg": "2"}
