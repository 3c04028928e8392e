"""Training FLOPs, MFU and memory.

FLOPs per trained token = 6 * (N - H) + 6 * H * f + 6 * C / seq_len + 12 * n_layers * d_model *
seq_len, where N counts the matmul weights applied to every token (block projections and the
output head, not the input embedding, which is a lookup), H is the output head's weight count and
f the fraction of tokens the head runs on, C counts the conditioning weights (the timestep MLP and
every adaLN projection), which run once per sequence on its timestep embedding, and the last term
is attention scores and values (QK^T and AV, 2 matmuls of 2*L*d FLOPs each per token forward, x3
for forward+backward). MDLM attention is bidirectional,
so it is counted in full (no causal halving); we count AR the same way so the two compare.
MDLM computes logits at masked positions only (model.masked_logits_only), so f is the expected
mask rate E[m(t)] over the training times (0.5 for log-linear): FLOPs that are not computed are
not counted. f = 1 for AR and for a head run everywhere.
"""
from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from model.config import ModelConfig
from model.dit import is_conditioning
from model.noise import make_schedule

# dense bf16 peaks by device name, the most specific name first: torch names the H100 SXM
# "NVIDIA H100 80GB HBM3", the PCIe and NVL cards "NVIDIA H100 PCIe" / "NVIDIA H100 NVL"
PEAK_TFLOPS_BF16 = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
                    ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0), ("A5000", 111.0))


def matmul_params(model: nn.Module) -> int:
    """Weights of the matmuls applied to every token: every linear layer except the conditioning
    ones (embedding tables, norms and biases are no matmul weights)."""
    return sum(m.weight.numel() for n, m in model.named_modules() if is_linear(m) and not is_conditioning(n))


def conditioning_params(model: nn.Module) -> int:
    """Weights of the linear layers that run once per sequence, on its timestep embedding."""
    return sum(m.weight.numel() for n, m in model.named_modules() if is_linear(m) and is_conditioning(n))


def is_linear(module: nn.Module) -> bool:
    """nn.Linear and its subclasses (torchao's Float8Linear), and Transformer Engine's Linear and
    its subclasses (pipeline/precision.py's CachedWeightLinear), which are not nn.Linear."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    from_te = any(cls.__module__.startswith("transformer_engine.") for cls in type(module).__mro__)
    return from_te and isinstance(weight, torch.Tensor) and weight.ndim == 2


def flops_per_token(n_matmul_params: int, n_layers: int, d_model: int, seq_len: int,
                    head_params: int = 0, head_fraction: float = 1.0, conditioning: int = 0) -> float:
    return (6.0 * (n_matmul_params - head_params) + 6.0 * head_params * head_fraction
            + 6.0 * conditioning / seq_len + 12.0 * n_layers * d_model * seq_len)


def head_token_fraction(cfg: ModelConfig) -> float:
    """Fraction of trained tokens that go through the output head (see the module docstring)."""
    if cfg.objective != "mdlm" or not cfg.masked_logits_only:
        return 1.0
    return make_schedule(cfg.noise_schedule, cfg.noise_eps).mean_mask_prob(cfg.noise_eps)


def model_flops_per_token(cfg: ModelConfig, n_matmul_params: int, seq_len: int, conditioning: int = 0) -> float:
    """flops_per_token for a DiT of `cfg` whose per-token matmul weights (full, not per TP rank)
    number `n_matmul_params` and conditioning weights `conditioning`; the head is d_model x vocab_size."""
    return flops_per_token(n_matmul_params, cfg.n_layers, cfg.d_model, seq_len,
                           cfg.d_model * cfg.vocab_size, head_token_fraction(cfg), conditioning)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the current GPU in FLOP/s, or None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS_BF16:
        if key in device_name:
            return tflops * 1e12
    return None


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform != "darwin" else rss / 2**30
