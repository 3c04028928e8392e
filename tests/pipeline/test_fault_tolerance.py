"""Preemption, crashes, corrupt checkpoints and non-finite losses, with real DeepSpeed engines."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, child_env, launch_train, logged_losses, run_single

FAST = ("tracking.enabled=false", "train.log_every=1", "eval.max_batches=1", "sample.num_samples=1",
        "sample.steps=4")


def start_training(run_dir: Path, data: Path, *overrides: str, mlflow_uri: str | None = None) -> subprocess.Popen:
    """pipeline/train.py in one process; MLflow tracks to mlflow_uri through MLFLOW_TRACKING_URI,
    as users point it at a server, or else to the run dir's sqlite store, whatever this process has."""
    cmd = [sys.executable, "pipeline/train.py", "--config", "configs/train/tiny-test.yaml",
           f"data.path={data}", f"run_dir={run_dir}", *overrides]
    env = child_env()
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 240) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    raise AssertionError(f"never saw {needle!r}:\n{''.join(lines[-30:])}")


def test_kill_9_then_resume_matches_the_uninterrupted_run_and_sees_each_sample_once(markov_data, tmp_path):
    steps = 40  # 40 steps x 8 samples = 320 < 512: one epoch
    straight = run_single(tmp_path / "straight", markov_data, *FAST, f"train.max_steps={steps}")
    reference = logged_losses(straight.stdout + straight.stderr)
    kill_after = random.Random(os.getpid()).randint(12, 28)
    run_dir = tmp_path / "crashed"
    proc = start_training(run_dir, markov_data, *FAST, f"train.max_steps={steps}",
                          "train.checkpoint_every=5", "train.record_sample_keys=true")
    wait_for_line(proc, f"step {kill_after}/{steps}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    keys_before = (run_dir / "sample_keys" / "rank0.tsv").read_text().splitlines()
    resumed = run_single(run_dir, markov_data, *FAST, f"train.max_steps={steps}", "train.checkpoint_every=5",
                         "train.record_sample_keys=true", resume="auto")
    out = resumed.stdout + resumed.stderr
    restart = int(out.split("resumed at step ")[1].split()[0])
    # the kill lands after "step N" is printed, a step and a checkpoint later at most on a busy machine
    assert restart % 5 == 0 and restart <= kill_after + 5, (restart, kill_after)
    after = logged_losses(out)
    assert sorted(after) == list(range(restart + 1, steps + 1))
    for step, loss in after.items():  # bitwise on CPU: same data, same noise, same RNG
        assert loss == reference[step], (step, loss, reference[step])
    lines = (run_dir / "sample_keys" / "rank0.tsv").read_text().splitlines()
    kept = [ln for ln in lines[:len(keys_before)] if int(ln.split("\t")[0]) <= restart]
    kept += lines[len(keys_before):]
    keys = [ln.split("\t")[1] for ln in kept]
    assert len(keys) == steps * 8
    assert len(set(keys)) == len(keys)  # nothing seen twice, nothing skipped within the epoch


def test_a_resume_on_another_data_parallel_size_restarts_the_epoch_with_a_warning(markov_data, tmp_path):
    """ZeRO-0 may resume on another number of ranks; the saved positions count another split of the
    epoch, so the epoch restarts from its start (as the one-rank stream begins it), said so."""
    from pipeline.data import ShardStream

    run_dir = tmp_path / "run"
    launch_train(run_dir, markov_data, *FAST, "train.zero_stage=0", "train.max_steps=6", "train.checkpoint_every=6",
                 processes=2)
    resumed = run_single(run_dir, markov_data, *FAST, "train.zero_stage=0", "train.max_steps=9",
                         "train.record_sample_keys=true", resume="auto")
    out = resumed.stdout + resumed.stderr
    assert "data position was saved with world_size=2, resuming with world_size=1: restarting epoch 0" in out, out[-3000:]
    recorded = [ln.split("\t") for ln in (run_dir / "sample_keys" / "rank0.tsv").read_text().splitlines()]
    assert [int(step) for step, _ in recorded] == [step for step in range(7, 10) for _ in range(8)]
    epoch_start = [s["key"] for _, s in zip(range(24), ShardStream(markov_data, "train", 0, 1, seed=1234,
                                                                        shuffle_window=4))]
    assert [key for _, key in recorded] == epoch_start


def test_a_tensor_parallel_resume_on_more_data_parallel_ranks_restarts_the_epoch(markov_data):
    """TP=2 x DP=1 (2 processes) resumed as TP=2 x DP=2 (4): the position's own data-parallel size
    (1) is compared, not the saved process count (2, the new data-parallel size)."""
    from types import SimpleNamespace

    import pytest
    import torch

    from pipeline.data import ShardStream
    from pipeline.trainer import Trainer

    saved = ShardStream(markov_data, "train", 0, 1, seed=3)
    it = iter(saved)
    for _ in range(40):
        next(it)
    entry = {"data": saved.state_dict(), "rng": {"cpu": torch.get_rng_state()}}
    host = SimpleNamespace(stream=ShardStream(markov_data, "train", 1, 2, seed=3), world=4, rank=2, ema=None)
    with pytest.warns(UserWarning, match="saved with world_size=1, resuming with world_size=2: restarting epoch 0"):
        Trainer._restore(host, {"step": 5, "world_size": 2, "per_rank": [entry, entry]})
    assert (host.stream.position.segment_cursor, host.stream.position.sample_cursor) == (0, 0)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(markov_data, tmp_path):
    """...with status 0 by default (train.exit_code_on_signal; the Kubernetes manifest's 143 is
    tested through torchrun in tests/cluster/test_multinode_local.py)."""
    proc = start_training(tmp_path, markov_data, *FAST, "train.max_steps=100000", "train.checkpoint_every=0",
                          "tracking.enabled=true")
    wait_for_line(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stop signal received" in out
    tags = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*"))
    assert len(tags) == 1 and (tmp_path / "checkpoints" / tags[0] / "COMPLETE").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text() == tags[0]
    assert '"stopped_by_signal": true' in out
    assert mlflow_run(tmp_path, out).info.status == "KILLED"  # until a resume reopens it


def test_ctrl_c_checkpoints_once_and_twice_aborts(markov_data, tmp_path):
    proc = start_training(tmp_path / "once", markov_data, *FAST, "train.max_steps=100000", "train.checkpoint_every=0")
    wait_for_line(proc, "step 3/")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "interrupted: checkpointing and stopping after this step" in out, out[-3000:]
    assert '"stopped_by_signal": true' in out and len(list((tmp_path / "once" / "checkpoints").glob("step*"))) == 1


def test_a_second_ctrl_c_aborts_and_the_handlers_are_given_back():
    """The same Ctrl-C relayed again (torchrun passes the terminal's on to its workers) is not a
    second one; a later one aborts at once. A released trainer restores the process's handlers."""
    from types import SimpleNamespace

    from pipeline.trainer import Trainer

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    host = SimpleNamespace(stop_signal=None, _run_dir_lock=None)
    try:
        Trainer._install_signal_handlers(host)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # relayed: ignored
        time.sleep(0.1)
        assert host.stop_signal == signal.SIGINT
        time.sleep(2.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        Trainer._release(host)
        assert {sig: signal.getsignal(sig) for sig in saved} == saved
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def test_a_restart_before_the_first_checkpoint_continues_the_same_mlflow_run(markov_data, tmp_path):
    """Killed before any checkpoint, the run starts over: in the MLflow run it had opened, which
    ends FINISHED instead of staying RUNNING beside a second run."""
    proc = start_training(tmp_path, markov_data, *FAST, "train.max_steps=100000", "train.checkpoint_every=0",
                          "tracking.enabled=true")
    wait_for_line(proc, "step 3/")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "mlflow_run.json").is_file()
    out = run_single(tmp_path, markov_data, *FAST, "train.max_steps=4", "tracking.enabled=true")
    run = mlflow_run(tmp_path, out.stdout + out.stderr)  # exactly one run in the experiment
    assert run.info.status == "FINISHED"
    # its params are the first start's; this start's config is beside them
    from mlflow.tracking import MlflowClient

    assert run.data.params["train.max_steps"] == "100000" and run.data.tags["mdlm.resumed_at_step"] == "0"
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "resumes/step00000000")] == \
        ["resumes/step00000000/config.yaml"]
    assert not (tmp_path / "mlflow_run.json").exists()  # the checkpoints carry the run from here


