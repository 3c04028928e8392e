from __future__ import annotations

import math

import pytest
import torch

from model.config import model_config
from model.mdlm import build_model
from pipeline import metrics


def test_flops_formula_for_the_small_preset():
    with torch.device("meta"):
        model = build_model(model_config("mdlm-small"))
    n, c = metrics.matmul_params(model), metrics.conditioning_params(model)
    # per token: 12 blocks x (qkv 3d^2 + out d^2 + mlp 8d^2) + head; per sequence: the timestep
    # MLP and the adaLN projections (12 blocks x 128*6d, final 128*2d)
    d, v = 768, 50258
    assert n == 12 * 12 * d * d + d * v
    assert c == (256 * 128 + 128 * 128) + 12 * 128 * 6 * d + 128 * 2 * d
    per_token = metrics.flops_per_token(n, 12, d, 1024, conditioning=c)
    assert per_token == 6 * n + 6 * c / 1024 + 12 * 12 * d * 1024
    # attention is counted in full (bidirectional): ~ 113M of the ~ 0.87 GFLOP per token
    assert abs(12 * 12 * d * 1024 / per_token - 0.130) < 0.01


@pytest.mark.parametrize("masked_logits_only", [False, True])
def test_flops_formula_matches_counted_flops(masked_logits_only):
    """torch's FLOP counter over a real forward and backward of the tiny preset: the matmuls it
    counts plus the attention term equal the formula (the head on the masked positions only, the
    adaLN projections once per sequence)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model_config("mdlm-tiny", vocab_size=512, masked_logits_only=masked_logits_only)
    model = build_model(cfg)
    batch, seq_len = 4, 256
    x0 = torch.randint(0, 511, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 0.5)   # about half the positions masked
    noise = torch.rand(x0.shape, generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as counter:
        model(x0, t, noise=noise).loss.backward()
    counted = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counted.items() if "scaled_dot_product" not in str(op))
    masked = int(model.corrupt(x0, t, noise=noise)[1].sum())
    head = cfg.d_model * cfg.vocab_size
    n, c = metrics.matmul_params(model), metrics.conditioning_params(model)
    fraction = masked / (batch * seq_len) if masked_logits_only else 1.0
    expected = metrics.flops_per_token(n, cfg.n_layers, cfg.d_model, seq_len, head, fraction, c)
    attention = 12 * cfg.n_layers * cfg.d_model * seq_len
    per_token = matmul / (batch * seq_len) + attention
    assert per_token == pytest.approx(expected, rel=1e-3)  # counting adaLN per token: +23%


def test_peak_is_unknown_on_cpu():
    assert metrics.peak_flops(torch.device("cpu")) is None
    assert metrics.peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12       # SXM
    assert metrics.peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert metrics.peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert metrics.peak_flops_of("NVIDIA H200") == 989e12
    assert metrics.peak_flops_of("NVIDIA GeForce RTX 4090") is None
    assert metrics.memory_gb(torch.device("cpu")) > 0


def test_the_head_is_counted_on_the_tokens_it_runs_on():
    cfg = model_config("mdlm-small")
    with torch.device("meta"):
        n = metrics.matmul_params(build_model(cfg))
    head = 768 * 50258
    # log-linear: m(t) = t, t uniform on [eps, 1]
    assert metrics.head_token_fraction(cfg) == pytest.approx((1 + 1e-3) / 2, abs=1e-9)
    assert metrics.model_flops_per_token(cfg, n, 1024) == pytest.approx(
        6 * (n - head) + 6 * head * (1 + 1e-3) / 2 + 12 * 12 * 768 * 1024)
    # cosine: E[1 - cos(pi t / 2)] = 1 - 2 / pi (the normalisation 1 / (1 - eps) aside)
    assert metrics.head_token_fraction(model_config("mdlm-small", noise_schedule="cosine")) == pytest.approx(
        1 - 2 / math.pi, abs=2e-3)
    full = metrics.flops_per_token(n, 12, 768, 1024)
    for other in (model_config("mdlm-small", masked_logits_only=False), model_config("mdlm-small", objective="ar")):
        assert metrics.head_token_fraction(other) == 1.0
        assert metrics.model_flops_per_token(other, n, 1024) == full


def test_fp8_linears_keep_their_flops():
    """A model whose block linears were swapped for Transformer Engine's Linear (not an nn.Linear)
    counts the same matmul FLOPs; a stand-in class from that package path plays TE's role here."""
    from pipeline.precision import fp8_linear_names

    te_linear = type("Linear", (torch.nn.Module,), {"__module__": "transformer_engine.pytorch.module.linear"})
    model = build_model(model_config("mdlm-tiny", vocab_size=64))
    expected = metrics.matmul_params(model)
    for name in fp8_linear_names(model):
        parent, _, child = name.rpartition(".")
        old = getattr(model.get_submodule(parent), child)
        new = te_linear()
        new.weight = torch.nn.Parameter(old.weight.detach().clone())
        setattr(model.get_submodule(parent), child, new)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("attn_qkv"))
    assert metrics.matmul_params(model) == expected
    assert not metrics.is_linear(torch.nn.LayerNorm(8)) and not metrics.is_linear(torch.nn.Embedding(4, 8))
