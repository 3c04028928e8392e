"""Tensor x data parallel process groups from megatron-core's parallel_state, and the `mpu`
object DeepSpeed takes to know them.

Rank layout (megatron-core's default order, tensor-parallel fastest): with TP=2 on 4 ranks the
tensor-parallel groups are {0, 1} and {2, 3}, the data-parallel groups {0, 2} and {1, 3}, so a
tensor-parallel group lives inside one node whenever TP <= GPUs per node.

DeepSpeed reads the groups from `mpu`: ZeRO partitions optimizer states, gradients and (stage 3)
parameters over `get_data_parallel_group()` only, averages gradients over it, and counts each
tensor-parallel parameter once per shard and each replicated one once (on TP rank 0) when it
computes the global gradient norm over the model-parallel group. megatron-core's parallel_state
has no get_model_parallel_rank / get_model_parallel_world_size (DeepSpeed's older names):
the adapter answers them with the tensor x pipeline group (pipeline = 1 here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class ParallelLayout:
    tensor: int
    data: int
    tensor_rank: int
    data_rank: int


def initialize(tensor: int) -> ParallelLayout:
    """Build the TP x DP groups (torch.distributed must already be initialised)."""
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if tensor < 1 or world % tensor:
        raise ValueError(f"parallel.tensor={tensor} must divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tensor:
            raise RuntimeError("megatron-core parallel state already initialised with another TP size")
    else:
        # no gloo side groups: nothing here uses them, and across nodes they need their own working
        # network interface (GLOO_SOCKET_IFNAME) for nothing
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor,
                                                 pipeline_model_parallel_size=1,
                                                 create_gloo_process_groups=False)
    return layout()


def layout() -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size(),
                          ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


class MegatronMPU:
    """The `mpu` interface DeepSpeed calls, answered from megatron-core's parallel_state."""

    def __init__(self):
        from megatron.core import parallel_state

        self._ps = parallel_state

    # tensor parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    # model parallel = tensor x pipeline (the names parallel_state dropped)
    def get_model_parallel_group(self):
        getter = getattr(self._ps, "get_model_parallel_group", None)  # pipeline = 1: TP group otherwise
        return getter() if getter is not None else self._ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.get_model_parallel_group())

    # pipeline (always 1 here, answered for DeepSpeed's checks)
    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    # data parallel: the group ZeRO shards over
    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())


def tensor_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def data_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()
