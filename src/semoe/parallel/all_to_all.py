"""All-to-all building blocks.

* :func:`all_to_all`: the flat variable-split all-to-all with autograd (backward: the same exchange
  with the splits swapped).
* :class:`Link`: one process group seen from this rank: launches ``all_to_all_single`` asynchronously
  and counts what it sends in :class:`TrafficCounters` (messages and bytes that stay inside a node or
  cross a node boundary).
* The hierarchical (two-hop, "rail") exchange: :class:`NodeLayout`, :class:`RailPlan`,
  :func:`rail_forward` and :func:`rail_adjoint`; see ``docs/communication.md``.

Legend: N rows sent, M rows received, D row width, R ranks of the group, P ranks of the group per node,
S nodes of the group. Ep rank ``e = node * P + local``; the "rail" of local rank p is the ranks with
local rank p on every node (one per node).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from semoe.layers.moe import regroup_index

# An exchange in progress: a generator that launches one asynchronous collective per step (``next``)
# and returns its result when exhausted (see ``semoe.parallel.pipeline``).
Exchange = Generator[None, None, torch.Tensor]


@dataclass
class TrafficCounters:
    """What this rank sent through its links since the last :meth:`reset` (forward and backward).

    Only non-empty messages to other ranks count ("a message" = one (sender, receiver) pair of one
    collective); the copy to itself is free. Sum over ranks for the group's totals.
    """

    inter_node_bytes: int = 0
    inter_node_messages: int = 0
    intra_node_bytes: int = 0
    intra_node_messages: int = 0
    collectives: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Pending:
    """An asynchronous collective and the input it reads (kept alive until it is waited for);
    ``finish`` runs after the wait (e.g. widening a compressed receive buffer into the output)."""

    def __init__(self, work: dist.Work, keep: torch.Tensor, finish: Callable[[], object] | None = None) -> None:
        self.work, self.keep, self.finish = work, keep, finish

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self) -> None:
        self.work.wait()
        if self.finish is not None:
            self.finish()
            self.finish = None
        self.keep = None


class Link:
    """A process group as seen from this rank: ``crosses[d]`` says whether group rank d sits on another
    node. ``group=None`` with one rank is a local copy. ``wire_dtype`` (e.g. bfloat16): floating rows
    wider than it travel in it and are widened on arrival (lossy compression, off by default)."""

    def __init__(self, group: dist.ProcessGroup | None, crosses: list[bool], counters: TrafficCounters,
                 wire_dtype: torch.dtype | None = None) -> None:
        self.group, self.crosses, self.counters = group, crosses, counters
        self.size = len(crosses)
        self.rank = dist.get_rank(group) if self.size > 1 else 0
        self.wire_dtype = wire_dtype

    def _compress(self, x: torch.Tensor) -> bool:
        w = self.wire_dtype
        return w is not None and x.is_floating_point() and x.element_size() > torch.empty((), dtype=w).element_size()

    def count(self, send_splits: list[int], row_bytes: int) -> None:
        self.counters.collectives += 1
        for d, n in enumerate(send_splits):
            if n == 0 or d == self.rank:
                continue
            if self.crosses[d]:
                self.counters.inter_node_messages += 1
                self.counters.inter_node_bytes += n * row_bytes
            else:
                self.counters.intra_node_messages += 1
                self.counters.intra_node_bytes += n * row_bytes

    def start(self, x_ND: torch.Tensor, send_splits: list[int],
              recv_splits: list[int]) -> tuple[_Pending | None, torch.Tensor]:
        """Launch the exchange asynchronously: (work to wait on, or None when done; output buffer)."""
        if len(send_splits) != self.size or len(recv_splits) != self.size:
            raise RuntimeError(f"splits {send_splits}/{recv_splits} do not match group size {self.size}")  # invariant
        compress = self._compress(x_ND)
        send_ND = x_ND.to(self.wire_dtype) if compress and self.size > 1 else x_ND
        self.count(send_splits, math.prod(x_ND.shape[1:]) * send_ND.element_size())
        out_MD = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
        if self.size == 1:
            out_MD.copy_(x_ND)
            return None, out_MD
        send_ND = send_ND.contiguous()
        if not compress:
            work = dist.all_to_all_single(out_MD, send_ND, recv_splits, send_splits, group=self.group, async_op=True)
            return _Pending(work, send_ND), out_MD
        recv_MD = send_ND.new_empty(out_MD.shape)
        work = dist.all_to_all_single(recv_MD, send_ND, recv_splits, send_splits, group=self.group, async_op=True)
        return _Pending(work, send_ND, finish=lambda: out_MD.copy_(recv_MD)), out_MD

    def exchange(self, x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Blocking exchange (no autograd)."""
        work, out_MD = self.start(x_ND, send_splits, recv_splits)
        if work is not None:
            work.wait()
        return out_MD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int],  # type: ignore[override]
                link: Link) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.link = send_splits, recv_splits, link
        return link.exchange(x_ND, send_splits, recv_splits)

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):  # type: ignore[override]
        return ctx.link.exchange(grad_MD, ctx.recv_splits, ctx.send_splits), None, None, None


