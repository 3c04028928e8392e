"""A 2-node job on this machine, CPU/gloo, nodes simulated as process sessions on 127.0.0.1.

Phase 1 starts each node as a Kubernetes pod of cluster/kubeflow-pytorchjob.yaml would: the
manifest's own torchrun command with the environment the Kubeflow operator injects (PET_NNODES,
PET_NODE_RANK, PET_NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT), node ranks 0 and 1. Once a
checkpoint exists both nodes are killed with SIGKILL (launcher and ranks: the machines die).
Phase 2 restarts the job on the same 2 nodes through the other launcher, cluster/deepspeed-
hostfile.sh in its no-ssh mode (one deepspeed launcher per node, --node_rank 0 and 1), with
--resume auto, and it must continue from the newest complete checkpoint to the end, in the same
MLflow run."""
from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import complete_tags

from .helpers import (
    CLUSTER,
    REPO,
    clean_env,
    free_ports,
    kill_node,
    latest_step,
    pids_mentioning,
    start_node,
    tail,
    tree,
    wait_for,
)

pytestmark = pytest.mark.slow

MAX_STEPS = 80


def pod_command(replica: str) -> tuple[list[str], dict[str, str]]:
    doc = yaml.safe_load((CLUSTER / "kubeflow-pytorchjob.yaml").read_text())
    container = doc["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]
    env = {e["name"]: str(e["value"]) for e in container.get("env", [])}
    return list(container["command"]), env


def expand_k8s(word: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) substitution in a container command."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), word)


def train_args(data: Path, run_dir: Path) -> list[str]:
    return ["--config", "configs/train/tiny-test.yaml", "--resume", "auto", f"data.path={data}",
            f"run_dir={run_dir}", f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=10",
            "train.log_every=5", "train.keep_last=10"]


def test_two_nodes_killed_and_resumed(cluster_markov_data, tmp_path):
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    base_env = clean_env(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")

    # ---- phase 1: two pods of the PyTorchJob (torchrun), node ranks 0 and 1 -------------------
    port = free_ports()[0]
    nodes = []
    for node_rank, replica in ((0, "Master"), (1, "Worker")):
        command, pod_env = pod_command(replica)
        operator_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PET_NNODES": "2",
                        "PET_NODE_RANK": str(node_rank), "PET_NPROC_PER_NODE": "1",
                        "WORLD_SIZE": "2", "RANK": str(node_rank), "PYTHONUNBUFFERED": "0"}
        pod_env.pop("MLFLOW_TRACKING_URI")  # no server here: the default sqlite store in run_dir
        env = {**base_env, **pod_env, **operator_env, "OMP_NUM_THREADS": "1"}
        launcher = [expand_k8s(w, env) for w in command[:command.index("pipeline/train.py") + 1]]
        assert not any("$(" in w for w in launcher), launcher
        nodes.append(start_node(launcher + train_args(cluster_markov_data, run_dir), env,
                                logs / f"phase1-node{node_rank}.log"))
    try:
        wait_for(lambda: (latest_step(run_dir) or 0) >= 10, timeout=420, what="the first checkpoint",
                 procs=nodes)
        # the machines die: launchers and ranks, no signal handler runs
        for proc in nodes:
            kill_node(proc)
        for proc in nodes:
            proc.wait(timeout=30)
    finally:
        for proc in nodes:
            kill_node(proc)
    # killed ranks with ~1 GB each can take a moment to be reaped on a busy machine
    survivors = lambda: tree([p.pid for p in nodes], [p.pid for p in nodes]) + pids_mentioning(str(run_dir))  # noqa: E731
    try:
        wait_for(lambda: not survivors(), timeout=30, what="the killed nodes' processes to be gone")
    except AssertionError:
        raise AssertionError(f"processes survived the node kill: {survivors()}") from None
    killed_at = int(complete_tags(run_dir / "checkpoints")[-1].removeprefix("step"))
    assert 10 <= killed_at < MAX_STEPS, killed_at
    assert not (run_dir / "final_eval.json").exists()
    phase1 = tail(logs / "phase1-node0.log", 100_000)
    assert "step 5/80" in phase1, phase1[-3000:]

    # ---- phase 2: the DeepSpeed hostfile route without ssh, one launcher per node -------------
    port = free_ports()[0]
    nodes = []
    for node_rank in (0, 1):
        cmd = ["bash", str(CLUSTER / "deepspeed-hostfile.sh"), "--hosts", "node0,node1", "--gpus-per-node", "1",
               "--master-addr", "127.0.0.1", "--master-port", str(port), "--node-rank", str(node_rank),
               "--log-dir", str(tmp_path / "ds"), "--", *train_args(cluster_markov_data, run_dir)]
        nodes.append(start_node(cmd, base_env, logs / f"phase2-node{node_rank}.log"))
    try:
        for proc in nodes:
            try:
                proc.wait(timeout=480)
            except subprocess.TimeoutExpired:
                raise AssertionError("phase 2 did not finish:\n" + tail(logs / "phase2-node0.log")) from None
    finally:
        for proc in nodes:
            kill_node(proc)
    phase2 = tail(logs / "phase2-node0.log", 200_000)
    assert [p.returncode for p in nodes] == [0, 0], phase2[-4000:] + tail(logs / "phase2-node1.log")
    assert (tmp_path / "ds" / "hostfile").read_text() == "node0 slots=1\nnode1 slots=1\n"

    # it resumed from the newest complete checkpoint the killed job left, on 2 ranks over 2 nodes
    assert f"resumed at step {killed_at} " in phase2, phase2[-4000:]
    assert "nnodes=2, num_local_procs=1, node_rank=0" in phase2
    summary = json.loads((run_dir / "final_eval.json").read_text())
    assert summary["step"] == MAX_STEPS
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step{MAX_STEPS:08d}"
    final = ckpts / f"step{MAX_STEPS:08d}"
    assert sorted(p.name for p in final.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    # one MLflow run across the kill: metrics from before and after it, finished once
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["derived.world_size"] == "2"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert 5 in steps and MAX_STEPS in steps and killed_at + 5 in steps, sorted(steps)


def test_prestop_hook_has_the_ranks_checkpoint_without_torchrun_being_signalled(cluster_markov_data, tmp_path):
    """The pod's preStop hook (cluster/stop-ranks.sh) sends SIGTERM to the ranks, torchrun's
    children, and returns once they have checkpointed and exited; torchrun then ends by itself. No
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT is needed, so any torch's torchrun works. The ranks exit with the
    manifest's train.exit_code_on_signal (143), so the operator restarts the pods still running
    instead of counting the job as Succeeded."""
    doc = yaml.safe_load((CLUSTER / "kubeflow-pytorchjob.yaml").read_text())
    for replica in ("Master", "Worker"):
        container = doc["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        assert hook == ["bash", "/workspace/mdlm-pretrain/cluster/stop-ranks.sh"], hook
    run_dir, log = tmp_path / "run", tmp_path / "pod.log"
    command, pod_env = pod_command("Master")
    pod_env.pop("MLFLOW_TRACKING_URI")
    pod_env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    env = {**clean_env(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo"), **pod_env, "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports()[0]), "PET_NNODES": "1",
           "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "2"}
    launcher = [expand_k8s(w, env) for w in command[:command.index("pipeline/train.py") + 1]]
    args = train_args(cluster_markov_data, run_dir)
    args[args.index("train.max_steps=80")] = "train.max_steps=100000"
    [exit_code] = [w for w in command if w.startswith("train.exit_code_on_signal=")]
    assert exit_code == "train.exit_code_on_signal=143"
    args.append(exit_code)
    node = start_node(launcher + args, env, log)
    try:
        wait_for(lambda: "step 5/100000" in tail(log, 100_000), timeout=300, what="training steps", procs=[node])
        hook = [hook[0], hook[1].replace("/workspace/mdlm-pretrain", str(REPO)), str(node.pid)]
        stopped = subprocess.run(hook, capture_output=True, text=True, timeout=240)
        assert stopped.returncode == 0 and "every rank has exited" in stopped.stdout, stopped.stdout + stopped.stderr
        assert node.wait(timeout=60) != 0, tail(log)   # a failure to the operator: pods restart
    finally:
        kill_node(node)
    out = tail(log, 200_000)
    assert "stop signal received: saving a checkpoint" in out, out[-3000:]
    assert "exitcode  : 143" in out, out[-3000:]
    step = latest_step(run_dir)
    assert step is not None and step >= 5 and f"checkpoint saved: {run_dir / 'checkpoints'}/step{step:08d}" in out
    assert not (run_dir / "final_eval.json").exists()


def test_hostfile_launcher_without_ssh_passes_sigterm_to_the_ranks(cluster_markov_data, tmp_path):
    """A container's stop: SIGTERM to cluster/deepspeed-hostfile.sh in no-ssh mode reaches the ranks
    (DeepSpeed's runner passes none on in this mode, and its launch.py would kill them 30 s after
    one); they checkpoint and exit 0, and the launcher exits 0 with nothing left running."""
    run_dir, log = tmp_path / "run", tmp_path / "node.log"
    args = train_args(cluster_markov_data, run_dir)
    args[args.index("train.max_steps=80")] = "train.max_steps=100000"
    env = clean_env(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    node = start_node(["bash", str(CLUSTER / "deepspeed-hostfile.sh"), "--hosts", "localhost", "--gpus-per-node",
                       "2", "--master-addr", "127.0.0.1", "--master-port", str(free_ports()[0]), "--node-rank",
                       "0", "--log-dir", "logs-rel", "--", *args], env, log, cwd=tmp_path)
    try:
        wait_for(lambda: "step 5/100000" in tail(log, 100_000), timeout=300, what="training steps", procs=[node])
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=240) == 0, tail(log)
        assert pids_mentioning(str(run_dir)) == []
    finally:
        kill_node(node)
    out = tail(log, 200_000)
    assert "stop-ranks: every rank has exited" in out and "stop signal received: saving a checkpoint" in out, out[-3000:]
    step = latest_step(run_dir)
    assert step is not None and step >= 5 and (run_dir / "checkpoints" / f"step{step:08d}" / "COMPLETE").is_file()
    # a relative --log-dir is where it was called from, not in the checkout the launcher runs in
    assert (tmp_path / "logs-rel" / "hostfile").read_text() == "localhost slots=2\n"
