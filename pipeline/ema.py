"""Exponential moving averages of the weights, kept the way the weights are kept.

- `EMA`: whole fp32 tensors on every rank (ZeRO-0, one process, or where the optimizer's layout
  is not one we know).
- `PartitionedEMA` (ZeRO-1/2): the fp32 EMA of this rank's partition of the optimizer's fp32
  master weights, updated without communication: 4 bytes per parameter / data-parallel size.
- `ShardedEMA` (ZeRO-3): the same per parameter, over its partition of the fp32 master weights.

Every kind hands out whole tensors by plain parameter name (`full_state`), collectively where it
is partitioned, and checkpoints the whole EMA from the data-parallel group's rank 0, so
checkpoints look the same whatever the layout.
"""
from __future__ import annotations

import bisect
import logging

import torch
import torch.distributed as dist

from .adapters import plain_name
from .configtools import ConfigError

log = logging.getLogger("mdlm.ema")
GATHER_ELEMENTS = 1 << 26  # fp32 elements gathered at once (256 MiB), whatever the group size
MISMATCH = ("the checkpoint's EMA does not match this model's parameters (names or sizes differ): "
            "resume with the model config the run was trained with")


def _state_code(state: dict | None, sizes: dict[str, int]) -> int:
    """0: no EMA in the checkpoint, 1: one that matches `sizes` (name -> numel), 2: one that does not."""
    if not state:
        return 0
    return 1 if all(n in state and state[n].numel() == k for n, k in sizes.items()) else 2


def _check_into(into: dict, shapes: dict) -> None:
    """`into` must hold every EMA tensor at its shape: a copy would broadcast a smaller one, and a
    flat write fill only part of a larger one."""
    missing = sorted(set(shapes) - set(into))
    other = sorted(n for n in shapes if n in into and tuple(into[n].shape) != tuple(shapes[n]))
    if missing or other:
        raise ValueError(f"the EMA does not fit the model it is copied into: missing {missing[:5]}, "
                         f"other shapes {other[:5]}")


