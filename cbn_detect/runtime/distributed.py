"""Process-group setup for the ways a run starts: one process; several started by ``processes=N``
(torch's elastic launcher) or by ``torchrun`` (both set RANK / WORLD_SIZE / LOCAL_RANK); and the
tasks of a submitit job, on SLURM or through the local executor (``tasks_per_node``; submitit's
``TorchDistributedEnvironment`` exports the same variables). NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _export_submitit_environment() -> None:
    """Inside a multi-task submitit job, set the torchrun-style variables, so that its tasks form
    one DDP world instead of one world each (in the same job directory)."""
    tasks = int(os.environ.get("SLURM_NTASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS") or "1")
    if "RANK" in os.environ or tasks <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except RuntimeError:  # not inside a submitit job (e.g. srun by hand): leave the environment alone
        log.debug("%d tasks but no submitit job environment; expecting RANK/WORLD_SIZE to be set", tasks)


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when the environment asks for one; return the rank and the device
    this process owns (``cuda:LOCAL_RANK`` on GPUs)."""
    _export_submitit_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    log.info("process %d of %d on %s", rank, world_size, device)
    return DistInfo(world_size, rank, local_rank), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every process rank 0's buffers (BN running statistics): DDP broadcasts them before each
    training forward, but each process then updates its own copy, so they differ afterwards."""
    if info.world_size == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank); a list of one without a process group."""
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if info.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
