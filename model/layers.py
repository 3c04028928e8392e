"""Layer factory: the one place that chooses how the backbone's projections are implemented.

The backbone asks for `linear(in, out, bias, role)` and `embedding(num, dim, init)`; a factory
answers with plain torch layers (default) or another implementation (tensor-parallel, FP8)
without the model branching on it. `role` names the projection (attn_qkv, attn_out, mlp_in,
mlp_out, output) so a factory can keep some of them in higher precision or shard them
differently. A tensor-parallel factory splits attention heads over `tensor_parallel_size`
ranks: the backbone asks `local_heads(n_heads)` for the heads this rank computes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LayerFactory:
    name = "base"
    tensor_parallel_size = 1

    def linear(self, in_features: int, out_features: int, bias: bool, role: str) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def embedding(self, num_embeddings: int, dim: int,
                  init: Callable[[torch.Tensor], object] | None = None) -> nn.Module:
        emb = nn.Embedding(num_embeddings, dim)
        if init is not None:
            init(emb.weight)
        return emb

    def local_heads(self, n_heads: int) -> int:
        if n_heads % self.tensor_parallel_size:
            raise ValueError(f"{n_heads} attention heads do not split over "
                             f"{self.tensor_parallel_size} tensor-parallel ranks")
        return n_heads // self.tensor_parallel_size


# The output head's width is padded to a multiple of this (of this x TP under tensor parallelism):
# cuBLAS needs 16-byte aligned rows for its fast kernels, and tiles of 128 waste nothing.
HEAD_MULTIPLE = 128


class TorchLayers(LayerFactory):
    """Plain torch layers; the output head computes on a weight padded to `head_multiple` rows."""
    name = "torch"

    def __init__(self, head_multiple: int = HEAD_MULTIPLE):
        self.head_multiple = head_multiple

    def linear(self, in_features: int, out_features: int, bias: bool, role: str) -> nn.Module:
        if role == "output" and out_features % self.head_multiple:
            return AlignedHeadLinear(in_features, out_features, bias=bias, multiple=self.head_multiple)
        return super().linear(in_features, out_features, bias, role)


class AlignedHeadLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose matmuls run on its weight padded with
    zero rows to a multiple of `multiple` output features, the padded outputs cut off.

    With an odd vocabulary (GPT-2's 50257 + [MASK] = 50258) the logits' row stride is 4-byte
    aligned only, and cuBLAS falls back to slow unaligned kernels for the head's three matmuls:
    on one H200 they ran at ~250 TFLOP/s, 8% of an mdlm-1b step (bench/gpu/README.md). The pad
    costs one copy of the (bf16) weight per forward and nothing in the checkpoints. Below
    `min_rows` rows (decoding a few sequences) the matmul is bound by reading the weight, which
    alignment does not change, and the copy would cost more than it saves: plain nn.Linear then."""

    min_rows = 1024

    def __init__(self, in_features: int, out_features: int, bias: bool = True, multiple: int = 128):
        super().__init__(in_features, out_features, bias=bias)
        self.padded_features = -(-out_features // multiple) * multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.min_rows * self.in_features:
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):  # pad the bf16 copy, not the fp32 master
            dtype = torch.get_autocast_dtype(x.device.type)
            weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
        pad = self.padded_features - self.out_features
        weight = F.pad(weight, (0, 0, 0, pad))
        bias = F.pad(bias, (0, pad)) if bias is not None else None
        return F.linear(x, weight, bias)[..., :self.out_features]
