"""Layer factory: the one place that chooses how the backbone's projections are implemented.

The backbone asks for `linear(in, out, bias, role)`; a factory answers with plain torch layers
(default) or another implementation (tensor-parallel, FP8) without the model branching on it.
`role` names the projection (attn_qkv, attn_out, mlp_in, mlp_out, output) so a factory can keep
some of them in higher precision or shard them differently.
"""
from __future__ import annotations

from torch import nn


class LayerFactory:
    name = "base"

    def linear(self, in_features: int, out_features: int, bias: bool, role: str) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)


class TorchLayers(LayerFactory):
    name = "torch"
