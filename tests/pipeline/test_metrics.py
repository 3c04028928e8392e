from __future__ import annotations

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
