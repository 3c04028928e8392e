"""The SLURM scripts run for real, on a private one-node SLURM cluster (see local_slurm.py).

train.sbatch: submitted as 1 node x 2 tasks on CPU to the preemptible partition. Once a
checkpoint exists, a job in the higher-priority partition preempts it: SLURM sends SIGTERM to the
ranks, which checkpoint and exit 0, and the script requeues the job at once. Once the requeued job
has resumed and checkpointed, the batch shell gets USR1 exactly as `--signal=B:USR1@180` delivers
it before a time limit (slurmctld signals the batch step: `scancel --signal=USR1 --batch`); the
script forwards it to the ranks (they checkpoint and exit 0) and requeues the job again. The third
start must resume with --resume auto and finish (final_eval.json, checkpoints, per-node logs).

data_prep.sbatch: a Ray head inside the allocation, the data_prep driver on it with RAY_ADDRESS,
teardown; the shards must verify."""
from __future__ import annotations

import json
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from .helpers import CLUSTER, REPO, clean_env, free_ports, latest_step, tail, wait_for
from .local_slurm import LocalSlurm, ensure_installed

pytestmark = pytest.mark.slow

MAX_STEPS = 100


@pytest.fixture(scope="module")
def slurm():
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm()
    try:
        cluster.start()
    except Exception as err:
        cluster.stop()
        pytest.fail(f"the local SLURM cluster did not start: {err}")
    yield cluster
    cluster.stop()


def loopback_overrides(slurm: LocalSlurm, var: str) -> dict[str, str]:
    """Keep every connection on 127.0.0.1: name the address only if the node's name resolves elsewhere."""
    try:
        resolved = socket.gethostbyname(slurm.host)
    except OSError:
        resolved = ""
    return {} if resolved.startswith("127.") else {var: "127.0.0.1"}


def stop_lines(log: str) -> list[int]:
    """Steps at which the ranks checkpointed on a stop signal, in order."""
    return [int(m) for m in re.findall(r"stop signal received: saving a checkpoint at step (\d+)", log)]