def all_to_all(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int],
               group: dist.ProcessGroup | Link) -> torch.Tensor:
    """Send rows ``[sum(send_splits[:r]), +send_splits[r])`` to rank r of ``group``; receive
    ``recv_splits[s]`` rows from each rank s, concatenated in rank order. Differentiable. A
    :class:`Link` counts the traffic; a bare process group does not."""
    if not isinstance(group, Link):
        group = Link(group, [False] * dist.get_world_size(group), TrafficCounters())
    return _AllToAll.apply(x_ND, list(send_splits), list(recv_splits), group)


# ---------------------------------------------------------------------------------------- hierarchical

@dataclass(frozen=True)
class NodeLayout:
    """Where the ranks of an expert-parallel group sit: ep rank ``e = node * per_node + local``."""

    ep_size: int
    ep_rank: int
    per_node: int

    def __post_init__(self) -> None:
        if self.per_node < 1 or self.ep_size % self.per_node:
            raise ValueError(f"{self.per_node} ranks per node do not tile an expert-parallel group of "
                             f"{self.ep_size}")

    @property
    def nodes(self) -> int:
        return self.ep_size // self.per_node

    @property
    def node(self) -> int:
        return self.ep_rank // self.per_node

    @property
    def local(self) -> int:
        return self.ep_rank % self.per_node