def test_a_fork_killed_before_its_first_checkpoint_restarts_in_its_own_mlflow_run(markov_data, tmp_path):
    """Started from another run's checkpoint and killed before a checkpoint of its own, the same
    command again continues the MLflow run the fork had opened (not a second one)."""
    parent = tmp_path / "parent"
    first = run_single(parent, markov_data, *FAST, "train.max_steps=5", "tracking.enabled=true")
    parent_run = mlflow_run(parent, first.stdout + first.stderr)
    fork, source = tmp_path / "fork", str(parent / "checkpoints" / "step00000005")
    proc = start_training(fork, markov_data, *FAST, "train.max_steps=100000", "train.checkpoint_every=0",
                          "tracking.enabled=true", "--resume", source)
    wait_for_line(proc, "step 7/")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (fork / "checkpoints").exists() and (fork / "mlflow_run.json").is_file()
    out = run_single(fork, markov_data, *FAST, "train.max_steps=8", "tracking.enabled=true", resume=source)
    run = mlflow_run(fork, out.stdout + out.stderr)  # exactly one run in the fork's store
    assert run.info.status == "FINISHED" and run.data.tags["mdlm.parent_run_id"] == parent_run.info.run_id
    assert not (fork / "mlflow_run.json").exists()


def test_a_second_training_into_a_run_dir_in_use_is_refused(markov_data, tmp_path):
    proc = start_training(tmp_path, markov_data, *FAST, "train.max_steps=100000", "train.checkpoint_every=0")
    try:
        wait_for_line(proc, "step 3/")
        second = run_single(tmp_path, markov_data, *FAST, "train.max_steps=5", resume="auto", check=False)
        assert second.returncode == 2
        assert (f"run_dir '{tmp_path}' is in use by another training process (host {socket.gethostname()}, "
                f"pid {proc.pid}, since ") in second.stderr
    finally:
        proc.kill()
        proc.wait()
    # killed, the first holds nothing: the folder is free again
    assert "resumed" not in run_single(tmp_path, markov_data, *FAST, "train.max_steps=2").stdout


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(markov_data, tmp_path):
    run_single(tmp_path, markov_data, *FAST, "train.max_steps=20", "train.checkpoint_every=10")
    newest = tmp_path / "checkpoints" / "step00000020" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated by a crash during the write
    partial = tmp_path / "checkpoints" / "step00000025"
    partial.mkdir()  # a save that never completed: no COMPLETE marker
    out = run_single(tmp_path, markov_data, *FAST, "train.max_steps=22", resume="auto")
    text = out.stdout + out.stderr
    assert "could not be loaded" in text
    assert "resumed at step 10" in text
    assert sorted(logged_losses(text)) == list(range(11, 23))


