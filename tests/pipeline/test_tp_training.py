"""Tensor parallelism in the trainer: TP=2 x DP=2 with ZeRO-2 over 4 gloo processes reproduces
the 1-process loss curve, ZeRO shards over the data-parallel group only, and the TP=2
checkpoint converted to TP=1 gives the logits of the TP=2 model.

With data.split_by=sample the global batches and the masking noise do not depend on the layout
and a TP model starts from exactly the TP=1 weights (model/tensor_parallel.py), so only the order
of floating-point reductions differs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from .conftest import ROOT, launch_train, metric_series, run_single

STEPS = 20
COMMON = (f"train.max_steps={STEPS}", "train.log_every=1", "train.checkpoint_every=0", "data.split_by=sample",
          "tracking.enabled=false", "eval.max_batches=1", "sample.num_samples=1", "sample.steps=4",
          "train.global_batch_size=8", "data.micro_batch_size=4", "train.zero_stage=2")
TOLERANCE = 2e-4  # nats, absolute, at every step (fp32)
LOGITS_TOL = 1e-5  # relative


@pytest.fixture(scope="module")
def one_process_dir(markov_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp_ref")
    run_single(run_dir, markov_data, *COMMON)  # 2 accumulation steps of 4
    return run_dir


@pytest.fixture(scope="module")
def one_process(one_process_dir):
    return metric_series(one_process_dir)


@pytest.fixture(scope="module")
def tp2_dp2(markov_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp2_dp2")
    launch_train(run_dir, markov_data, *COMMON, "parallel.tensor=2", processes=4)  # 2 DP ranks x 4
    return run_dir


def test_tp2_dp2_zero2_matches_one_process(tp2_dp2, one_process):
    four = metric_series(tp2_dp2)
    assert sorted(four) == sorted(one_process) == list(range(1, STEPS + 1))
    worst = max(abs(four[s] - one_process[s]) for s in four)
    print(f"TP=2 x DP=2 ZeRO-2: largest per-step loss difference vs 1 process: {worst:.2e}")
    assert worst < TOLERANCE, (four, one_process)
    assert four[STEPS] < four[1]
    ckpt = tp2_dp2 / "checkpoints" / f"step{STEPS:08d}"
    names = sorted(p.name for p in ckpt.iterdir())
    # one model-states file per TP rank; ZeRO optimizer partitions: 2 DP ranks x 2 TP ranks
    assert [n for n in names if n.endswith("model_states.pt")] == \
        ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    assert [n for n in names if n.endswith("optim_states.pt")] == [
        f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in range(2) for t in range(2)]
    state = torch.load(ckpt / "mp_rank_01_model_states.pt", map_location="cpu", weights_only=False)
    assert state["parallel"]["tensor"] == 2 and state["parallel"]["data"] == 2
    layout = state["parallel"]["layout"]
    assert layout["backbone.blocks.0.attn_qkv.weight"] == {"dim": 0, "chunks": 3, "size": 384, "multiple": 1}
    assert layout["backbone.final.linear.weight"]["multiple"] == 128


def _tp_logits_worker(rank, world, port, ckpt, tokens, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state

    from model.config import ModelConfig
    from model.mdlm import build_model
    from model.tensor_parallel import MegatronTPLayers
    from pipeline.configtools import from_dict

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        state = torch.load(f"{ckpt}/mp_rank_{rank:02d}_model_states.pt", map_location="cpu", weights_only=False)
        model = build_model(from_dict(ModelConfig, state["run_config"]["model"], "model"), MegatronTPLayers())
        model.load_state_dict(state["module"])
        with torch.no_grad():
            logits = model.eval().logits(tokens)
        results[rank] = logits
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def convert_to_tp1(checkpoints, out):
    """`python -m pipeline.convert_tp`, as a user runs it; returns the converted folder."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.convert_tp", "--checkpoint", str(checkpoints),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


