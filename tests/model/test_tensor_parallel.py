"""Tensor parallelism of the whole MDLM: TP=2 over gloo matches TP=1 with the same weights.

Two processes (torch.multiprocessing) build the plain model and the megatron-core TP model from
the same seed; the TP model's initial weights must be this rank's shard of the plain ones, and
after randomising every weight (the plain init zeroes adaLN and the output head, which would make
most gradients trivially zero) the loss, the logits and every gradient must agree."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from model.config import model_config
from model.mdlm import MDLM
from model.tensor_parallel import (
    merge_state_dicts,
    merge_tensors,
    shard_state_dict,
    shard_tensor,
)

FWD_TOL = 2e-5   # relative, fp32
GRAD_TOL = 1e-4  # relative to each tensor's largest entry


def tiny_cfg():
    # vocab 17 (odd: exercises the vocabulary padding), 4 heads over 2 ranks
    return model_config("custom", n_layers=2, d_model=64, n_heads=4, cond_dim=32, dropout=0.0,
                        vocab_size=17, mask_token_id=16, time_conditioning=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_merge_round_trip():
    full = torch.arange(3 * 8 * 5, dtype=torch.float32).view(24, 5)
    spec = {"dim": 0, "chunks": 3, "size": 24}
    shards = [shard_tensor(full, spec, r, 2) for r in range(2)]
    assert torch.equal(shards[0][:4], full[:4]) and torch.equal(shards[0][4:8], full[8:12])
    assert torch.equal(merge_tensors(shards, spec), full)
    odd = torch.randn(17, 6)  # vocabulary padding
    spec = {"dim": 0, "chunks": 1, "size": 17}
    shards = [shard_tensor(odd, spec, r, 4) for r in range(4)]
    assert all(s.shape == (5, 6) for s in shards)
    assert torch.equal(merge_tensors(shards, spec), odd)
    head = {"dim": 0, "chunks": 1, "size": 17, "multiple": 8}  # the output head: rows of 8 x TP
    shards = [shard_tensor(odd, head, r, 2) for r in range(2)]
    assert all(s.shape == (16, 6) for s in shards) and not shards[1][1:].any()
    assert torch.equal(merge_tensors(shards, head), odd)
    row = torch.randn(6, 8)
    spec = {"dim": 1, "chunks": 1, "size": 8}
    assert torch.equal(merge_tensors([shard_tensor(row, spec, r, 2) for r in range(2)], spec), row)


def _worker(rank: int, world: int, port: int, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    from model.dit import count_parameters
    from model.tensor_parallel import MegatronTPLayers, full_parameter_counts, tp_layout
    from pipeline import metrics

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        cfg = tiny_cfg()
        torch.manual_seed(0)
        plain = MDLM(cfg)
        torch.manual_seed(0)
        tp = MDLM(cfg, MegatronTPLayers())
        layout = tp_layout(tp)
        out = {"layout": sorted(layout), "head_rows": tuple(m.backbone.final.linear.weight.shape[0] for m in
                                                            (tp, MDLM(cfg, MegatronTPLayers(head_multiple=1))))}
        # the FLOPs formula counts the whole model's weights from any shard
        out["counts"] = (full_parameter_counts(tp), (count_parameters(plain), metrics.matmul_params(plain),
                                                     metrics.conditioning_params(plain)))
        # 1. same seed -> this rank's shard of the plain initialisation
        expect = shard_state_dict(plain.state_dict(), layout, rank, world)
        got = {k: v for k, v in tp.state_dict().items() if not k.endswith("_extra_state")}
        out["init_equal"] = sorted(expect) == sorted(got) and all(torch.equal(expect[k], got[k]) for k in got)
        # 2. random weights everywhere, then forward and backward
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in plain.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        missing = tp.load_state_dict(shard_state_dict(plain.state_dict(), layout, rank, world), strict=False)
        out["missing"] = [k for k in missing.missing_keys if not k.endswith("_extra_state")]
        x0 = torch.randint(0, 16, (3, 12), generator=gen)
        t = torch.rand(3, generator=gen)
        noise = torch.rand(3, 12, generator=gen)
        ref = plain(x0, t, noise=noise)
        res = tp(x0, t, noise=noise)
        ref.loss.backward()
        res.loss.backward()
        out["loss"] = (ref.loss.item(), res.loss.item())
        z_t, _ = plain.corrupt(x0, t, noise=noise)
        with torch.no_grad():
            # drop the [MASK] column (-1e6 on both sides: it would hide any error)
            la, lb = plain.logits(z_t, t)[..., :16], tp.logits(z_t, t)
        out["logits_shape"] = tuple(lb.shape)
        lb = lb[..., :16]
        out["logits_err"] = ((la - lb).abs().max() / la.abs().max()).item()
        grads = {n: p.grad for n, p in tp.named_parameters()}
        shards = [None] * world
        dist.all_gather_object(shards, grads)
        merged = merge_state_dicts(shards, layout)
        worst = 0.0
        for n, p in plain.named_parameters():
            g = merged[n]
            worst = max(worst, ((g - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item())
        out["grad_err"] = worst
        # replicated parameters must have identical gradients on every TP rank
        out["replicated_same"] = all(torch.equal(shards[0][n], shards[r][n]) for r in range(world)
                                     for n in shards[0] if n not in layout)
        results[rank] = out
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_tp2_matches_tp1_forward_backward():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        results = dict(results)
    for rank, out in results.items():
        assert out["init_equal"], f"rank {rank}: TP init differs from the plain shard"
        assert out["missing"] == []
        ref, got = out["loss"]
        assert abs(ref - got) <= FWD_TOL * abs(ref), out["loss"]
        assert out["logits_shape"] == (3, 12, 17)
        assert out["logits_err"] < FWD_TOL, out["logits_err"]
        assert out["grad_err"] < GRAD_TOL, out["grad_err"]
        assert out["replicated_same"]
        # 17 ids: 256 head rows over 2 ranks, or 18 with parallel.head_multiple=1 (older checkpoints)
        assert out["head_rows"] == (128, 9)
        from_shard, plain_counts = out["counts"]
        assert from_shard == plain_counts and plain_counts[2] > 0
        print(f"rank {rank}: loss {ref:.6f} vs {got:.6f}, logits rel err {out['logits_err']:.1e}, "
              f"grad rel err {out['grad_err']:.1e}")
    layout = results[0]["layout"]
    assert "backbone.embed.weight" in layout and "backbone.final.linear.weight" in layout
    assert "backbone.blocks.0.attn_qkv.weight" in layout and "backbone.blocks.1.mlp_out.weight" in layout
    assert "backbone.blocks.0.mlp_out.bias" not in layout  # row-parallel bias: replicated