def test_a_used_run_dir_needs_resume_and_a_resume_keeps_the_model(markov_data, tmp_path):
    run_single(tmp_path, markov_data, *FAST, "train.max_steps=4", "train.checkpoint_every=2")
    assert "n_layers: 2" in (tmp_path / "config.yaml").read_text()  # written with MLflow off too
    ckpts = tmp_path / "checkpoints"
    before = {str(p.relative_to(ckpts)): p.stat().st_mtime_ns for p in ckpts.glob("step*/*")}
    # a second run without --resume would mix its checkpoints with the first run's
    fresh = run_single(tmp_path, markov_data, *FAST, "train.max_steps=2", check=False)
    assert fresh.returncode == 2
    assert "already holds checkpoints of a run (newest: step00000004): pass --resume auto" in fresh.stderr
    # a different model is refused by name before any weights are read, not taken for corruption
    other = run_single(tmp_path, markov_data, *FAST, "train.max_steps=6", "model.n_layers=3", resume="auto",
                       check=False)
    assert other.returncode == 2, other.stderr[-2000:]
    assert "cannot be resumed with this config: model.n_layers: 2 -> 3" in other.stderr
    assert "could not be loaded" not in other.stdout + other.stderr
    # so is another data-parallel size: DeepSpeed cannot re-partition ZeRO optimizer states
    wider = launch_train(tmp_path, markov_data, *FAST, "train.max_steps=6", resume="auto", check=False)
    assert wider.returncode != 0
    assert "ZeRO optimizer states partitioned over 1 data-parallel ranks -> 2" in wider.stdout + wider.stderr
    # other changes are allowed and named; a finished run resumed at its last step trains nothing
    # and keeps that checkpoint as it is
    done = run_single(tmp_path, markov_data, *FAST, "train.max_steps=4", "optim.lr=0.001", resume="auto")
    text = done.stdout + done.stderr
    assert "settings that differ from the checkpoint's: optim.lr: 0.003 -> 0.001" in text
    assert "resumed at step 4" in text and logged_losses(text) == {}
    assert {str(p.relative_to(ckpts)): p.stat().st_mtime_ns for p in ckpts.glob("step*/*")} == before
    assert (tmp_path / "final_eval.json").is_file()


def test_explicit_missing_checkpoint_is_an_error(markov_data, tmp_path):
    out = run_single(tmp_path, markov_data, *FAST, "train.max_steps=3", resume="step00000099", check=False)
    assert out.returncode == 2
    assert "--resume step00000099: no complete checkpoint of that name" in out.stderr
    assert "(complete: none)" in out.stderr