def _comm_device(group) -> torch.device:
    # partitions kept on the CPU (offload) still travel through NCCL on the GPU
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class EMA:
    """fp32 exponential moving average of the parameters (by name), kept whole on every rank. With
    bf16 weights under ZeRO-0 it follows the optimizer's fp32 master copy (`masters`), since the
    bf16 weights round away updates smaller than their precision, which a slow EMA never sees."""

    collective = False

    def __init__(self, module: torch.nn.Module, decay: float, masters: dict | None = None):
        self.decay, self.module = decay, module
        self.masters = masters   # plain name -> () -> the parameter's fp32 master tensor
        self.reset()

    def _sources(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        if self.masters is not None:
            return {n: get() for n, get in self.masters.items()}
        return {plain_name(n): p.detach() for n, p in module.named_parameters()}

    @torch.no_grad()
    def reset(self) -> None:
        """Start (again) from the current weights."""
        self.shadow = {n: t.float().clone() for n, t in self._sources(self.module).items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for n, t in self._sources(module).items():
            self.shadow[n].lerp_(t.float(), 1.0 - self.decay)

    @torch.no_grad()
    def full_state(self, into: dict | None = None) -> dict:
        """The whole EMA; with `into` (name -> tensor, e.g. a model's state_dict()) copied there."""
        if into is None:
            return self.shadow
        _check_into(into, {n: t.shape for n, t in self.shadow.items()})
        return {n: into[n].copy_(t) for n, t in self.shadow.items()}

    def describe(self) -> str:
        source = ", following the fp32 master weights" if self.masters is not None else ""
        return f"whole on every rank{source} ({sum(t.numel() for t in self.shadow.values()):,} fp32 values)"

    def state_dict(self) -> dict:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict | None, device) -> None:
        """A checkpoint without an EMA (the run had none) starts it from the resumed weights."""
        code = _state_code(state, {n: t.numel() for n, t in self.shadow.items()})
        if code == 2:
            raise ValueError(MISMATCH)
        if code == 0:
            self.reset()
            return
        self.shadow = {n: state[n].to(device).float().view_as(t) for n, t in self.shadow.items()}


class ShardedEMA:
    """ZeRO-3: the fp32 EMA of this rank's partition of each parameter, updated without
    communication. It follows the optimizer's fp32 master partition of the parameter (the bf16
    `p.ds_tensor` partition rounds away updates smaller than its precision, which a slow EMA then
    never sees), or `p.ds_tensor` where the optimizer keeps no fp32 copy in memory (NVMe swap).
    Whole tensors are assembled (collectively, one parameter at a time) only for evaluation and
    checkpoints, so the EMA costs 4 bytes per parameter / data-parallel size instead of a full
    gathered copy per step. ZeRO-3 splits each flattened parameter into equal, padded partitions
    over `p.ds_process_group`, rank r holding elements [r * n, (r + 1) * n)."""

    collective = True

    def __init__(self, module: torch.nn.Module, decay: float, group, optimizer=None):
        self.decay, self.group, self.optimizer = decay, group, optimizer
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.params = [(plain_name(n), p) for n, p in module.named_parameters()]
        for n, p in self.params:
            if p.ds_process_group is not group and dist.get_world_size(p.ds_process_group) != self.size:
                raise ConfigError(f"train.ema under ZeRO-3 expects every parameter partitioned over the "
                                  f"data-parallel group ({n} is not: MiCS / hpZ are not supported)")
        self.follows_master = self._masters() is not None
        if not self.follows_master:
            log.warning("the ZeRO-3 EMA follows the bf16 weight partitions: the optimizer keeps no fp32 "
                        "master copy in memory in the expected layout")
        self.reset()
        self.comm_device = _comm_device(group)

    def _masters(self) -> list[torch.Tensor] | None:
        """Each parameter's slice of the optimizer's fp32 master partition (DeepSpeed keeps one flat
        fp32 buffer per sub-group, parameters at `grad_position` offsets), looked up afresh each
        time because DeepSpeed may rebind the buffers (checkpoint load, offload_states)."""
        try:
            flats, positions = self.optimizer.fp32_partitioned_groups_flat, self.optimizer.grad_position
            out = []
            for _, p in self.params:
                group, offset, numel = positions[self.optimizer.get_param_id(p)]
                flat = flats[group]
                if numel != p.ds_tensor.numel() or offset + numel > flat.numel() or not flat.is_floating_point():
                    return None
                out.append(flat.narrow(0, offset, numel))
            return out
        except (AttributeError, KeyError, IndexError, TypeError):
            return None

    def _sources(self) -> list[torch.Tensor]:
        masters = self._masters() if self.follows_master else None
        if masters is None:
            return [p.ds_tensor.detach() for _, p in self.params]
        return masters

    @torch.no_grad()
    def reset(self) -> None:
        """Start (again) from the current weights. Under offload_optimizer the masters live on the
        CPU, and so does the EMA."""
        self.shards = {n: src.detach().float().clone() for (n, _), src in zip(self.params, self._sources())}

    def describe(self) -> str:
        source = "fp32 master" if self.follows_master else "bf16 weight"
        return (f"partitioned like the ZeRO-3 weights over {self.size} data-parallel ranks, following "
                f"their {source} partitions ({sum(s.numel() for s in self.shards.values()):,} fp32 "
                f"values on this rank)")

    @torch.no_grad()
    def update(self, module: torch.nn.Module | None = None) -> None:
        for (n, _), src in zip(self.params, self._sources()):
            shard = self.shards[n]
            shard.lerp_(src.detach().to(shard.device, torch.float32), 1.0 - self.decay)

    @torch.no_grad()
    def full_state(self, everywhere: bool = True, into: dict | None = None) -> dict | None:
        """Collective over the data-parallel group: the whole EMA on CPU, on every rank or (for
        checkpoints) on the group's rank 0 only (None elsewhere). With `into` (name -> tensor on
        every rank, e.g. an evaluation model's state_dict()) each tensor is written there as it
        arrives, and no whole copy is made."""
        out = {}
        dst = dist.get_global_rank(self.group, 0)
        if into is not None:
            _check_into(into, {n: p.ds_shape for n, p in self.params})
        for n, p in self.params:
            shard = self.shards[n].to(self.comm_device)
            parts = [torch.empty_like(shard) for _ in range(self.size)]
            if everywhere or into is not None:
                dist.all_gather(parts, shard, group=self.group)
            else:
                dist.gather(shard, parts if self.rank == 0 else None, dst=dst, group=self.group)
            if into is not None:
                out[n] = into[n].copy_(torch.cat(parts)[:p.ds_numel].view(p.ds_shape))
            elif everywhere or self.rank == 0:
                out[n] = torch.cat(parts)[:p.ds_numel].view(p.ds_shape).cpu()
        return out if everywhere or into is not None or self.rank == 0 else None

    def state_dict(self) -> dict | None:
        # each ZeRO-3 rank writes its own model-states file: only the group's rank 0 carries the EMA
        return self.full_state(everywhere=False)

    @torch.no_grad()
    def load_state_dict(self, state: dict | None, device) -> None:
        """Collective: the group's rank 0 holds the whole EMA (its checkpoint file carries it);
        each parameter is broadcast and every rank keeps its own partition."""
        src = dist.get_global_rank(self.group, 0)
        code = float(_state_code(state, {n: p.ds_numel for n, p in self.params})) if self.rank == 0 else 0.0
        flag = torch.tensor([code], device=self.comm_device)
        dist.broadcast(flag, src=src, group=self.group)
        if flag.item() == 2.0:
            raise ValueError(MISMATCH)
        if flag.item() == 0.0:  # the run had no EMA: start it from the resumed weights
            self.reset()
            return
        for n, p in self.params:
            shard = self.shards[n]
            whole = (state[n].to(self.comm_device).float().reshape(-1) if self.rank == 0
                     else torch.empty(p.ds_numel, dtype=torch.float32, device=self.comm_device))
            dist.broadcast(whole, src=src, group=self.group)
            part = whole[self.rank * shard.numel():(self.rank + 1) * shard.numel()]
            shard.zero_()[:part.numel()].copy_(part)


# (flat bit16 buffer per group, its parameters, this rank's fp32 master partition per group)
ZERO_LAYOUTS = (("bit16_groups_flat", "bit16_groups", "single_partition_of_fp32_groups"),
                ("bf16_groups_flat", "bf16_groups", "fp32_groups_flat_partition"))


class PartitionedEMA:
    """ZeRO-1/2: the fp32 EMA of this rank's partition of the optimizer's fp32 master weights.

    DeepSpeed flattens each parameter group into one buffer (`bit16_groups_flat[i]`, every
    parameter a view into it, alignment padding between them) and rank r of the group's
    data-parallel group owns elements [r * n, (r + 1) * n) of it as an fp32 master partition
    (`single_partition_of_fp32_groups[i]`). The EMA follows that partition after every step; a
    parameter's place in the flat buffer is read from its storage, so no particular ordering of the
    parameters is assumed, and an optimizer that does not look like this is refused (`make_ema`
    then keeps the whole EMA). DeepSpeed's BF16_Optimizer (ZeRO-1 with fp32 gradient
    accumulation) keeps the same layout under other names (`ZERO_LAYOUTS`)."""

    collective = True

    def __init__(self, module: torch.nn.Module, optimizer, decay: float):
        self.decay, self.optimizer = decay, optimizer
        layout_names = next((names for names in ZERO_LAYOUTS if all(hasattr(optimizer, a) for a in names)), None)
        if layout_names is None:
            raise ValueError(f"{type(optimizer).__name__} has none of the known flat-buffer layouts")
        flat_attr, params_attr, self.master_attr = layout_names
        flats, bit16_groups = getattr(optimizer, flat_attr), getattr(optimizer, params_attr)
        names = {id(p): plain_name(n) for n, p in module.named_parameters()}
        self.groups = []   # (process group, rank, size, partition numel, [(offset, numel, name, shape)] by offset)
        covered = set()
        for i, flat in enumerate(flats):
            group = optimizer.real_dp_process_group[i]
            rank, size = dist.get_rank(group), dist.get_world_size(group)
            master = self._masters()[i]
            part = flat.numel() // size
            if flat.numel() % size or master.numel() != part:
                raise ValueError(f"parameter group {i}: {flat.numel()} flat elements do not split into "
                                 f"{size} partitions of {master.numel()}")
            layout = []
            for p in bit16_groups[i]:
                offset, rem = divmod(p.data_ptr() - flat.data_ptr(), flat.element_size())
                if rem or not 0 <= offset <= flat.numel() - p.numel() or id(p) not in names:
                    raise ValueError(f"parameter group {i}: a parameter is not a view into the flat buffer")
                layout.append((offset, p.numel(), names[id(p)], tuple(p.shape)))
                covered.add(id(p))
            layout.sort()
            self.groups.append((group, rank, size, part, layout))
        if covered != set(names):
            raise ValueError("some parameters are in no optimizer partition")
        self.comm_device = _comm_device(self.groups[0][0])
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Start (again) from the current fp32 master weights. Under offload_optimizer they live
        on the CPU, and so does the EMA (its update then costs a CPU pass over the partition)."""
        self.shards = [m.detach().float().clone() for m in self._masters()]

    def _masters(self) -> list[torch.Tensor]:
        return getattr(self.optimizer, self.master_attr)

    def describe(self) -> str:
        return (f"partitioned like the ZeRO optimizer states over {self.groups[0][2]} data-parallel ranks "
                f"({sum(s.numel() for s in self.shards):,} fp32 values on this rank)")

    @torch.no_grad()
    def update(self, module: torch.nn.Module | None = None) -> None:
        for shard, master in zip(self.shards, self._masters()):
            shard.lerp_(master.detach().float(), 1.0 - self.decay)

    @staticmethod
    def _overlaps(layout, lo: int, hi: int):
        """(offset, numel, name, shape) of the parameters overlapping flat elements [lo, hi)."""
        i = max(0, bisect.bisect_right(layout, (lo, float("inf"))) - 1)
        while i < len(layout) and layout[i][0] < hi:
            if layout[i][0] + layout[i][1] > lo:
                yield layout[i]
            i += 1

    @torch.no_grad()
    def full_state(self, everywhere: bool = True, into: dict | None = None) -> dict | None:
        """Collective over the data-parallel group: the whole EMA on CPU, on every rank or (for
        checkpoints) on the group's rank 0 only (None elsewhere). Gathered in slices, so the
        transient buffer stays at GATHER_ELEMENTS whatever the model size. With `into` (name ->
        tensor on every rank, e.g. an evaluation model's state_dict()) the slices are written
        there, and no whole copy is made."""
        everywhere = everywhere or into is not None
        if into is not None:
            _check_into(into, {name: shape for *_, layout in self.groups for _, _, name, shape in layout})
        out, receive = {}, everywhere or self.groups[0][1] == 0
        for shard, (group, rank, size, part, layout) in zip(self.shards, self.groups):
            if into is not None:
                whole = {name: into[name].view(-1) for _, _, name, _ in layout}
            else:
                whole = {name: torch.empty(numel, dtype=torch.float32) for _, numel, name, _ in layout} if receive else {}
            step = max(1, GATHER_ELEMENTS // size)
            for c0 in range(0, part, step):
                c1 = min(part, c0 + step)
                piece = shard[c0:c1].to(self.comm_device)
                pieces = [torch.empty_like(piece) for _ in range(size)]
                if everywhere:
                    dist.all_gather(pieces, piece, group=group)
                else:
                    dist.gather(piece, pieces if rank == 0 else None, dst=dist.get_global_rank(group, 0), group=group)
                if not receive:
                    continue
                for r, got in enumerate(pieces):
                    lo, hi = r * part + c0, r * part + c1
                    got = got if into is not None else got.cpu()
                    for offset, numel, name, _ in self._overlaps(layout, lo, hi):
                        s, e = max(lo, offset), min(hi, offset + numel)
                        whole[name][s - offset:e - offset] = got[s - lo:e - lo]
            out.update({name: whole[name].view(shape) for _, _, name, shape in layout} if receive else {})
        return out if receive else None

    def state_dict(self) -> dict | None:
        return self.full_state(everywhere=False)

    @torch.no_grad()
    def load_state_dict(self, state: dict | None, device) -> None:
        """Every ZeRO-1/2 rank reads the same model-states file and cuts its own partition out of
        the whole EMA; the ranks first agree that they all read the same kind of EMA."""
        sizes = {name: numel for *_, layout in self.groups for _, numel, name, _ in layout}
        code = _state_code(state, sizes)
        flags = torch.tensor([code, -code], dtype=torch.float32, device=self.comm_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.groups[0][0])
        highest, lowest = int(flags[0].item()), -int(flags[1].item())
        if highest == 2:
            raise ValueError(MISMATCH)
        if highest != lowest:
            raise ValueError("only some data-parallel ranks found the EMA in their checkpoint file (the "
                             "model states must be readable by every rank: node-local checkpoint storage "
                             "is not supported with train.ema)")
        if code == 0:  # the run had no EMA: start it from the resumed weights
            self.reset()
            return
        for shard, (_, rank, _, part, layout) in zip(self.shards, self.groups):
            lo, hi = rank * part, (rank + 1) * part
            shard.zero_()
            for offset, numel, name, _ in self._overlaps(layout, lo, hi):
                s, e = max(lo, offset), min(hi, offset + numel)
                values = state[name].reshape(-1)[s - offset:e - offset]
                shard[s - lo:e - lo] = values.to(shard.device, torch.float32)


def whole_masters(module: torch.nn.Module, optimizer) -> dict | None:
    """ZeRO-0 with bf16 weights: each parameter's fp32 master tensor in DeepSpeed's FP16_Optimizer
    (one flat fp32 buffer per group) or FP16_UnfusedOptimizer (one fp32 copy per parameter), by
    plain name, as a function looked up afresh (a checkpoint load may rebind the tensors); None
    where the optimizer keeps no such copy (fp32 weights) or its layout is not a known one."""
    names = {id(p): plain_name(n) for n, p in module.named_parameters()}
    groups = getattr(optimizer, "fp16_groups", None)
    masters = {}
    if groups is not None and hasattr(optimizer, "fp32_groups_flat"):
        for i, (flat16, params) in enumerate(zip(optimizer.fp16_groups_flat, groups)):
            for p in params:
                offset, rem = divmod(p.data_ptr() - flat16.data_ptr(), flat16.element_size())
                if rem or not 0 <= offset <= flat16.numel() - p.numel() or id(p) not in names:
                    return None
                masters[names[id(p)]] = (lambda i=i, o=offset, k=p.numel(), shape=p.shape:
                                         optimizer.fp32_groups_flat[i].narrow(0, o, k).view(shape))
    elif groups is not None and hasattr(optimizer, "fp32_groups"):
        for i, params in enumerate(groups):
            for j, p in enumerate(params):
                if id(p) not in names or optimizer.fp32_groups[i][j].shape != p.shape:
                    return None
                masters[names[id(p)]] = lambda i=i, j=j: optimizer.fp32_groups[i][j]
    return masters if masters and set(masters) == set(names.values()) else None


def make_ema(engine, zero_stage: int, decay: float):
    """The EMA that matches how `engine` keeps the weights."""
    if zero_stage == 3:
        return ShardedEMA(engine.module, decay, engine.optimizer.dp_process_group, engine.optimizer)
    if zero_stage in (1, 2):
        try:
            return PartitionedEMA(engine.module, engine.optimizer, decay)
        except (AttributeError, ValueError) as err:  # a DeepSpeed whose layout differs
            log.warning("EMA kept whole on every rank: the ZeRO-%d optimizer's layout is not the "
                        "expected one (%s)", zero_stage, err)
    masters = whole_masters(engine.module, engine.optimizer)
    if masters is None and any(p.dtype != torch.float32 for p in engine.module.parameters()):
        log.warning("the EMA follows the %s weights: the optimizer's fp32 master copy is not in a known layout",
                    next(p.dtype for p in engine.module.parameters() if p.dtype != torch.float32))
    return EMA(engine.module, decay, masters)
