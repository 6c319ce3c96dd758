"""Process groups for expert parallelism: the only module that reads torchrun's environment
and the only place that creates process groups.

The mesh has two axes, row-major over ranks: ``ep`` (ranks that together hold one copy of every
expert; consecutive ranks, so an ep group stays inside a node when it can) and ``dp`` (the replicas of
an expert). Dense parameters are replicated on every rank and reduced over the whole world; expert
parameters are reduced over ``dp`` only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelDims:
    """World size and expert-parallel size; ``dp = world_size // ep_size``."""

    world_size: int
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.world_size < 1:
            raise ValueError(f"world_size and ep_size must be >= 1, got {self.world_size}, {self.ep_size}")
        if self.world_size % self.ep_size:
            raise ValueError(f"world size {self.world_size} is not divisible by ep_size {self.ep_size}; "
                             f"choose an ep_size that divides {self.world_size} or change the number of ranks")

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size


def torchrun_env() -> dict[str, int]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE as torchrun sets them (1 process if absent)."""
    get = os.environ.get
    world = int(get("WORLD_SIZE", "1"))
    return {
        "rank": int(get("RANK", "0")),
        "world_size": world,
        "local_rank": int(get("LOCAL_RANK", "0")),
        "local_world_size": int(get("LOCAL_WORLD_SIZE", str(world))),
    }


def default_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torchrun_env()["local_rank"] % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600.0) -> bool:
    """Initialise the default process group from torchrun's environment (NCCL on CUDA, else gloo).
    Returns False (and does nothing) for a single process started without torchrun."""
    if dist.is_initialized():
        return True
    env = torchrun_env()
    if env["world_size"] == 1 and "MASTER_ADDR" not in os.environ:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    log.info("initialised %s: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return True


def build_mesh(ep_size: int, device_type: str | None = None) -> DeviceMesh | None:
    """A ("dp", "ep") DeviceMesh over the initialised world, or None for one process with ep_size 1."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims(world_size=world, ep_size=ep_size)
    if not dist.is_initialized():
        return None
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    return init_device_mesh(device_type, (dims.dp_size, dims.ep_size), mesh_dim_names=("dp", "ep"))


def ep_group(mesh: DeviceMesh | None) -> dist.ProcessGroup | None:
    return None if mesh is None else mesh.get_group("ep")


def dp_group(mesh: DeviceMesh | None) -> dist.ProcessGroup | None:
    return None if mesh is None else mesh.get_group("dp")