def test_non_finite_steps_are_skipped_then_abort_after_k_in_a_row(markov_data, tmp_path):
    ok = run_single(tmp_path / "a", markov_data, *FAST, "train.max_steps=8",
                    env_extra={"MDLM_INJECT_NAN_STEPS": "3,4"})
    text = ok.stdout + ok.stderr
    assert text.count("update skipped") == 2
    assert "TRAIN_SUMMARY" in text
    bad = run_single(tmp_path / "b", markov_data, *FAST, "train.max_steps=20", "train.max_bad_steps=3",
                     "tracking.enabled=true", env_extra={"MDLM_INJECT_NAN_STEPS": "4,5,6,7"}, check=False)
    assert bad.returncode != 0
    assert "not finite for 3 steps in a row (last: step 6)" in bad.stderr
    run = mlflow_run(tmp_path / "b", bad.stdout + bad.stderr)  # a crashed run says so in MLflow, with the metrics it logged
    assert run.info.status == "FAILED" and run.data.metrics["train/skipped_steps"] == 2
    # the streak counts across a resume: step 5 (saved) then 6 and 7 are three in a row
    run_single(tmp_path / "c", markov_data, *FAST, "train.max_steps=5", "train.checkpoint_every=5",
               env_extra={"MDLM_INJECT_NAN_STEPS": "5"})
    resumed = run_single(tmp_path / "c", markov_data, *FAST, "train.max_steps=20", "train.max_bad_steps=3",
                         env_extra={"MDLM_INJECT_NAN_STEPS": "6,7"}, resume="auto", check=False)
    assert resumed.returncode != 0 and "not finite for 3 steps in a row (last: step 7)" in resumed.stderr


def test_zero0_with_fp32_weights_skips_a_non_finite_step_and_logs_each_steps_own_lr(markov_data, tmp_path):
    """At ZeRO-0 with fp32 weights DeepSpeed steps the torch optimizer itself, which has no overflow
    check: the project's guard skips the NaN step (weights, EMA and schedule untouched) and
    reports the gradient norm. train/lr is the LR each step ran at (warmup 5, lr 3e-3)."""
    out = run_single(tmp_path, markov_data, *FAST, "train.max_steps=8", "train.zero_stage=0",
                     "train.checkpoint_every=0", env_extra={"MDLM_INJECT_NAN_STEPS": "3"})
    text = out.stdout + out.stderr
    assert text.count("update skipped") == 1 and "step 3: non-finite" in text
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}
    assert sorted(rows) == list(range(1, 9))
    assert all(math.isfinite(rows[s]["train/loss"]) for s in rows if s != 3)
    assert all(0 < rows[s]["train/grad_norm"] < 1e3 for s in rows if s != 3)
    assert rows[8]["train/loss"] < rows[1]["train/loss"]
    # warmup: steps 1, 2 at 1/5 and 2/5 of 3e-3; step 3 (skipped) and step 4 both at 3/5
    lrs = {s: round(rows[s]["train/lr"], 10) for s in (1, 2, 3, 4, 5)}
    assert lrs == {1: 6e-4, 2: 1.2e-3, 3: 1.8e-3, 4: 1.8e-3, 5: 2.4e-3}
    summary = json.loads(text.split("TRAIN_SUMMARY ")[1].splitlines()[0])
    assert summary["step"] == 8 and math.isfinite(summary["eval"]["ppl_bound"])  # the EMA took no NaN


def mlflow_run(run_dir: Path, output: str = ""):
    from mlflow.tracking import MlflowClient

    assert (run_dir / "mlflow.db").is_file(), f"the run wrote no {run_dir}/mlflow.db:\n{output[-3000:]}"
    client = MlflowClient(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("mdlm-pretrain")
    assert experiment is not None, output[-3000:]
    runs = client.search_runs(experiment.experiment_id)
    assert len(runs) == 1
    return runs[0]


FAILED_START = """
import sys
from pathlib import Path
from pipeline.checkpoint import lock_run_dir
from pipeline.config import load_run_config
from pipeline.trainer import Trainer

run_dir = Path(sys.argv[1])
cfg = load_run_config("configs/train/tiny-test.yaml", [f"data.path={sys.argv[2]}", f"run_dir={run_dir}",
                                                       "tracking.enabled=false", "model.vocab_size=99"])
try:
    Trainer(cfg)
except Exception as err:
    kept = err  # as a notebook keeps the last traceback, and with it the half-built trainer
    print("START FAILED:", type(err).__name__, err)
lock, holder = lock_run_dir(run_dir)
print("RUN_DIR", "FREE" if lock is not None else f"HELD by {holder}")
lock.close()
cfg.model.vocab_size = 0
trainer = Trainer(cfg)  # the corrected start, in the same process
print("SECOND START HOLDS", lock_run_dir(run_dir)[1])
trainer.close()
"""


def test_a_failed_start_frees_its_run_dir_in_the_same_process(markov_data, tmp_path):
    env = child_env()
    out = subprocess.run([sys.executable, "-c", FAILED_START, str(tmp_path / "run"), str(markov_data)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "START FAILED: ConfigError model.vocab_size=99 but the data's manifest says" in out.stdout
    assert "RUN_DIR FREE" in out.stdout
    assert f"SECOND START HOLDS host {socket.gethostname()}, pid " in out.stdout
