"""Training FLOPs, MFU and memory.

FLOPs per trained token = 6 * N + 12 * n_layers * d_model * seq_len, where N counts every
matmul weight (all block projections, adaLN and the output head, but not the input embedding,
which is a lookup) and the second term is attention scores and values (QK^T and AV, 2 matmuls of
2*L*d FLOPs each per token forward, x3 for forward+backward). MDLM attention is bidirectional,
so it is counted in full (no causal halving); we count AR the same way so the two compare.
"""
from __future__ import annotations

import resource
import sys

import torch
from torch import nn

PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "A5000": 111.0}


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls: everything except embedding tables, norms, biases."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
    return total


def flops_per_token(n_matmul_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    return 6.0 * n_matmul_params + 12.0 * n_layers * d_model * seq_len


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the current GPU in FLOP/s, or None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12
    return None


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform != "darwin" else rss / 2**30
