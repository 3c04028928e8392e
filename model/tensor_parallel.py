"""Tensor parallelism (Megatron-style) for the DiT through megatron-core's tensor-parallel layers.

`MegatronTPLayers` is a layer factory (model/layers.py): the backbone code is the same at any
tensor-parallel size. Sharding by role:

  attn_qkv, mlp_in   ColumnParallelLinear (output features split; qkv split per q, k, v so every
                     rank holds whole heads: the attention runs on n_heads / TP local heads)
  attn_out, mlp_out  RowParallelLinear (input features split, output all-reduced, bias replicated)
  output             ColumnParallelLinear with gather_output=True: every rank gets the full
                     (B, L, V) logits, so SUBS (zero-masking, carry-over) and the loss are the
                     plain code. A vocab-parallel cross-entropy would save the gather and the
                     replicated (B, L, V) buffer; it is not used because SUBS edits the logits
                     of the [MASK] column and of unmasked rows, which then needs its own kernel.
  embedding          VocabParallelEmbedding
  anything else      plain torch (replicated: norms, adaLN, timestep MLP)

The vocabulary is padded to a multiple of TP for the embedding and of 128 x TP for the output
head (whose per-rank matmuls then run on aligned, full tiles: model/layers.py); padded logits are
cut off before anyone sees them and padded rows never get a gradient. Checkpoints hold the
unpadded tensors once merged (pipeline/convert_tp.py).

Initialisation: each sharded layer is first built as the plain torch layer (drawing from the
same RNG stream, in the same order, as the plain model), then this rank's slice is copied into
the megatron-core layer. A TP=N model therefore starts from exactly the TP=1 weights for the
same seed, and only one full layer exists at a time. `shard_state_dict` / `merge_state_dicts`
move whole checkpoints between layouts (pipeline/convert_tp.py).

With train.precision=fp8 and Transformer Engine importable, the four block projections use
megatron-core's TE-backed layers (TEColumnParallelLinear / TERowParallelLinear) instead.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .dit import is_conditioning
from .layers import HEAD_MULTIPLE, LayerFactory

COLUMN_ROLES = ("attn_qkv", "mlp_in", "output")
ROW_ROLES = ("attn_out", "mlp_out")
EXTRA_STATE = "_extra_state"


def padded_size(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)


# ---- sharding specs ----------------------------------------------------------------------------
# A spec says how one full tensor maps to TP shards: split along `dim`, after cutting it into
# `chunks` equal parts (qkv: 3), each part split evenly over the ranks; `size` is the full
# (unpadded) extent along `dim`; the padded extent is a multiple of `multiple` x TP (only for
# chunks == 1).

def _spec(dim: int, chunks: int, size: int, multiple: int = 1) -> dict:
    return {"dim": dim, "chunks": chunks, "size": size, "multiple": multiple}


def shard_tensor(full: torch.Tensor, spec: dict, rank: int, tp: int) -> torch.Tensor:
    dim, chunks, size = spec["dim"], spec["chunks"], spec["size"]
    if full.shape[dim] != size:
        raise ValueError(f"tensor has {full.shape[dim]} along dim {dim}, the spec says {size}")
    padded = padded_size(size, tp * spec.get("multiple", 1))
    if chunks == 1 and padded != size:
        pad = list(full.shape)
        pad[dim] = padded - size
        full = torch.cat([full, full.new_zeros(pad)], dim=dim)
    parts = full.chunk(chunks, dim=dim)
    return torch.cat([p.chunk(tp, dim=dim)[rank] for p in parts], dim=dim).clone()


def merge_tensors(shards: list[torch.Tensor], spec: dict) -> torch.Tensor:
    dim, chunks, size = spec["dim"], spec["chunks"], spec["size"]
    per_rank = [s.chunk(chunks, dim=dim) for s in shards]
    full = torch.cat([torch.cat([r[c] for r in per_rank], dim=dim) for c in range(chunks)], dim=dim)
    return full.narrow(dim, 0, size).clone()


def tp_layout(model: nn.Module) -> dict[str, dict]:
    """{parameter name: spec} for every tensor-parallel parameter of `model` (names as in its
    state dict); parameters not listed are replicated on every TP rank."""
    layout = {}
    for mod_name, module in model.named_modules():
        specs = getattr(module, "tp_specs", None)
        if not specs:
            continue
        for pname, spec in specs.items():
            layout[f"{mod_name}.{pname}" if mod_name else pname] = dict(spec)
    return layout


def strip_extra_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(EXTRA_STATE)}


def shard_state_dict(full: dict, layout: dict, rank: int, tp: int) -> dict:
    """The TP shard `rank` of a plain (TP=1) state dict."""
    return {k: (shard_tensor(v, layout[k], rank, tp) if k in layout else v.clone())
            for k, v in strip_extra_state(full).items()}


def merge_state_dicts(shards: list[dict], layout: dict) -> dict:
    """The plain (TP=1) state dict from the TP shards, rank order; replicated tensors from rank 0."""
    first = strip_extra_state(shards[0])
    return {k: (merge_tensors([s[k] for s in shards], layout[k]) if k in layout else v)
            for k, v in first.items()}


# ---- the factory -------------------------------------------------------------------------------

def _no_init(_weight: torch.Tensor) -> None:
    """Weights are copied from the plain layer built with the model's RNG stream."""


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension over `group`; backward keeps this rank's slice.

    (megatron-core's own gather allocates its buffer on torch.cuda.current_device(), which
    a CPU process does not have.)"""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        ctx.rank = dist.get_rank(group=group)
        ctx.width = x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.rank * ctx.width
        return grad[..., start:start + ctx.width].contiguous(), None


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    return x if dist.get_world_size(group=group) == 1 else _GatherLastDim.apply(x, group)


def _tp_group_of(layer):
    group = getattr(layer, "tp_group", None)  # megatron-core >= 0.13 keeps it on the layer
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group


def _megatron_layers():
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    class ColumnTP(ColumnParallelLinear):
        """Returns the output only. The output head (`keep_features` set) gathers its logits
        over the TP group and cuts the vocabulary padding off."""

        def forward(self, x, *args, **kwargs):
            out, bias = super().forward(x, *args, **kwargs)
            if bias is not None:
                out = out + bias
            keep = getattr(self, "keep_features", None)
            if keep is None:
                return out
            out = gather_last_dim(out, _tp_group_of(self))
            return out[..., :keep] if out.shape[-1] != keep else out

    class RowTP(RowParallelLinear):
        def forward(self, x, *args, **kwargs):
            out, bias = super().forward(x, *args, **kwargs)
            return out if bias is None else out + bias

    return ColumnTP, RowTP, VocabParallelEmbedding


def _te_layers():  # pragma: no cover - needs a GPU with Transformer Engine
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TERowParallelLinear,
    )

    class TEColumn(TEColumnParallelLinear):
        def forward(self, x):
            out, bias = super().forward(x)
            return out if bias is None else out + bias

    class TERow(TERowParallelLinear):
        def forward(self, x):
            out, bias = super().forward(x)
            return out if bias is None else out + bias

    return TEColumn, TERow


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # ImportError, or TE's OSError about missing CUDA libraries
        return False
    return bool(HAVE_TE)


class MegatronTPLayers(LayerFactory):
    """megatron-core tensor-parallel layers over parallel_state's tensor-parallel group (which
    pipeline/parallel.py initialises). Works at TP=1 too (no communication)."""

    name = "megatron-tp"

    def __init__(self, params_dtype: torch.dtype = torch.float32, use_te: bool = False,
                 sequence_parallel: bool = False, head_multiple: int = HEAD_MULTIPLE):
        from megatron.core import ModelParallelConfig, parallel_state

        if sequence_parallel:
            raise ValueError("parallel.sequence_parallel is not supported for the DiT: set it to false")
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.tensor_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
        self.rank = parallel_state.get_tensor_model_parallel_rank()
        self.use_te = use_te
        self.head_multiple = head_multiple
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tensor_parallel_size, sequence_parallel=False,
            use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=False,
            gradient_accumulation_fusion=False, params_dtype=params_dtype)
        self._transformer_config = None

    # -- helpers
    def _device(self):
        return torch.device("cpu") if self.config.use_cpu_initialization else torch.device(
            "cuda", torch.cuda.current_device())

    def _fill(self, module: nn.Module, ref: nn.Module, specs: dict) -> nn.Module:
        """Copy this rank's slice of every parameter of `ref` into `module`; record the specs."""
        from megatron.core.tensor_parallel.layers import (
            set_tensor_model_parallel_attributes,
        )

        with torch.no_grad():
            for pname, ref_param in ref.named_parameters():
                param = getattr(module, pname)
                spec = specs.get(pname)
                value = shard_tensor(ref_param, spec, self.rank, self.tensor_parallel_size) \
                    if spec else ref_param
                if param.shape != value.shape:
                    raise RuntimeError(f"{pname}: shard {tuple(value.shape)} vs layer {tuple(param.shape)}")
                param.copy_(value.to(param.dtype))
                if spec and not getattr(param, "tensor_model_parallel", False):
                    set_tensor_model_parallel_attributes(param, True, spec["dim"], 1)
        module.tp_specs = specs
        return module

    def _te_config(self):  # pragma: no cover - GPU only
        from megatron.core.transformer import TransformerConfig

        if self._transformer_config is None:
            self._transformer_config = TransformerConfig(
                num_layers=1, hidden_size=64, num_attention_heads=self.tensor_parallel_size,
                tensor_model_parallel_size=self.tensor_parallel_size, sequence_parallel=False,
                use_cpu_initialization=False, perform_initialization=False,
                gradient_accumulation_fusion=False, params_dtype=self.config.params_dtype)
        return self._transformer_config

    # -- the factory interface
    def linear(self, in_features: int, out_features: int, bias: bool, role: str) -> nn.Module:
        ref = nn.Linear(in_features, out_features, bias=bias)  # the plain model's RNG draws
        tp = self.tensor_parallel_size
        if role not in COLUMN_ROLES + ROW_ROLES:
            return ref
        if role in COLUMN_ROLES:
            chunks = 3 if role == "attn_qkv" else 1
            if chunks > 1 and (out_features // chunks) % tp:
                raise ValueError(f"{role}: {out_features // chunks} features do not split over TP={tp}")
            if role != "output" and out_features % tp:
                raise ValueError(f"{role}: {out_features} features do not split over TP={tp}")
            multiple = self.head_multiple if role == "output" else 1
            specs = {"weight": _spec(0, chunks, out_features, multiple)}
            if bias:
                specs["bias"] = _spec(0, chunks, out_features, multiple)
            width = padded_size(out_features, tp * multiple)
            if self.use_te and role != "output":  # pragma: no cover - GPU only
                column, _ = _te_layers()
                layer = column(in_features, width, config=self._te_config(), init_method=_no_init,
                               gather_output=False, bias=bias, skip_bias_add=True, is_expert=False)
            else:
                column, _, _ = _megatron_layers()
                layer = column(in_features, width, config=self.config, init_method=_no_init, bias=bias,
                               gather_output=False, skip_bias_add=False)
                if role == "output":
                    layer.keep_features = out_features
            return self._fill(layer, ref, specs)
        if in_features % tp:
            raise ValueError(f"{role}: {in_features} input features do not split over TP={tp}")
        specs = {"weight": _spec(1, 1, in_features)}
        if self.use_te:  # pragma: no cover - GPU only
            _, row = _te_layers()
            layer = row(in_features, out_features, config=self._te_config(), init_method=_no_init,
                        bias=bias, input_is_parallel=True, skip_bias_add=True, is_expert=False)
        else:
            _, row, _ = _megatron_layers()
            layer = row(in_features, out_features, config=self.config, init_method=_no_init, bias=bias,
                        input_is_parallel=True, skip_bias_add=False)
        return self._fill(layer, ref, specs)

    def embedding(self, num_embeddings: int, dim: int,
                  init: Callable[[torch.Tensor], object] | None = None) -> nn.Module:
        ref = super().embedding(num_embeddings, dim, init)
        _, _, vocab_parallel = _megatron_layers()
        layer = vocab_parallel(padded_size(num_embeddings, self.tensor_parallel_size), dim,
                               init_method=_no_init, config=self.config)
        return self._fill(layer, ref, {"weight": _spec(0, 1, num_embeddings)})


def full_parameter_counts(model: nn.Module) -> tuple[int, int, int]:
    """(all parameters, per-token matmul weights, conditioning weights) of the plain model that a
    TP shard `model` belongs to: what count_parameters / metrics.matmul_params /
    metrics.conditioning_params report for the TP=1 model."""
    layout = tp_layout(model)
    total = matmul = conditioning = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name in layout:
            spec = layout[name]
            n = n // p.shape[spec["dim"]] * spec["size"]
        total += n
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            n = module.weight.numel()
        elif getattr(module, "tp_specs", None) and not hasattr(module, "num_embeddings_per_partition"):
            spec = module.tp_specs["weight"]
            n = module.weight.numel() // module.weight.shape[spec["dim"]] * spec["size"]
        else:
            continue
        if is_conditioning(mod_name):
            conditioning += n
        else:
            matmul += n
    return total, matmul, conditioning