def test_train_sbatch_preempted_then_time_limited_and_finished(slurm, cluster_markov_data, tmp_path):
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    env = clean_env(
        MDLM_CONFIG="configs/train/tiny-test.yaml", MDLM_DATA=str(cluster_markov_data), MDLM_RUN_DIR=str(run_dir),
        MDLM_LOG_DIR=str(log_dir), MDLM_MASTER_PORT=str(free_ports()[0]), MDLM_PYTHON=sys.executable,
        MDLM_ARGS=f"train.max_steps={MAX_STEPS} train.checkpoint_every=10 train.log_every=10 tracking.enabled=false",
        GLOO_SOCKET_IFNAME="lo", **loopback_overrides(slurm, "MDLM_MASTER_ADDR"))
    # the CPU shape on the command line; the script's #SBATCH lines keep the 16 x 8 GPU defaults
    job = slurm.sbatch(["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                        "--time=30", f"--output={tmp_path}/%x-%j.out", str(CLUSTER / "train.sbatch")], env)
    batch_log = tmp_path / f"mdlm-train-{job}.out"
    node_log = log_dir / f"mdlm-train-{job}" / f"node0-{slurm.host}.log"

    def until(predicate, what: str, timeout: float = 480):
        try:
            return wait_for(predicate, timeout=timeout, what=what, interval=0.3)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{slurm.job(job)}\n{tail(batch_log)}\n{tail(node_log)}") from None

    # 1. preemption: a job in the higher-priority partition needs the node
    until(lambda: (latest_step(run_dir) or 0) >= 10, "the first checkpoint")
    urgent = slurm.sbatch(["--partition=urgent", "--ntasks=1", "--time=5", f"--output={tmp_path}/urgent.out",
                           "--wrap", "echo urgent ran"], env)
    until(lambda: slurm.job(job).get("Restarts") == "1", "the requeue after the preemption")
    first = stop_lines(tail(node_log, 1_000_000))
    assert len(first) == 1, tail(node_log)

    # 2. the time-limit warning, exactly as --signal=B:USR1@180 delivers it (to the batch shell)
    until(lambda: f"resumed at step {first[0]} " in tail(node_log, 1_000_000)
          and (latest_step(run_dir) or 0) > first[0], "the resumed run's next checkpoint")
    slurm.run(["scancel", "--signal=USR1", "--batch", job])

    info = slurm.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=600)
    out, nodes = tail(batch_log, 100_000), tail(node_log, 1_000_000)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out, nodes[-4000:])
    assert info["Restarts"] == "2", info
    assert slurm.job(urgent).get("JobState") == "COMPLETED"
    assert (tmp_path / "urgent.out").read_text().strip() == "urgent ran"

    starts = re.split(rf"job {job} start \d+:", out)[1:]
    assert len(starts) == 3, out
    # start 0: the ranks were preempted, checkpointed and exited 0; the shell requeued at once
    assert "ranks exited with status 0" in starts[0] and f"preempted: requeueing job {job}" in starts[0], out
    # start 1: USR1 forwarded, ranks checkpointed and exited 0, the job requeued itself
    assert "got SIGUSR1" in starts[1] and "ranks exited with status 0" in starts[1], out
    assert "requeueing job" in starts[1] and "(time limit near)" in starts[1]
    # start 2: ran to the end
    assert "training finished" in starts[2] and "requeueing" not in starts[2], out

    # the ranks: a checkpoint at each stop, and each start resumed exactly there
    stops = stop_lines(nodes)
    assert len(stops) == 2 and 10 <= stops[0] < stops[1] < MAX_STEPS, stops
    for step in stops:
        assert f"resumed at step {step} " in nodes
    assert "0: " in nodes and "1: " in nodes  # --label: both tasks write to the node's log

    summary = json.loads((run_dir / "final_eval.json").read_text())
    assert summary["step"] == MAX_STEPS
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{MAX_STEPS:08d}"


def test_data_prep_sbatch_runs_ray_inside_the_allocation(slurm, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(5)
    words = "the state of the union congress nation peace treaty commerce revenue people law year".split()
    for i in range(40):
        sentences = (" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + "."
                     for _ in range(rng.randint(5, 30)))
        (corpus / f"doc{i:03d}.txt").write_text(" ".join(sentences))
    out = tmp_path / "shards"
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, client, agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr = free_ports(8)
    ports = (f"--ray-client-server-port={client} --dashboard-agent-listen-port={agent} "
             f"--dashboard-agent-grpc-port={agent_grpc} --metrics-export-port={metrics} "
             f"--runtime-env-agent-port={rt_env} --node-manager-port={node_mgr} --object-manager-port={obj_mgr}")
    env = clean_env(MDLM_PYTHON=sys.executable, MDLM_RAY_PORT=str(gcs), MDLM_RAY_START_ARGS=ports,
                    MDLM_RAY_TMP=ray_tmp, **loopback_overrides(slurm, "MDLM_RAY_HEAD_IP"))
    job = slurm.sbatch(["--nodes=1", "--cpus-per-task=2", "--time=15", f"--output={tmp_path}/%x-%j.out",
                        str(CLUSTER / "data_prep.sbatch"), "--input", str(corpus), "--out", str(out),
                        "--tokenizer", "train:300", "--seq-len", "64", "--val-fraction", "0.1",
                        "--samples-per-shard", "40"], env)
    info = slurm.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=400)
    log = tail(tmp_path / f"mdlm-data-prep-{job}.out", 50_000)
    assert info["JobState"] == "COMPLETED", (info, log)
    assert "1 Ray node(s) up" in log and "connecting to the Ray cluster at" in log, log
    assert "[data_prep] done" in log and "stopping the Ray cluster" in log
    check = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] > 0
    # nothing of the Ray cluster outlives the job
    leftover = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout
    shutil.rmtree(ray_tmp, ignore_errors=True)
