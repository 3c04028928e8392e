"""ZeRO-2 and ZeRO-3 over 2 gloo processes reproduce the 1-process loss curve, EMA and final
evaluation for the same global batch. With data.split_by=sample the global batches and the masking
noise are identical for any world size, so the only difference left is the order of floating-point
reductions. The EMA is kept as per-rank partitions (pipeline/ema.py: PartitionedEMA under ZeRO-1/2,
ShardedEMA under ZeRO-3)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.inference import load_checkpoint_model

from .conftest import launch_train, metric_series, run_single

COMMON = ("train.max_steps=15", "train.log_every=1", "train.checkpoint_every=0", "data.split_by=sample",
          "tracking.enabled=false", "eval.max_batches=0", "sample.num_samples=1", "sample.steps=4",
          "train.global_batch_size=8", "data.micro_batch_size=4")
def deepspeed_shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


TOLERANCE = 2e-4  # nats, absolute, at every step (fp32; observed differences are ~1e-6)


@pytest.fixture(scope="module")
def one_process(markov_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero_ref")
    run_single(run_dir, markov_data, *COMMON, "train.zero_stage=2")  # 2 accumulation steps of 4
    return run_dir


# compiled blocks under ZeRO-3 (leaf modules) are checked against eager in test_adapters.py
@pytest.mark.parametrize("stage,extra", [
    (2, ()), (3, ()), (3, ("train.deepspeed_config=configs/deepspeed/zero3_offload.json",)),
], ids=["zero2", "zero3", "zero3-offload"])
def test_two_processes_match_one(markov_data, tmp_path, one_process, stage, extra):
    shm_before = deepspeed_shm_segments()
    out = launch_train(tmp_path, markov_data, *COMMON, f"train.zero_stage={stage}", *extra)  # 2 ranks x 4
    # DeepSpeed's CPU all-reduce segments (~69 MB of RAM per rank) do not outlive the run (named
    # by its port: trainings of the other test worker may hold theirs at this moment)
    port = out.args[out.args.index("--master_port") + 1]
    assert {name for name in deepspeed_shm_segments() - shm_before if name.endswith((f"_{port}_0", f"_{port}_1"))} == set()
    kind = "the ZeRO optimizer states" if stage == 2 else "the ZeRO-3 weights"
    assert f"partitioned like {kind} over 2 data-parallel ranks" in out.stdout + out.stderr
    two, one = metric_series(tmp_path), metric_series(one_process)
    assert sorted(two) == sorted(one) == list(range(1, 16))
    worst = max(abs(two[s] - one[s]) for s in two)
    print(f"ZeRO-{stage}: largest per-step loss difference vs 1 process: {worst:.2e}")
    assert worst < TOLERANCE, (two, one)
    assert two[15] < two[1]
    # the EMA in the checkpoint (ZeRO-3: assembled from the ranks' partitions) and the final
    # evaluation over the whole validation split, which uses it
    ema_two = load_checkpoint_model(tmp_path / "checkpoints", use_ema=True)
    ema_one = load_checkpoint_model(one_process / "checkpoints", use_ema=True)
    assert ema_two.weights == ema_one.weights == "ema"
    raw = load_checkpoint_model(one_process / "checkpoints", use_ema=False).model.state_dict()
    one_sd, two_sd = ema_one.model.state_dict(), ema_two.model.state_dict()
    ema_diff = max((two_sd[k] - one_sd[k]).abs().max().item() for k in one_sd)
    print(f"ZeRO-{stage}: largest EMA weight difference vs 1 process: {ema_diff:.2e}")
    assert ema_diff < 1e-4
    assert max((raw[k] - one_sd[k]).abs().max().item() for k in one_sd) > 1e-3  # the EMA is not the raw weights
    nelbo = [json.loads((d / "final_eval.json").read_text())["eval"]["nelbo"] for d in (tmp_path, one_process)]
    print(f"ZeRO-{stage}: final NELBO {nelbo[0]:.6f} vs {nelbo[1]:.6f} with 1 process")
    assert abs(nelbo[0] - nelbo[1]) < 1e-3, nelbo


# ZeRO-3 only: the ZeRO-1/2 EMA partitions' save and exact reload are tested with real engines in
# test_ema.py, and a killed 2-rank ZeRO-2 run resumes in tests/cluster (CI time)
@pytest.mark.parametrize("stage", [3])
def test_resume_restores_the_partitioned_ema(markov_data, tmp_path, stage):
    """2 ranks: resuming from step 4 continues the ZeRO-3 sharded EMA exactly."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = (*COMMON, f"train.zero_stage={stage}", "train.max_steps=8", "train.checkpoint_every=4", "train.keep_last=5")
    launch_train(straight, markov_data, *args)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step00000004", resumed / "checkpoints" / "step00000004")
    (resumed / "checkpoints" / "latest").write_text("step00000004")
    out = launch_train(resumed, markov_data, *args, resume="auto")
    assert "resumed at step 4" in out.stdout + out.stderr
    a = load_checkpoint_model(straight / "checkpoints", use_ema=True).model.state_dict()
    b = load_checkpoint_model(resumed / "checkpoints", use_ema=True).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the raw weights (under ZeRO-3 consolidated from the partitions) also match and differ from the EMA
    raw = load_checkpoint_model(resumed / "checkpoints", use_ema=False)
    raw_straight = load_checkpoint_model(straight / "checkpoints", use_ema=False).model.state_dict()
    assert raw.weights == "raw" and all(torch.equal(raw.model.state_dict()[k], raw_straight[k]) for k in a)
    assert max((raw_straight[k] - a[k]).abs().max().item() for k in a) > 1e-3
    files = sorted((straight / "checkpoints" / "step00000008").glob("*model_states.pt"))
    carriers = [torch.load(f, map_location="cpu", weights_only=False).get("ema") is not None for f in files]
    # ZeRO-3: every rank writes model states, only the first rank's file carries the whole EMA
    assert carriers == ([True, False] if stage == 3 else [True])
