"""Adapters applied by the trainer: activation checkpointing, per-block compile and the attention
kernel preference on the model; the fused gradient update on DeepSpeed's engine.

All keep the state-dict keys of the plain model, so checkpoints move freely between settings."""
from __future__ import annotations

import contextlib
import inspect
import logging

import torch
from torch import nn

from .configtools import ConfigError

ATTENTION_BACKENDS = ("default", "cudnn", "flash", "efficient")
log = logging.getLogger("mdlm.adapters")


@contextlib.contextmanager
def attention_backend(name: str):
    """Prefer one of scaled_dot_product_attention's fused kernels: 'cudnn' (cuDNN's fused
    attention, the kernel behind Transformer Engine's FusedAttention), 'flash' or 'efficient'.
    The other kernels stay enabled, after it, for shapes or devices it cannot serve (a CPU runs
    its own kernels whatever is preferred). 'default' keeps torch's order (flash first). Enter it
    before the first forward: a compiled block fixes its attention kernel when it is traced."""
    if name == "default":
        yield
        return
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend '{name}' is not one of {', '.join(ATTENTION_BACKENDS)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        raise ConfigError(f"train.attention_backend={name} needs torch's sdpa_kernel(set_priority=...), "
                          f"which torch {torch.__version__} lacks: upgrade torch or use 'default'")
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    priority = torch._C._get_sdp_priority_order()
    current = sorted((b for b in SDPBackend.__members__.values() if int(b) in priority), key=lambda b: priority.index(int(b)))
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel([first, *(b for b in current if b != first)], set_priority=True))
        # the kernel is fixed when AOTAutograd traces a compiled block, and its on-disk cache key
        # holds neither the priority nor the enabled kernels: a graph traced under another
        # preference (by an earlier run, or an earlier bench mode) would come back from it
        if hasattr(torch.compiler.config, "cache_key_tag"):
            tag = torch.compiler.config.cache_key_tag
            stack.enter_context(torch.compiler.config.patch(cache_key_tag=f"{tag}-sdpa-{name}" if tag else f"sdpa-{name}"))
        else:  # older torch: no tag to tell the entries apart
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        yield


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no backbone.blocks ModuleList to adapt")
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in backward instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return len(blocks)


def compile_blocks(model: nn.Module, **options) -> int:
    """torch.compile each block's forward in place (one graph per block: fast to compile, robust to
    the un-compilable parts around them, same state-dict keys). The module call around it, with
    its hooks, stays eager: ZeRO-3 gathers a block's parameters in hooks that dynamo would otherwise
    trace and recompile for every block (see zero3_leaf_blocks)."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)
    return len(blocks)


def zero3_leaf_blocks(model: nn.Module) -> int:
    """Have ZeRO-3 gather each block's parameters in one hook on the block, none inside it, so a
    compiled block forward holds no DeepSpeed code (call before deepspeed.initialize)."""
    from deepspeed.utils import set_z3_leaf_modules

    blocks = transformer_blocks(model)
    return len(set_z3_leaf_modules(model, [type(blocks[0])]))


def plain_name(name: str) -> str:
    """Parameter name as the plain model has it (wrappers add path components)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def fuse_bf16_grad_update(engine) -> bool:
    """DeepSpeed's BF16_Optimizer (bf16 weights, fp32 gradients: ZeRO-1 here) keeps the bf16
    gradients between micro-batches: it zero-fills them before each backward, so autograd adds
    into them, then adds each into its fp32 copy as a cast followed by an add. Replaced by one
    foreach add after the backward (on a GPU one mixed-dtype add kernel per parameter, reading the
    bf16 gradient once, no fp32 temporary), the bf16 gradients dropped: autograd then writes the
    next ones without a fill or an add, and they are not held through the forward. The fp32 sums
    are bit for bit those of DeepSpeed's code. Returns False, changing nothing, for other
    optimizers, for immediate_grad_update (its hooks do the update) and where the DeepSpeed
    internals differ."""
    try:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    except ImportError:
        return False
    opt = engine.optimizer
    if not isinstance(opt, BF16_Optimizer) or getattr(opt, "immediate_grad_update", False):
        return False
    internals = ("bf16_groups", "fp32_groups_gradients", "fp32_groups_has_gradients", "update_hp_grads")
    if any(not hasattr(opt, name) for name in internals) or getattr(opt, "autoep_folding_tp_group", None) is not None:
        log.warning("this DeepSpeed's BF16_Optimizer is not the one train.fuse_grad_update was written for "
                    "(it lacks one of %s, or folds expert gradients): its own gradient update is kept",
                    ", ".join(internals))
        return False

    @torch.no_grad()
    def update_hp_grads(clear_lp_grads: bool = False) -> None:
        hp_grads, lp_grads = [], []
        for i, group in enumerate(opt.bf16_groups):
            for j, param in enumerate(group):
                if param.grad is None:
                    continue
                hp_grad = opt.fp32_groups_gradients[i][j]
                hp_grads.append(hp_grad)
                lp_grads.append(param.grad.view(hp_grad.shape))
                param._hp_grad = hp_grad
                opt.fp32_groups_has_gradients[i][j] = True
                param.grad = None
        if hp_grads:
            torch._foreach_add_(hp_grads, lp_grads)

    opt.update_hp_grads = update_hp_grads
    return True


def guard_non_finite_steps(engine) -> bool:
    """Where DeepSpeed steps a plain torch optimizer (ZeRO-0 with fp32 weights: fp32 and
    bf16-mixed), it applies every update, NaN gradients included, and reports no gradient norm.
    Here the step is skipped (the schedule stays, as under ZeRO's own overflow check) when the
    gradients' global norm is not finite, and that norm, before clipping, is what
    get_global_grad_norm() reports. Returns False, changing nothing, where the optimizer checks
    overflow itself."""
    import math

    from deepspeed.runtime.utils import clip_grad_norm_

    opt = engine.optimizer
    if hasattr(opt, "overflow"):
        return False
    inner_step, measured = opt.step, []

    def with_grads() -> list:
        return [p for p in engine.module.parameters() if p.grad is not None]

    def clip_and_measure() -> None:  # what engine.clip_fp32_gradients does, keeping the norm it returns
        measured.append(float(clip_grad_norm_(parameters=with_grads(), max_norm=engine.gradient_clipping(),
                                              mpu=engine.mpu)))

    def step(*args, **kwargs):
        if not measured:  # no clipping configured: measure only
            measured.append(float(clip_grad_norm_(parameters=with_grads(), max_norm=float("inf"), mpu=engine.mpu)))
        norm = measured.pop()
        measured.clear()
        opt._global_grad_norm = norm
        opt.overflow = not math.isfinite(norm)
        if opt.overflow:
            return None
        return inner_step(*args, **kwargs)

    engine.clip_fp32_gradients = clip_and_measure
    opt.step = step
    opt.overflow = False
    return True
