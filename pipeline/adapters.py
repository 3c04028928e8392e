"""Model-level adapters applied by the trainer: activation checkpointing and per-block compile.

Both keep the state-dict keys of the plain model, so checkpoints move freely between settings."""
from __future__ import annotations

import torch
from torch import nn


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
