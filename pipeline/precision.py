"""FP8 training adapters (torchao float8 or Transformer Engine) and their preconditions.

FP8 applies to the transformer blocks' projections only; the embedding, the output head, the
adaLN and timestep MLPs stay in bf16 (small, and sensitive to range). Everything is checked
before any work: backend importable, GPU compute capability >= 8.9, dimensions divisible by 16.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .configtools import ConfigError

BLOCK_LINEARS = ("attn_qkv", "attn_out", "mlp_in", "mlp_out")


@dataclass
class FP8Config:
    backend: Literal["torchao", "te"] = "torchao"
    # "" = the backend's default: tensorwise (torchao) or delayed scaling (TE)
    # torchao: tensorwise (one scale per tensor), rowwise (per row), rowwise_with_gw_hp (rowwise,
    # the weight-gradient matmul in bf16, the weight's cast for the input gradient tensorwise)
    recipe: Literal["", "tensorwise", "rowwise", "rowwise_with_gw_hp", "delayed", "current"] = ""
    amax_history_len: int = 16             # TE delayed scaling
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    # TE delayed scaling: all-reduce the amaxes over every rank each step, so the scales agree
    # across data-parallel replicas (and tensor-parallel shards); false keeps them per rank (a
    # resume then restores the scaling state saved with the weights: DP rank 0's on every rank,
    # or each rank's own under ZeRO-3). The other recipes scale from the current tensor and have
    # nothing to reduce.
    reduce_amax: bool = True
    keep_first_last_block_bf16: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        valid = {"torchao": ("tensorwise", "rowwise", "rowwise_with_gw_hp"), "te": ("delayed", "current")}
        self.recipe = self.recipe or valid[self.backend][0]
        if self.recipe not in valid[self.backend]:
            raise ConfigError(f"fp8.recipe '{self.recipe}' does not apply to fp8.backend '{self.backend}'; "
                              f"choose one of {', '.join(valid[self.backend])}")
        if self.amax_history_len < 1:
            raise ConfigError(f"fp8.amax_history_len={self.amax_history_len}: delayed scaling keeps at least "
                              f"the last amax; use 1 or more (default 16)")
        if not self.reduce_amax and self.recipe != "delayed":
            raise ConfigError(f"fp8.reduce_amax=false applies to the TE 'delayed' recipe only; recipe "
                              f"'{self.recipe}' scales from the current tensor: drop the setting")


def backend_available(backend: str) -> tuple[bool, str]:
    """(importable, reason). Transformer Engine cannot even be imported without a GPU driver."""
    try:
        if backend == "te":
            import transformer_engine.pytorch  # noqa: F401
        else:
            import torchao.float8  # noqa: F401
    except Exception as err:  # ImportError, or TE's OSError about missing CUDA libraries
        pkg = "transformer-engine[pytorch]" if backend == "te" else "torchao"
        return False, f"{backend} is not importable ({type(err).__name__}: {err}); install it with pip install '{pkg}'"
    return True, ""


def check_fp8(fp8: FP8Config, d_model: int, mlp_ratio: int, tokens_per_micro_batch: int,
              device: torch.device, tensor_parallel: int = 1, autoregressive: bool = False) -> None:
    """Raise ConfigError naming the first precondition that fails."""
    if device.type != "cuda":
        raise ConfigError("train.precision=fp8 needs an NVIDIA GPU with compute capability >= 8.9 "
                          "(H100/H200/L40S/RTX 4090); this process has no GPU: use bf16 or fp32")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ConfigError(f"train.precision=fp8 needs compute capability >= 8.9; "
                          f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}: use bf16")
    check_fp8_shapes(d_model, mlp_ratio, tokens_per_micro_batch, tensor_parallel, autoregressive)
    ok, reason = backend_available(fp8.backend)
    if not ok:
        raise ConfigError(f"fp8.backend={fp8.backend}: {reason}")
    if fp8.backend == "te":
        import transformer_engine
        from transformer_engine.common import recipe

        name, _ = te_recipe_spec(fp8)
        if not hasattr(recipe, name):
            raise ConfigError(f"fp8.recipe={fp8.recipe} needs Transformer Engine's {name}, which TE "
                              f"{getattr(transformer_engine, '__version__', '?')} lacks: upgrade TE or use "
                              f"fp8.recipe=delayed")


def check_fp8_shapes(d_model: int, mlp_ratio: int, tokens_per_micro_batch: int, tensor_parallel: int = 1,
                     autoregressive: bool = False) -> None:
    """Every FP8 matmul operand's dimensions are multiples of 16 (the token count is the inner
    dimension of the weight-gradient matmul); under tensor parallelism the projections see
    d_model / TP and MLP width / TP on each rank. `tokens_per_micro_batch` is what the blocks see:
    micro-batch x (seq_len - 1) for the AR model, which predicts from all tokens but the last."""
    tp = f" / parallel.tensor {tensor_parallel}" if tensor_parallel > 1 else ""
    for name, value in ((f"model.d_model{tp}", d_model / tensor_parallel),
                        (f"MLP width{tp}", d_model * mlp_ratio / tensor_parallel)):
        if value % 16:
            raise ConfigError(f"fp8 matmuls need {name} divisible by 16 (got {value:g})")
    if tokens_per_micro_batch % 16 and autoregressive:
        raise ConfigError(f"fp8 matmuls need data.micro_batch_size x (seq_len - 1) divisible by 16 (got "
                          f"{tokens_per_micro_batch}): the AR model's blocks see all positions but the last; use "
                          f"a micro-batch that is a multiple of 16, or data prepared with one more token per sequence")
    if tokens_per_micro_batch % 16:
        raise ConfigError(f"fp8 matmuls need data.micro_batch_size x seq_len divisible by 16 (got "
                          f"{tokens_per_micro_batch}): change the micro-batch or the data's seq_len")


def fp8_linear_names(model: nn.Module, keep_first_last_block_bf16: bool = False) -> list[str]:
    """Fully qualified names of the block projections that run in FP8."""
    blocks = [n for n, _ in model.named_modules() if re.search(r"(^|\.)blocks\.\d+$", n)]
    if keep_first_last_block_bf16 and len(blocks) <= 2:
        raise ConfigError(f"fp8.keep_first_last_block_bf16 with {len(blocks)} block(s) would leave no block in "
                          f"FP8: turn it off or use train.precision=bf16")
    skip = {blocks[0], blocks[-1]} if keep_first_last_block_bf16 else set()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
            if not any(name.startswith(b + ".") for b in skip):
                names.append(name)
    return names


def apply_fp8(model: nn.Module, fp8: FP8Config, device: torch.device | None = None) -> list[str]:
    """Convert the selected linears in place; returns their names. TE's layers are built on
    `device` (the training GPU; default: where the old weights are), as TE expects."""
    names = set(fp8_linear_names(model, fp8.keep_first_last_block_bf16))
    if fp8.backend == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=lambda _m, fqn: fqn in names,
                                   config=Float8LinearConfig.from_recipe_name(fp8.recipe))
        return sorted(names)
    linear = te_linear_class()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old: nn.Linear = getattr(parent, child)
        new = linear(old.in_features, old.out_features, bias=old.bias is not None,
                     params_dtype=old.weight.dtype, device=device or old.weight.device)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, child, new)
    return sorted(names)


def te_linear_class():
    """te.Linear that reuses its FP8 weight copy over a step's micro-batches: the trainer sets
    is_first_microbatch=True before each step's first micro-batch (the weights change only at
    optimizer steps), as megatron-core's TE layers do; None (the default) casts at every call."""
    import transformer_engine.pytorch as te

    class CachedWeightLinear(te.Linear):
        is_first_microbatch: bool | None = None

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            first = self.is_first_microbatch
            if first:
                self.is_first_microbatch = False
            return super().forward(inp, is_first_microbatch=first)

    return CachedWeightLinear


def te_recipe_spec(fp8: FP8Config) -> tuple[str, dict]:
    """The transformer_engine.common.recipe class name and its arguments for `fp8`."""
    if fp8.recipe == "delayed":
        return "DelayedScaling", {"amax_history_len": fp8.amax_history_len,
                                  "amax_compute_algo": fp8.amax_compute_algo, "reduce_amax": fp8.reduce_amax}
    return "Float8CurrentScaling", {}


def te_autocast(fp8: FP8Config, group=None):
    """The context every forward runs under with the TE backend; amaxes are reduced over `group`
    (None: all ranks, i.e. the data-parallel and tensor-parallel groups together)."""
    if fp8.backend != "te":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    name, kwargs = te_recipe_spec(fp8)
    scaling = getattr(recipe, name)(**kwargs)
    if hasattr(te, "autocast"):  # TE >= 2.9; fp8_autocast is deprecated there
        return te.autocast(enabled=True, recipe=scaling, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=scaling, fp8_group=group)
