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
    n = metrics.matmul_params(model)
    # 12 blocks x (qkv 3d^2 + out d^2 + mlp 8d^2 + adaLN 128*6d) + sigma MLP + final adaLN + head
    d, v = 768, 50258
    expected = 12 * (12 * d * d + 128 * 6 * d) + (256 * 128 + 128 * 128) + 128 * 2 * d + d * v
    assert n == expected
    per_token = metrics.flops_per_token(n, 12, d, 1024)
    assert per_token == 6 * expected + 12 * 12 * d * 1024
    # attention is counted in full (bidirectional): ~ 113M of the ~ 0.88 GFLOP per token
    assert abs(12 * 12 * d * 1024 / per_token - 0.128) < 0.01


def test_peak_is_unknown_on_cpu():
    assert metrics.peak_flops(torch.device("cpu")) is None
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
