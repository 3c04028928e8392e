from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.synthetic import write_markov_shards

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what a test process may hold that a training it starts must not inherit: its own launcher's or
# process group's rendezvous (a fixed MASTER_PORT makes two concurrent trainings collide) and MLflow target
CHILD_DROPS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI",
               "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CHILD_DROPS}
    env.update(extra)
    return env


def run_two_ranks(target, timeout: float) -> list:
    """target(rank, 2, port, queue) in 2 spawned processes; what each put on the queue, by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=timeout) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def launch_train(run_dir: Path, data_dir: Path, *overrides: str, processes: int = 2,
                 config: str = "configs/train/tiny-test.yaml", resume: str | None = None,
                 timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N pipeline/train.py ...`: the real launcher, real gloo process groups."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [launcher, "--num_gpus", str(processes), "--master_port", str(free_port()),
           "pipeline/train.py", "--config", config, f"data.path={data_dir}", f"run_dir={run_dir}",
           *overrides]
    if resume:
        cmd += ["--resume", resume]
    env = child_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def markov_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("markov")
    write_markov_shards(out, vocab=16, seq_len=32, train_samples=512, val_samples=64, samples_per_shard=128)
    return out


def run_single(run_dir: Path, data_dir: Path, *overrides: str, resume: str | None = None,
               env_extra: dict | None = None, timeout: int = 300, check: bool = True,
               config: str = "configs/train/tiny-test.yaml") -> subprocess.CompletedProcess:
    """One bare training process (a one-rank gloo group): cheaper than the launcher."""
    cmd = [sys.executable, "pipeline/train.py", "--config", config, f"data.path={data_dir}",
           f"run_dir={run_dir}", *overrides]
    if resume:
        cmd += ["--resume", resume]
    env = child_env()
    env.update(env_extra or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def in_process_mlflow(monkeypatch):
    """A Tracker (or mlflow's fluent API) in the test process sets MLflow's settings as environment
    variables, which later tests' trainings would inherit, and the tests may set more: put it all
    back afterwards."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    uri = mlflow.get_tracking_uri() if "MLFLOW_TRACKING_URI" in os.environ else None
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.setenv(key, "")  # recorded first, so teardown restores it, set or not
        monkeypatch.delenv(key)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    yield
    mlflow.set_tracking_uri(uri)


def logged_losses(output: str) -> dict[int, str]:
    """step -> loss as printed in the console log (4 decimals)."""
    import re

    return {int(m.group(1)): m.group(2) for m in re.finditer(r"step (\d+)/\d+ loss (\S+)", output)}


def metric_series(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """step -> value from <run_dir>/metrics.jsonl; a resumed run's later lines win."""
    import json

    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["step"]] = row[key]
    return out
