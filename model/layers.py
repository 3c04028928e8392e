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


class TorchLayers(LayerFactory):
    name = "torch"
