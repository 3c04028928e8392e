"""MLflow tracking from global rank 0; a tracking failure warns and never stops training."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def default_tracking_uri(run_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


class Tracker:
    """Thin MLflow wrapper: start or resume a run, log params/metrics/artifacts with retries."""

    def __init__(self, uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                 retries: int = 3, retry_wait_s: float = 1.0, artifact_dir: str | Path | None = None):
        import mlflow

        self.mlflow = mlflow
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self.failures = 0
        mlflow.set_tracking_uri(uri)
        self.uri = uri
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            # A new experiment on a local store keeps its artifacts next to the store, not in
            # ./mlruns of whatever directory the job happened to start in.
            if mlflow.get_experiment_by_name(experiment) is None:
                location = Path(artifact_dir).resolve().as_uri() if artifact_dir else None
                mlflow.create_experiment(experiment, artifact_location=location)
            mlflow.set_experiment(experiment)
            self.run = mlflow.start_run(run_name=run_name or None)
        self.run_id = self.run.info.run_id

    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        for attempt in range(self.retries):
            try:
                fn(*args, **kwargs)
                return True
            except Exception as err:  # tracking must never kill training
                if attempt == self.retries - 1:
                    self.failures += 1
                    log.warning("MLflow %s failed after %d tries (%s); training continues",
                                what, self.retries, err)
                    return False
                time.sleep(self.retry_wait_s * (attempt + 1))
        return False

    def log_params(self, params: dict) -> None:
        clean = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
        self._call("log_params", self.mlflow.log_params, clean)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._call("log_metrics", self.mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.mlflow.log_artifact, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        self._call("set_tags", self.mlflow.set_tags, tags)

    def end(self, status: str = "FINISHED") -> None:
        self._call("end_run", self.mlflow.end_run, status=status)