@dataclass(frozen=True)
class RailPlan:
    """One two-hop exchange from senders to receivers, as seen by this rank in its three roles.

    Hop 1 (rail, crosses nodes): this rank (node n0, local p0) sends ``rail_send[m]`` rows to rank
    (m, p0), and receives ``rail_recv[n]`` rows from (n, p0). Local step: ``mid_index`` picks (and, for
    de-duplicated rows, repeats) rows of the hop-1 buffer into the hop-2 buffer, ordered by final
    receiver q. Hop 2 (inside the node): ``intra_send[q]`` rows to (n0, q), ``intra_recv[p]`` from
    (n0, p). ``final_index`` reorders the hop-2 buffer (by p, then node) into source-rank order.
    """

    rail_send: list[int]
    rail_recv: list[int]
    mid_index: torch.Tensor
    intra_send: list[int]
    intra_recv: list[int]
    final_index: torch.Tensor
    final_inverse: torch.Tensor
    unique: bool  # hop-1 rows are de-duplicated (mid_index repeats rows); else mid_index is a permutation

    @property
    def mid_size(self) -> int:
        return sum(self.rail_recv)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def rail_plan(counts_RR: torch.Tensor, layout: NodeLayout, device: torch.device,
              unique_send: list[int] | None = None,
              unique_recv: list[tuple[int, torch.Tensor]] | None = None) -> RailPlan:
    """The plan of an exchange where rank s sends ``counts_RR[s, d]`` rows to rank d (every rank knows
    the whole matrix). Rows leave a sender ordered by receiver. With de-duplication, the sender ships
    ``unique_send[m]`` distinct rows to node m, and ``unique_recv[n] = (U, index)`` says how many distinct
    rows came from node n and, for each row the node's receivers get from it (ordered by receiver),
    which of the U it is."""
    S, P, n0, p0 = layout.nodes, layout.per_node, layout.node, layout.local
    c4 = counts_RR.view(S, P, S, P)
    via_me_SQ = c4[:, p0, n0, :]  # rows (n, p0) sends to (n0, q): they pass through this rank
    to_me_SP = c4[:, :, n0, p0]  # rows (n, p) sends to this rank
    order_qn = regroup_index(via_me_SQ)  # hop-1 rows (n, q) -> hop-2 rows (q, n)
    if unique_recv is None:
        rail_send = c4[n0, p0].sum(-1).tolist()
        rail_recv = via_me_SQ.sum(-1).tolist()
        mid_index = order_qn
    else:
        assert unique_send is not None
        rail_send = list(unique_send)
        rail_recv = [u for u, _ in unique_recv]
        starts = torch.tensor([0, *rail_recv], dtype=torch.long).cumsum(0)[:-1]
        mid_index = torch.cat([idx.long() + starts[n] for n, (_, idx) in enumerate(unique_recv)])[order_qn]
    final_index = regroup_index(to_me_SP.t().contiguous())  # hop-2 rows (p, n) -> source order (n, p)
    return RailPlan(rail_send=rail_send, rail_recv=rail_recv, mid_index=mid_index.to(device),
                    intra_send=via_me_SQ.sum(0).tolist(), intra_recv=to_me_SP.sum(0).tolist(),
                    final_index=final_index.to(device), final_inverse=_inverse(final_index).to(device),
                    unique=unique_recv is not None)


def wait(work: _Pending | None, trace: list | None, label: tuple) -> None:
    """Wait for ``work``; with a trace, record whether it had completed before the wait (overlap)."""
    if trace is not None:
        trace.append(("wait", *label, work is None or work.is_completed()))
    if work is not None:
        work.wait()


def rail_forward(plan: RailPlan, rows_ND: torch.Tensor, rail: Link, node: Link, trace: list | None = None,
                 label: tuple = ("rail",)) -> Exchange:
    """Senders -> receivers: hop 1 on the rail, fan-out, hop 2 inside the node. Yields after each launch;
    returns the received rows in source-rank order."""
    if trace is not None:
        trace.append(("launch", *label, 1))
    work, hop1 = rail.start(rows_ND, plan.rail_send, plan.rail_recv)
    yield
    wait(work, trace, (*label, 1))
    if trace is not None:
        trace.append(("launch", *label, 2))
    work, hop2 = node.start(hop1.index_select(0, plan.mid_index), plan.intra_send, plan.intra_recv)
    yield
    wait(work, trace, (*label, 2))
    return hop2.index_select(0, plan.final_index)


def rail_adjoint(plan: RailPlan, rows_MD: torch.Tensor, rail: Link, node: Link, trace: list | None = None,
                 label: tuple = ("rail",)) -> Exchange:
    """Receivers -> senders, the reverse of :func:`rail_forward`: gather inside the node, then the rail.
    For a de-duplicated plan the repeated rows are summed where they were fanned out (the adjoint,
    i.e. the backward of the dispatch); otherwise each row goes back exactly."""
    if trace is not None:
        trace.append(("launch", *label, 1))
    work, hop2 = node.start(rows_MD.index_select(0, plan.final_inverse), plan.intra_recv, plan.intra_send)
    yield
    wait(work, trace, (*label, 1))
    if plan.unique:
        hop1 = hop2.new_zeros((plan.mid_size, *hop2.shape[1:])).index_add_(0, plan.mid_index, hop2)
    else:
        hop1 = hop2.new_empty((plan.mid_size, *hop2.shape[1:])).index_copy_(0, plan.mid_index, hop2)
    if trace is not None:
        trace.append(("launch", *label, 2))
    work, out = rail.start(hop1, plan.rail_recv, plan.rail_send)
    yield
    wait(work, trace, (*label, 2))
    return out
