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
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across restarts, so restarted workers would read the keys of the
        # attempt before (a dead worker's gloo address: "connection refused", cf. pytorch#167288); a prefix per
        # attempt keeps them apart
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=dist.PrefixStore(f"semoe/attempt_{restart}", store),
                                rank=env["rank"], world_size=env["world_size"], timeout=timedelta(seconds=timeout_s))
    else:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    log.info("initialised %s: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return True


def shutdown_distributed() -> None:
    """Destroy the default process group (and every group made from it) if one is initialised.

    Call it before a process that initialised one exits normally: left to interpreter teardown, gloo's worker
    threads can still hold work objects whose tensors need the GIL of an interpreter being torn down, and the
    process aborts ("terminate called without an active exception", SIGABRT; cf. pytorch#179291) after a
    successful run. Local: it waits for no peer."""
    if dist.is_initialized():
        dist.destroy_process_group()


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


def resolve_ranks_per_node(override: int | None = None) -> int:
    """Ranks per node: ``override`` (``ParallelConfig.ranks_per_node``), else torchrun's
    LOCAL_WORLD_SIZE, else the whole world (one machine). Must divide the world size."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if override is not None:
        rpn = override
    elif "LOCAL_WORLD_SIZE" in os.environ:
        rpn = torchrun_env()["local_world_size"]
    else:
        rpn = world
    if not isinstance(rpn, int) or rpn < 1 or world % rpn:
        raise ValueError(f"ranks per node = {rpn!r} does not divide the world size {world}; set "
                         "parallel.ranks_per_node to the number of ranks on each node (a divisor of the world size)")
    return rpn


def ep_ranks_per_node(ep_size: int, rpn: int) -> int:
    """Ranks of one expert-parallel group on each node it spans (ep groups are consecutive ranks)."""
    if ep_size % rpn == 0:
        return rpn
    if rpn % ep_size == 0:
        return ep_size  # the whole group sits on one node
    raise ValueError(f"ep_size {ep_size} and ranks per node {rpn} do not nest (neither divides the other); "
                     "the hierarchical all-to-all needs whole nodes per expert-parallel group (or a group inside "
                     "one node): change parallel.ep_size or parallel.ranks_per_node")


def node_of_ranks(group: dist.ProcessGroup, rpn: int) -> list[int]:
    """Node index of every rank of ``group`` (global ranks are numbered node by node, as torchrun does)."""
    return [g // rpn for g in dist.get_process_group_ranks(group)]


def _node_and_rail_groups(parts: list[list[int]]) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """A group per part (the ranks of one group on one node) and per rail (the i-th rank of every part);
    this rank's two (None where it is in none). Collective: every rank calls it with the same parts."""
    me = dist.get_rank()
    node_group = rail_group = None
    for part in parts:
        g = dist.new_group(part)
        node_group = g if me in part else node_group
    for rail in (list(r) for r in zip(*parts)):
        g = dist.new_group(rail)
        rail_group = g if me in rail else rail_group
    return node_group, rail_group


def hierarchical_groups(mesh: DeviceMesh, per_node: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(node group, rail group) of this rank: the ranks of its ep group on its node, and the ranks of its
    ep group with its local index on every node. Every rank creates every group, in the same order."""
    node_group = rail_group = None
    for row in mesh.mesh.reshape(-1, mesh.size(1)).tolist():  # one expert-parallel group per row
        node, rail = _node_and_rail_groups([row[n:n + per_node] for n in range(0, len(row), per_node)])
        node_group, rail_group = node or node_group, rail or rail_group
    assert node_group is not None and rail_group is not None
    return node_group, rail_group


def fusion_groups(mesh: DeviceMesh | None, num_world_groups: int) -> tuple[list[dist.ProcessGroup],
                                                                          dist.ProcessGroup | None]:
    """Fresh process groups for gradient fusion, so its asynchronous all-reduces never share a
    group's ordering with anything else: ``num_world_groups`` copies of the world, and this rank's expert
    replica group (same ep rank, every dp index; None when there is one replica)."""
    world = list(range(dist.get_world_size()))
    world_groups = [dist.new_group(world) for _ in range(num_world_groups)]
    replica = None
    if mesh is not None and mesh.size(0) > 1:
        me = dist.get_rank()
        for col in mesh.mesh.reshape(mesh.size(0), -1).t().tolist():
            g = dist.new_group(col)
            replica = g if me in col else replica
    return world_groups, replica


def hierarchical_reduce_groups(partition: list[list[int]], rpn: int
                               ) -> tuple[dist.ProcessGroup, dist.ProcessGroup, int] | None:
    """Two-level reduction groups for the member of ``partition`` (disjoint rank lists covering the
    world, e.g. ``[world]`` or the expert replica groups) that holds this rank: ``(node part, rail part,
    size of the node part)``. A member qualifies when it spans at least two nodes with the same number
    (>= 2) of its ranks on each; None for this rank's member otherwise (a flat all-reduce moves no more
    inter-node bytes then). Every rank creates every group, in the same order (``dist.new_group`` is
    collective)."""
    me = dist.get_rank()
    mine = None
    for ranks in partition:
        by_node: dict[int, list[int]] = {}
        for r in sorted(ranks):
            by_node.setdefault(r // rpn, []).append(r)
        parts = list(by_node.values())
        if len(parts) < 2 or len({len(p) for p in parts}) != 1 or len(parts[0]) < 2:
            continue
        node, rail = _node_and_rail_groups(parts)
        if me in ranks:
            assert node is not None and rail is not None
            mine = (node, rail, len(parts[0]))
    return mine


def dense_mesh(device_type: str | None = None) -> DeviceMesh | None:
    """A 1-D ("fsdp",) DeviceMesh over the whole world: every rank is a data-parallel replica of the dense
    parameters (each sees its own tokens), so FSDP shards them over all ranks. None in one process."""
    if not dist.is_initialized():
        return None
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def task_groups(task_ranks: list[list[int]]) -> list[dist.ProcessGroup | None]:
    """One process group per task of an elastic plan (``semoe.elastic.planner``): the ranks that hold the
    task's parameters; None where this rank is not among them. Collective: every rank calls it with the same
    lists, in the same order."""
    me = dist.get_rank()
    out: list[dist.ProcessGroup | None] = []
    for ranks in task_ranks:
        g = dist.new_group(sorted(ranks))
        out.append(g if me in ranks else None)
    return out


def launched_by_torchrun() -> bool:
    """Whether this process is a torchrun worker (even a single one: elastic restarts need the agent)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "MASTER_ADDR" in os.environ
