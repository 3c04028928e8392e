"""The memory calculator against the formulas, the real model's parameters, and memory measured
on CPU at small scale (tensor bytes of weights, gradients, AdamW states; tensors autograd saves)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from model.config import PRESETS, model_config
from model.dit import count_parameters
from model.mdlm import build_model
from pipeline.memory import GIB, activation_bytes, estimate, parameter_split

from .conftest import ROOT

SPLIT_ROWS = re.compile(r"(attn_qkv|mlp_in|final\.linear)\.(weight|bias)$|embed\.weight$")
SPLIT_COLS = re.compile(r"(attn_out|mlp_out)\.weight$")


def _meta(preset: str, **kw):
    with torch.device("meta"):
        return build_model(model_config(preset, **kw))


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tensor", [1, 2, 4])
def test_parameter_split_matches_the_model(preset, tensor):
    model = _meta(preset)
    vocab = model.cfg.vocab_size
    local = 0
    for name, p in model.named_parameters():
        if SPLIT_ROWS.search(name):
            rows = p.shape[0]
            if rows == vocab:  # TP pads the vocabulary: to 128 x TP rows for the output head
                multiple = tensor * 128 if "final.linear" in name and tensor > 1 else tensor
                rows = -(-vocab // multiple) * multiple
            local += rows // tensor * (p.numel() // p.shape[0])
        elif SPLIT_COLS.search(name):
            local += p.numel() // tensor
        else:
            local += p.numel()
    split = parameter_split(model.cfg, tensor)
    assert split["total"] == count_parameters(model)
    assert split["local"] == local


def test_presets_3b_8b_sizes():
    assert 2.9e9 < count_parameters(_meta("mdlm-3b")) < 3.2e9
    assert 7.8e9 < count_parameters(_meta("mdlm-8b")) < 8.8e9
    for name in ("mdlm-3b", "mdlm-8b"):
        p = PRESETS[name]
        assert p["d_model"] // p["n_heads"] == 128 and p["n_heads"] % 8 == 0 and p["n_layers"] % 8 == 0


def test_estimate_follows_the_formulas():
    cfg = model_config("mdlm-8b")
    est = estimate(cfg, tensor=4, zero_stage=3, micro_batch=4, seq_len=1024, gpus=64)
    p = parameter_split(cfg, 4)["local"]
    assert est.data == 16 and est.params_per_gpu == p
    assert est.weights_gib == pytest.approx(2 * p / 16 / GIB)
    assert est.grads_gib == pytest.approx(4 * p / 16 / GIB)   # accumulated in fp32 (train.grad_precision)
    assert estimate(cfg, 4, 3, 4, 1024, 64, grad_precision="bf16").grads_gib == pytest.approx(2 * p / 16 / GIB)
    # ZeRO-1, whole: the fp32 buffer, plus the bf16 gradients where they are kept between micro-batches
    zero1 = estimate(cfg, 4, 1, 4, 1024, 64)
    assert zero1.grads_gib == pytest.approx(4 * p / GIB) and zero1.activations_gib > 2 * p / GIB
    assert estimate(cfg, 4, 1, 4, 1024, 64, fuse_grad_update=False).grads_gib == pytest.approx(6 * p / GIB)
    # fused, the bf16 gradients count where they outgrow what the backward frees
    small = estimate(cfg, 4, 1, 1, 16, 64)
    assert small.grads_gib == pytest.approx(6 * p / GIB - small.activations_gib)
    assert est.optimizer_gib == pytest.approx(12 * p / 16 / GIB)
    assert est.ema_gib == pytest.approx(4 * p / 16 / GIB)  # ZeRO 1-3 partition the EMA too
    assert estimate(cfg, 4, 2, 4, 1024, 64).ema_gib == pytest.approx(4 * p / 16 / GIB)
    assert estimate(cfg, 4, 0, 4, 1024, 64).ema_gib == pytest.approx(4 * p / GIB)
    t, d, v = 4 * 1024, 4096, 50258
    per_layer = 8 * t * d + 6 * 2 * t * d + 2 * 2 * t * d + 15 * 2 * t * d / 4
    assert est.activations_gib == pytest.approx((40 * per_layer + 4 * t * v + 4 * t * d + 4 * t * d) / GIB)
    for stage, sharded in ((0, ()), (1, ("optimizer",)), (2, ("optimizer", "grads")),
                           (3, ("optimizer", "grads", "weights"))):
        e = estimate(cfg, 4, stage, 4, 1024, 64, grad_precision="bf16")
        for part, per_param in (("weights", 2), ("grads", 2), ("optimizer", 12)):
            expect = per_param * p / (16 if part in sharded else 1) / GIB
            assert getattr(e, f"{part}_gib") == pytest.approx(expect)
    # evaluation builds the whole plain model in fp32 on every rank, next to the training states
    full = parameter_split(cfg, 4)["total"]
    assert est.eval_model_gib == pytest.approx(4 * full / GIB)
    assert est.eval_peak_gib == pytest.approx(est.total_gib - est.activations_gib + 4 * full / GIB)
    # more tensor parallelism, fewer activation bytes per GPU; micro-batch scales them linearly
    assert estimate(cfg, 8, 3, 4, 1024, 64).activations_gib < est.activations_gib
    assert activation_bytes(cfg, 4, 8, 1024) == pytest.approx(2 * activation_bytes(cfg, 4, 4, 1024))


def test_model_states_match_measured_cpu_memory():
    """fp32, ZeRO-0, one GPU: weights + gradients + AdamW states as torch holds them."""
    cfg = model_config("custom", n_layers=2, d_model=64, n_heads=4, cond_dim=32, vocab_size=101)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(torch.randint(0, 100, (2, 16)), torch.rand(2))
    out.loss.backward()
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    est = estimate(cfg, 1, 0, 2, 16, 1, precision="fp32", ema=False)
    assert est.weights_gib * GIB == weights
    assert est.grads_gib * GIB == grads
    assert est.optimizer_gib * GIB == states


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activations_match_saved_tensors(dropout):
    """fp32 on CPU: bytes of the distinct storages autograd saves for backward."""
    cfg = model_config("custom", n_layers=3, d_model=128, n_heads=4, cond_dim=64, dropout=dropout,
                       vocab_size=300, mask_token_id=299)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    b, s = 4, 64
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 299, (b, s)), torch.rand(b))
    measured = sum(seen.values())
    predicted = activation_bytes(cfg, 1, b, s, act_bytes=4)
    print(f"activations: measured {measured} B, predicted {predicted:.0f} B ({measured / predicted - 1:+.1%})")
    assert abs(measured / predicted - 1) < 0.05


def test_cli():
    proc = subprocess.run([sys.executable, "-m", "pipeline.memory", "--preset", "mdlm-8b", "--tensor", "4",
                           "--zero-stage", "3", "--micro-batch", "4", "--seq-len", "1024", "--gpus", "64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TP=4 x DP=16, ZeRO-3" in proc.stdout and "total" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline.memory", "--tensor", "3", "--gpus", "64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "must divide" in bad.stderr


def test_precisions_count_master_copies():
    cfg = model_config("mdlm-1b", vocab_size=50258)
    p = parameter_split(cfg, 1)["local"]
    bf16 = estimate(cfg, 1, 2, 8, 1024, 8, precision="bf16", ema=False)
    mixed = estimate(cfg, 1, 2, 8, 1024, 8, precision="bf16-mixed", ema=False)
    assert bf16.weights_gib == pytest.approx(2 * p / GIB) and mixed.weights_gib == pytest.approx(4 * p / GIB)
    assert mixed.optimizer_gib == pytest.approx(12 * p / 8 / GIB)  # ZeRO's fp32 copy + Adam m, v, over 8
    assert mixed.activations_gib == bf16.activations_gib
    mixed_z3 = estimate(cfg, 1, 3, 8, 1024, 8, precision="bf16-mixed", ema=False)
    assert mixed_z3.optimizer_gib == pytest.approx(8 * p / 8 / GIB)  # ZeRO-3 updates fp32 partitions in place
    fp32_plain = estimate(cfg, 1, 0, 8, 1024, 1, precision="fp32", ema=False)
    assert fp32_plain.optimizer_gib == pytest.approx(8 * p / GIB)  # no ZeRO: Adam m and v only
