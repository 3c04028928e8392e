"""Process-group setup for every launcher (deepspeed, torchrun, SLURM srun, a bare process)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _env_from_slurm() -> None:
    """One task per rank of an srun step: map SLURM's variables to the torch ones. A batch
    script's own shell also has SLURM_PROCID=0 and SLURM_NTASKS (the job's), but no step: a
    process started there is one process and must not wait for ranks that never start."""
    if "RANK" not in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU.

    A bare single process (no launcher) gets a one-rank group on 127.0.0.1."""
    import datetime

    import deepspeed
    import torch.distributed as dist

    _env_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        gpu = gpu_for_rank(local_rank, torch.cuda.device_count())
        if gpu != local_rank:
            # DeepSpeed binds cuda:$LOCAL_RANK itself (init_process_group's device_id, ZeRO-3's
            # buffers): that device does not exist here, so it must hear the one this rank sees
            os.environ["LOCAL_RANK"] = str(gpu)
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "gloo":
            _unlink_shm_allreduce_buffer(dist)
    if dist.get_rank() == 0:
        _warn_if_shutdown_timeout_ignored()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def gpu_for_rank(local_rank: int, visible: int) -> int:
    """The device of a rank: its local rank, or the one GPU a task sees where the site binds one
    GPU per task. More ranks on a node than GPUs would put two on one device (NCCL's "Duplicate
    GPU detected", after the whole start-up): refused here."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"LOCAL_RANK={local_rank}, but this process sees {visible} GPUs: start at most "
                           f"{visible} ranks per node (--ntasks-per-node, --gpus-per-node, --num_gpus or the "
                           f"hostfile's slots)")
    return local_rank


def _warn_if_shutdown_timeout_ignored() -> None:
    """Under torchrun (e.g. cluster/kubeflow-pytorchjob.yaml), TORCH_ELASTIC_SHUTDOWN_TIMEOUT gives
    the ranks time to checkpoint after SIGTERM; a torch whose launcher does not read it kills them
    30 s after the signal, which a large checkpoint can outlast."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        return
    import inspect
    import logging

    from torch.distributed.launcher import api

    try:
        source = inspect.getsource(api)
    except (OSError, TypeError):  # an install without source files: nothing to tell
        return
    if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in source:
        logging.getLogger("mdlm.distributed").warning(
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT is set but torch %s's torchrun ignores it: a SIGTERM to torchrun "
            "has the ranks killed within 30 s, possibly before their checkpoint is written; signal the ranks "
            "themselves (cluster/stop-ranks.sh, the preStop hook of cluster/kubeflow-pytorchjob.yaml)",
            torch.__version__)


def shm_allreduce_buffer(rank: int) -> str:
    """The /dev/shm segment DeepSpeed's CPU backend creates for this rank when every rank is on
    one machine (~69 MB; its name is fixed in deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_shm_allreduce_buffer(dist) -> None:
    """DeepSpeed never unlinks its shm segments, so every CPU run left ~69 MB per rank in
    /dev/shm (RAM) until the machine filled up. Once every rank has mapped every segment (the
    barrier), the names can go: the memory stays mapped while the ranks live and is freed when
    they exit, however they exit."""
    dist.barrier()
    try:
        os.unlink(shm_allreduce_buffer(dist.get_rank()))
    except FileNotFoundError:  # ranks on several machines: DeepSpeed made no segment
        pass


def shutdown_distributed() -> None:
    """Every rank leaves together and tears its process group down explicitly: leaving it to
    interpreter exit while another rank was still finishing has aborted a gloo rank ("terminate
    called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