def test_converted_checkpoint_gives_tp2_logits(tp2_dp2, tmp_path):
    from pipeline.inference import load_checkpoint_model

    out = convert_to_tp1(tp2_dp2 / "checkpoints", tmp_path / "tp1")
    loaded = load_checkpoint_model(out, use_ema=False)
    assert loaded.step == STEPS and loaded.config["parallel"]["tensor"] == 1
    tag = f"step{STEPS:08d}"
    # self-contained like the source (sampling needs no data folder); never written over
    assert {"run_config.json", "data_manifest.json", "tokenizer"} <= {p.name for p in (out / tag).iterdir()}
    source = tp2_dp2 / "checkpoints" / tag
    before = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    for target, says in ((out, "already exists"), (tp2_dp2 / "checkpoints", "it is the checkpoint being converted")):
        again = subprocess.run([sys.executable, "-m", "pipeline.convert_tp", "--checkpoint", str(tp2_dp2 / "checkpoints"),
                                "--out", str(target)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and says in again.stderr, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == before
    tokens = torch.randint(0, 17, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = loaded.model.logits(tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_tp_logits_worker, args=(2, port, str(tp2_dp2 / "checkpoints" / f"step{STEPS:08d}"),
                                          tokens, results), nprocs=2, join=True)
        tp_logits = [results[0], results[1]]
    keep = [i for i in range(17) if i != 16]  # the [MASK] column is -1e6 on both sides
    for logits in tp_logits:
        err = ((logits[..., keep] - plain[..., keep]).abs().max() / plain[..., keep].abs().max()).item()
        print(f"converted TP=1 vs TP=2 logits: relative error {err:.1e}")
        assert err < LOGITS_TOL
    ema = load_checkpoint_model(out, use_ema=True)
    assert ema.weights == "ema"


def test_a_layout_keyed_by_wrapped_names_converts_to_the_same_weights(tp2_dp2, tmp_path):
    """Checkpoints of runs with activation checkpointing once keyed the TP layout by the wrapped
    module names: convert_tp reads them as plain names (else every block shard is 'replicated')."""
    import json
    import re
    import shutil

    from pipeline.checkpoint import COMPLETE
    from pipeline.inference import load_checkpoint_model

    old = tmp_path / "old" / "checkpoints"
    shutil.copytree(tp2_dp2 / "checkpoints", old)
    tag = old / f"step{STEPS:08d}"
    listed = json.loads((tag / COMPLETE).read_text())
    wrapped = 0
    for path in tag.glob("mp_rank_*_model_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        layout = {re.sub(r"(blocks\.\d+\.)", r"\1_checkpoint_wrapped_module.", k): v
                  for k, v in state["parallel"]["layout"].items()}
        wrapped += sum("_checkpoint_wrapped_module." in k for k in layout)
        state["parallel"]["layout"] = layout
        torch.save(state, path)
        listed["files"][path.name] = path.stat().st_size
    (tag / COMPLETE).write_text(json.dumps(listed))
    assert wrapped > 0
    converted = load_checkpoint_model(convert_to_tp1(old, tmp_path / "old_tp1"), use_ema=False).model.state_dict()
    current = load_checkpoint_model(convert_to_tp1(tp2_dp2 / "checkpoints", tmp_path / "tp1"),
                                    use_ema=False).model.state_dict()
    assert converted.keys() == current.keys()
    assert all(torch.equal(converted[k], current[k]) for k in current)


def test_an_unmerged_tp_checkpoint_is_refused_as_a_judge(tp2_dp2):
    from pipeline.data import load_manifest
    from pipeline.genppl import check_judge
    from pipeline.inference import checkpoint_run_config, resolve_checkpoint

    manifest = load_manifest(checkpoint_run_config(resolve_checkpoint(tp2_dp2))["data"]["path"])
    with pytest.raises(ValueError, match=r"tensor-parallel checkpoint \(parallel.tensor=2\): merge it for the "
                                         r"judge with `python -m pipeline.convert_tp"):
        check_judge(tp2_dp2, manifest)


def test_unconverted_tp_checkpoint_points_to_the_converter(tp2_dp2):
    from pipeline.inference import load_checkpoint_model

    with pytest.raises(ValueError, match="python -m pipeline.convert_tp"):
        load_checkpoint_model(tp2_dp2 / "checkpoints")


def test_tp2_zero3_trains_and_converts_its_partitioned_ema(markov_data, tmp_path, one_process_dir):
    """TP=2 x ZeRO-3 over 2 data-parallel ranks, blocks under activation checkpointing: same
    losses as 1 process; the final evaluation merges the TP shards, and convert_tp the EMA the
    trainer assembled from the ZeRO-3 partitions (the raw weights stay in partitions)."""
    import json

    from pipeline.inference import load_checkpoint_model

    run_dir = tmp_path / "tp2_zero3"
    launch_train(run_dir, markov_data, *COMMON, "parallel.tensor=2", "train.zero_stage=3",
                 "train.activation_checkpointing=true", processes=4)
    assert 0 < json.loads((run_dir / "final_eval.json").read_text())["eval"]["nelbo"] < 10
    (states,) = (run_dir / "checkpoints" / f"step{STEPS:08d}").glob("*pp_rank_0_mp_rank_00_model_states.pt")
    state = torch.load(states, map_location="cpu", weights_only=False)
    assert "backbone.blocks.0.attn_qkv.weight" in state["parallel"]["layout"]  # keyed as the state dict is
    four, one = metric_series(run_dir), metric_series(one_process_dir)
    assert max(abs(four[s] - one[s]) for s in one) < TOLERANCE
    out = convert_to_tp1(run_dir / "checkpoints", tmp_path / "tp1")
    merged = load_checkpoint_model(out, use_ema=True)
    reference = load_checkpoint_model(one_process_dir / "checkpoints", use_ema=True)
    a, b = merged.model.state_dict(), reference.model.state_dict()
    assert merged.weights == "ema" and a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    with pytest.raises(ValueError, match="only the EMA weights"):
        load_checkpoint_model(out, use_ema=False)
