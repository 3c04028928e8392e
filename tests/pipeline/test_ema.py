"""PartitionedEMA's bookkeeping over 2 real gloo processes, with a stand-in for DeepSpeed's ZeRO-1/2
optimizer layout (flat buffers with alignment padding, parameters as views into them, an fp32
master partition per rank) and a gather slice small enough that parameters straddle slices and
partitions; and, with real DeepSpeed bf16 engines at ZeRO 0-3, that every EMA kind follows the fp32
master weights. End-to-end training runs are in test_zero_equivalence.py."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pipeline import ema as ema_module
from pipeline.ema import PartitionedEMA

from .conftest import free_port, run_two_ranks

SHAPES = {"a": (3, 5), "b": (7,), "c": (2, 2, 3)}   # group 0: a, b; group 1: c
PAD = 2                                              # alignment padding after every parameter but the last


def layout_of(names):
    offsets, at = {}, 0
    for i, n in enumerate(names):
        offsets[n] = at
        at += torch.Size(SHAPES[n]).numel() + (PAD if i < len(names) - 1 else 0)
    return offsets, at


def build(rank: int, size: int):
    module = nn.Module()
    groups = []
    for g, names in enumerate((("a", "b"), ("c",))):
        offsets, used = layout_of(names)
        total = -(-used // size) * size + size          # divisible by the group size, with tail padding
        flat = torch.zeros(total)
        params = []
        for n in names:
            numel = torch.Size(SHAPES[n]).numel()
            p = nn.Parameter(torch.empty(SHAPES[n]))
            p.data = flat.narrow(0, offsets[n], numel).view(SHAPES[n])
            p.data.copy_(torch.arange(numel, dtype=torch.float32).view(SHAPES[n]) + 100 * (ord(n) - 96))
            setattr(module, n, p)
            params.append(p)
        groups.append((flat, params))
    part = [flat.numel() // size for flat, _ in groups]
    opt = SimpleNamespace(
        bit16_groups_flat=[flat for flat, _ in groups], bit16_groups=[params for _, params in groups],
        real_dp_process_group=[dist.group.WORLD] * 2,
        single_partition_of_fp32_groups=[flat[rank * n:(rank + 1) * n].clone() for (flat, _), n in zip(groups, part)])
    return module, opt


def worker(rank: int, size: int, port: int, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        ema_module.GATHER_ELEMENTS = 6   # slices of 3 elements per rank
        module, opt = build(rank, size)
        ema = PartitionedEMA(module, opt, decay=0.5)
        start = {n: p.detach().clone() for n, p in module.named_parameters()}
        for master in opt.single_partition_of_fp32_groups:  # one optimizer step: every weight + 8
            master.add_(8.0)
        ema.update()
        everywhere = ema.full_state()
        at_zero = ema.state_dict()
        fresh = PartitionedEMA(module, opt, decay=0.5)
        fresh.load_state_dict(at_zero if rank == 0 else everywhere, None)
        again = fresh.full_state()
        # a checkpoint without an EMA (the run had none) starts it from the current master weights
        fresh.load_state_dict(None, None)
        restarted = all(torch.equal(s, m) for s, m in zip(fresh.shards, opt.single_partition_of_fp32_groups))
        # an EMA that only some ranks can read is refused on every rank, not half-loaded
        try:
            fresh.load_state_dict(everywhere if rank == 0 else None, None)
            refused = ""
        except ValueError as err:
            refused = str(err)
        # plain values (numpy): a tensor would be passed as a shared-memory handle that the parent
        # cannot fetch once this process has exited
        queue.put((rank, {k: v.numpy().copy() for k, v in everywhere.items()}, at_zero is None,
                   {k: v.numpy().copy() for k, v in start.items()},
                   all(torch.equal(again[k], everywhere[k]) for k in everywhere) and restarted, refused,
                   sum(s.numel() for s in ema.shards)))
    finally:
        dist.destroy_process_group()


def test_partitioned_ema_assembles_checkpoints_and_reloads_exactly():
    results = run_two_ranks(worker, timeout=120)
    for rank, whole, none_here, start, reloaded, refused, held in results:
        assert sorted(whole) == ["a", "b", "c"]
        for name, value in whole.items():   # EMA after one step at decay 0.5: start + 4
            assert tuple(value.shape) == tuple(SHAPES[name])
            torch.testing.assert_close(torch.from_numpy(value), torch.from_numpy(start[name]) + 4.0, rtol=0, atol=0)
        assert none_here == (rank == 1)     # the checkpoint copy is assembled on rank 0 only
        assert reloaded                     # each rank cut its own partition back out of the whole EMA
        assert "only some data-parallel ranks found the EMA" in refused
        assert held < sum(torch.Size(s).numel() for s in SHAPES.values())  # a partition, not the whole


def test_a_checkpoint_ema_that_does_not_match_is_refused(monkeypatch):
    if dist.is_initialized():
        pytest.skip("needs a process without a default group")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        module, opt = build(0, 1)
        ema = PartitionedEMA(module, opt, decay=0.9)
        state = ema.state_dict()
        state["b"] = torch.zeros(8)
        with pytest.raises(ValueError, match="does not match this model's parameters"):
            ema.load_state_dict(state, None)
        opt.bit16_groups[1] = []            # a parameter that no partition holds
        with pytest.raises(ValueError, match="in no optimizer partition"):
            PartitionedEMA(module, opt, decay=0.9)
    finally:
        dist.destroy_process_group()


# name -> (ZeRO stage, extra DeepSpeed config, DeepSpeed's optimizer wrapper, how the EMA describes itself)
BF16_ENGINES = {
    "zero0": (0, {}, "FP16_UnfusedOptimizer", "whole on every rank, following the fp32 master weights"),
    "zero1-fp32-accumulation": (1, {"data_types": {"grad_accum_dtype": "fp32"}}, "BF16_Optimizer",
                                "partitioned like the ZeRO optimizer states over 2"),
    "zero2": (2, {}, "DeepSpeedZeroOptimizer", "partitioned like the ZeRO optimizer states over 2"),
    "zero3": (3, {}, "DeepSpeedZeroOptimizer_Stage3", "following their fp32 master partitions"),
}


def bf16_engines_worker(rank: int, size: int, port: int, queue):
    """Real DeepSpeed engines with bf16 weights: the EMA must follow the optimizer's fp32 master
    weights, not their bf16 copies, whose rounding swallows updates smaller than bf16's precision."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from pipeline.ema import make_ema

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(size))
    deepspeed.init_distributed(dist_backend="gloo")
    from pipeline import trainer as trainer_module
    from pipeline.trainer import Trainer

    trainer_module.GATHER_ELEMENTS = 800  # parameters of 768, 48, 768 and 16 elements: 3 gathers
    gathers, real_gather = [], deepspeed.zero.GatheredParameters

    def counting_gather(params, *args, **kwargs):
        gathers.append(len(params))
        return real_gather(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = counting_gather
    try:
        results = {}
        for kind, (stage, extra, *_) in BF16_ENGINES.items():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
            config = {"train_batch_size": 2 * size, "train_micro_batch_size_per_gpu": 2,
                      "bf16": {"enabled": True}, "zero_optimization": {"stage": stage}, **extra}
            # lr 1e-4: most updates are below bf16's resolution of the weights (~4e-4 at 0.1)
            engine, *_ = deepspeed.initialize(model=model, config=config,
                                              optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))
            ema = make_ema(engine, stage, decay=0.5)
            params = list(engine.module.named_parameters())

            def gathered(bf16: bool) -> dict:
                if bf16 and stage == 3:
                    with deepspeed.zero.GatheredParameters([p for _, p in params]):
                        return {n: p.detach().float().clone() for n, p in params}
                if bf16:
                    return {n: p.detach().float().clone() for n, p in params}
                if stage == 0:  # FP16_UnfusedOptimizer: fp32 copies in parameter order
                    return {n: m.detach().clone() for (n, _), m in zip(params, engine.optimizer.fp32_groups[0])}
                return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in params}

            fp32_ref, bf16_ref = gathered(False), gathered(True)
            g = torch.Generator().manual_seed(rank)
            for _ in range(6):
                x = torch.randn(2, 16, generator=g).to(torch.bfloat16)
                engine.backward(engine(x).float().pow(2).mean())
                engine.step()
                ema.update(engine.module)
                for ref, now in ((fp32_ref, gathered(False)), (bf16_ref, gathered(True))):
                    for n in ref:
                        ref[n].lerp_(now[n], 0.5)
            whole = ema.full_state()
            # the evaluation model is filled in place: from the EMA, and from the engine's weights
            # (ZeRO-3: a few parameters gathered at a time, GATHER_ELEMENTS = 800 here)
            into = {n: torch.full(t.shape, float("nan")) for n, t in whole.items()}
            filled = ema.full_state(into=into)
            from_ema = all(torch.equal(into[n], whole[n].float()) and filled[n].data_ptr() == into[n].data_ptr()
                           for n in whole)
            try:  # a target of another shape is refused, not broadcast into or part-filled
                ema.full_state(into={**into, "2.bias": torch.zeros(1)})
                from_ema = False
            except ValueError as err:
                from_ema = from_ema and "other shapes ['2.bias']" in str(err)
            targets = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16)).state_dict()
            gathers.clear()
            Trainer._fill_from_engine(SimpleNamespace(engine=engine), targets)
            counted = list(gathers)
            weights = gathered(True)
            from_engine = all(torch.equal(targets[n], weights[n]) for n in weights) and sorted(targets) == sorted(weights)
            results[kind] = (type(engine.optimizer).__name__, ema.describe(), sorted(whole),
                             {name: max((whole[n].float() - ref[n]).abs().max().item() for n in ref)
                              for name, ref in (("fp32", fp32_ref), ("bf16", bf16_ref))},
                             from_ema, from_engine, counted)
        queue.put((rank, results))  # plain values: the process exits next
    finally:
        dist.destroy_process_group()


def test_ema_follows_the_fp32_master_weights_of_bf16_engines():
    results = run_two_ranks(bf16_engines_worker, timeout=420)
    for rank, by_kind in results:
        assert sorted(by_kind) == sorted(BF16_ENGINES)
        for kind, (wrapper, described, names, worst, from_ema, from_engine, gathers) in by_kind.items():
            print(f"rank {rank} {kind}: EMA vs fp32 masters {worst['fp32']:.1e}, vs bf16 weights {worst['bf16']:.1e}")
            assert wrapper == BF16_ENGINES[kind][2]
            assert BF16_ENGINES[kind][3] in described, (kind, described)
            assert names == ["0.bias", "0.weight", "2.bias", "2.weight"]
            assert worst["fp32"] <= 1e-7, (kind, worst)
            # the bf16 copies really lose what the masters keep, so following them would be caught here
            assert worst["bf16"] > 1e-5, (kind, worst)
            assert from_ema and from_engine, kind
            assert gathers == ([1, 1, 2] if kind == "zero3" else []), (kind, gathers)
