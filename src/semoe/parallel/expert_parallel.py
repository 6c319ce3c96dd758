"""Expert parallelism: shard every MoE layer's experts over the ``ep`` mesh axis and give the layer
a torch.distributed comm. The layer's math is untouched (``semoe.layers.moe``).

Two comms, each with ``chunks`` (overlap of communication with the experts, see
``semoe.parallel.pipeline``):

* :class:`EPComm` ("flat"): one all-to-all over the expert-parallel group per direction (per chunk).
* :class:`HierarchicalEPComm` ("hierarchical"): two hops, inside the node and across nodes on rails,
  with node-level de-duplication of the dispatch; results bit-equal to the flat one
  (``semoe.parallel.transport``).

Both count the traffic they send (``comm.counters``: messages and bytes inside / across nodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from semoe.layers.comm import ExpertFn, Route
from semoe.layers.moe import MoELayer
from semoe.ops import permute
from semoe.parallel.all_to_all import Link, NodeLayout, TrafficCounters, all_to_all, rail_forward, rail_plan
from semoe.parallel.mesh import ep_group, ep_ranks_per_node, hierarchical_groups, node_of_ranks, resolve_ranks_per_node
from semoe.parallel.pipeline import ExpertPipeline, Transport, run_pipeline, split_route
from semoe.parallel.transport import FlatTransport, HierarchicalTransport

CommKind = Literal["flat", "hierarchical"]


def _check_chunks(chunks: int) -> int:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"all-to-all chunks must be an integer >= 1 (1 = no overlap), got {chunks!r}")
    return chunks


class EPComm:
    """The expert-parallel group of one rank (same interface as ``semoe.layers.comm.LocalComm``).

    ``rpn``: ranks per node, only to tell which messages cross a node boundary in ``counters``.
    ``chunks > 1`` runs dispatch/experts/combine chunk by chunk with the all-to-alls overlapped.
    Set ``trace = []`` to record the pipeline's launches, waits and computes (tests, benchmarks).
    """

    def __init__(self, group: dist.ProcessGroup, chunks: int = 1, rpn: int | None = None) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.chunks = _check_chunks(chunks)
        self.counters = TrafficCounters()
        self.trace: list | None = None
        nodes = node_of_ranks(group, rpn or dist.get_world_size())
        self.link = Link(group, [n != nodes[self.ep_rank] for n in nodes], self.counters)

    def reset_counters(self) -> dict[str, int]:
        """The counters so far (e.g. one training step's), then zero them."""
        snap = self.counters.as_dict()
        self.counters.reset()
        return snap

    def _gather_sizes(self, n: int) -> list[int]:
        t = torch.tensor([n], dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.ep_size)]
        dist.all_gather(out, t, group=self.group)
        return [int(v) for v in out]

    def token_offset(self, num_tokens: int) -> tuple[int, int]:
        sizes = self._gather_sizes(num_tokens)
        return sum(sizes[: self.ep_rank]), sum(sizes)

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self._gather_sizes(x.shape[0])
        pad = max(sizes)
        buf = x.new_zeros((pad, *x.shape[1:]))
        buf[: x.shape[0]] = x
        out = [torch.empty_like(buf) for _ in range(self.ep_size)]
        dist.all_gather(out, buf.contiguous(), group=self.group)
        return torch.cat([o[:n] for o, n in zip(out, sizes)])

    def exchange_stats(self, vec_N: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(vec_N) for _ in range(self.ep_size)]
        dist.all_gather(out, vec_N.contiguous(), group=self.group)
        return torch.stack(out)

    def all_to_all(self, x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Flat, differentiable (also on the hierarchical comm: it needs every rank's splits)."""
        return all_to_all(x_ND, send_splits, recv_splits, self.link)

    def exchange_rows(self, t_N: torch.Tensor, route: Route) -> torch.Tensor:
        return self.link.exchange(t_N.detach(), route.send_splits, route.recv_splits)

    def run_experts(self, x_TD: torch.Tensor, route: Route, expert_fn: ExpertFn,
                    params: Sequence[nn.Parameter]) -> torch.Tensor:
        if route.num_chunks == 1:  # the plain path: autograd through two all-to-alls
            x_recv = self.all_to_all(permute(x_TD, route.token_N), route.send_splits, route.recv_splits)
            y_recv = expert_fn(x_recv, route.counts_SL, None)
            return self.all_to_all(y_recv, route.recv_splits, route.send_splits)
        chunks = split_route(route, x_TD.device)
        return self._run(x_TD, route, chunks, FlatTransport(self.link, route, chunks, self.trace), expert_fn, params)

    def _run(self, x_TD: torch.Tensor, route: Route, chunks: list, transport: Transport, expert_fn: ExpertFn,
             params: Sequence[nn.Parameter]) -> torch.Tensor:
        return run_pipeline(ExpertPipeline(route, chunks, transport, expert_fn, params, self.trace), x_TD)


class HierarchicalEPComm(EPComm):
    """Topology-aware comm: ``node_group`` (this rank's ep-group ranks on its node) and ``rail_group``
    (the ep-group ranks with its local index, one per node), ``per_node`` ep ranks per node."""

    def __init__(self, group: dist.ProcessGroup, node_group: dist.ProcessGroup, rail_group: dist.ProcessGroup,
                 per_node: int, chunks: int = 1, rpn: int | None = None) -> None:
        super().__init__(group, chunks, rpn)
        self.layout = NodeLayout(self.ep_size, self.ep_rank, per_node)
        self.rail = Link(rail_group, [n != self.layout.node for n in range(self.layout.nodes)], self.counters)
        self.node = Link(node_group, [False] * per_node, self.counters)

    def exchange_rows(self, t_N: torch.Tensor, route: Route) -> torch.Tensor:
        counts_RR = route.counts_RE.view(self.ep_size, self.ep_size, -1).sum(-1)
        plan = rail_plan(counts_RR, self.layout, t_N.device)
        gen = rail_forward(plan, t_N.detach(), self.rail, self.node)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    def run_experts(self, x_TD: torch.Tensor, route: Route, expert_fn: ExpertFn,
                    params: Sequence[nn.Parameter]) -> torch.Tensor:
        chunks = split_route(route, x_TD.device)
        transport = HierarchicalTransport(self.rail, self.node, self.layout, route, chunks, self.trace, x_TD.device)
        return self._run(x_TD, route, chunks, transport, expert_fn, params)


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh | None, comm: CommKind = "flat",
                          ranks_per_node: int | None = None, chunks: int = 1,
                          wire_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard the experts of every ``MoELayer`` in ``model`` over the mesh's ``ep`` axis, in place, and
    give the layers one comm (shared, so its ``counters`` add up over layers): ``comm`` "flat" or
    "hierarchical", ``ranks_per_node`` (None: torchrun's LOCAL_WORLD_SIZE, else one node), ``chunks``
    of the overlapped dispatch (1: none), ``wire_dtype`` (None: rows travel in their own dtype; e.g.
    ``torch.bfloat16``: float32 rows and their gradients travel compressed, half the bytes, lossy).

    Call it on a model whose every rank was built from the same seed (or before loading a
    checkpoint): rank r of the ep group keeps experts [r*L, (r+1)*L). With ``mesh=None`` it is a no-op.
    """
    if comm not in ("flat", "hierarchical"):
        raise ValueError(f"comm={comm!r} is not supported; choose 'flat' or 'hierarchical'")
    _check_chunks(chunks)
    group = ep_group(mesh)
    if group is None:
        return model
    assert mesh is not None
    rpn = resolve_ranks_per_node(ranks_per_node)
    if comm == "hierarchical":
        per_node = ep_ranks_per_node(mesh.size(1), rpn)
        node_group, rail_group = hierarchical_groups(mesh, per_node)
        ep_comm: EPComm = HierarchicalEPComm(group, node_group, rail_group, per_node, chunks, rpn)
    else:
        ep_comm = EPComm(group, chunks, rpn)
    for link in (getattr(ep_comm, name, None) for name in ("link", "rail", "node")):
        if link is not None:
            link.wire_dtype = wire_dtype
    for module in model.modules():
        if isinstance(module, MoELayer):
            if module.cfg.num_experts % ep_comm.ep_size:
                raise ValueError(f"num_experts={module.cfg.num_experts} is not divisible by ep_size={ep_comm.ep_size}; "
                                 "choose an ep_size (or --nproc) that divides the number of experts")
            module.experts.shard_(ep_comm.ep_rank, ep_comm.ep_size)
            module.comm = ep_comm
    return model


def expert_comm(model: nn.Module) -> EPComm | None:
    """The comm ``apply_expert_parallel`` gave ``model``'s MoE layers (None without expert parallelism)."""
    for module in model.modules():
        if isinstance(module, MoELayer) and isinstance(module.comm, EPComm):
            return module.comm
    return None
