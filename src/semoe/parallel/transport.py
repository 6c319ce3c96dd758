"""How the rows of an :class:`~semoe.parallel.pipeline.ExpertPipeline` travel: flat (one all-to-all
per chunk and direction) or hierarchical (two hops, with node-level de-duplication of the dispatch).

Legend: T local tokens, D hidden, N rows this rank dispatches, M rows it receives, U distinct tokens
a rank sends to one node, S nodes, P ranks per node, C chunks.
"""

from __future__ import annotations

import torch

from semoe.layers.comm import Route
from semoe.parallel.all_to_all import Exchange, Link, NodeLayout, rail_adjoint, rail_forward, rail_plan, wait
from semoe.parallel.pipeline import Chunk, Transport, _assemble


def one_hop(link: Link, rows: torch.Tensor, send: list[int], recv: list[int], trace: list | None,
            label: tuple) -> Exchange:
    """A single asynchronous all-to-all as an :data:`Exchange`."""
    if trace is not None:
        trace.append(("launch", *label, 1))
    work, out = link.start(rows, send, recv)
    yield
    wait(work, trace, (*label, 1))
    return out


class FlatTransport(Transport):
    """Every chunk and direction is one all-to-all over the expert-parallel group."""

    def __init__(self, link: Link, route: Route, chunks: list[Chunk], trace: list | None) -> None:
        self.link, self.route, self.chunks, self.trace = link, route, chunks, trace

    def dispatch(self, i: int, x_TD: torch.Tensor) -> Exchange:
        c = self.chunks[i]
        rows = x_TD.index_select(0, self.route.token_N.index_select(0, c.send_rows))
        return one_hop(self.link, rows, c.send_splits, c.recv_splits, self.trace, ("dispatch", i))

    def combine(self, i: int, y_MD: torch.Tensor) -> Exchange:
        c = self.chunks[i]
        return one_hop(self.link, y_MD, c.recv_splits, c.send_splits, self.trace, ("combine", i))

    def combine_grad(self, i: int, g_ND: torch.Tensor) -> Exchange:
        c = self.chunks[i]
        return one_hop(self.link, g_ND, c.send_splits, c.recv_splits, self.trace, ("combine_grad", i))

    def dispatch_grad(self, i: int, g_MD: torch.Tensor) -> Exchange:
        c = self.chunks[i]
        return one_hop(self.link, g_MD, c.recv_splits, c.send_splits, self.trace, ("dispatch_grad", i))

    def x_grad(self, grads: list[torch.Tensor], zeros_TD: torch.Tensor) -> torch.Tensor:
        # the same sum, in the same order, as the backward of ``permute(x_TD, token_N)``
        grad_ND = _assemble([c.send_rows for c in self.chunks], grads, self.route.token_N.numel())
        return zeros_TD.index_add_(0, self.route.token_N, grad_ND)


class HierarchicalTransport(Transport):
    """Dispatch: each distinct token bound for a node crosses to it once, on this rank's rail, and is
    fanned out to its experts' ranks inside that node (``rail_forward`` of a de-duplicated plan).
    Combine: one row per assignment, gathered inside the owner's node, then sent on the rail
    (``rail_adjoint`` of the plain plan), so the outputs and their order equal the flat all-to-all's.

    De-duplication needs, on the intermediate rank, how many distinct rows arrive and which row each
    of its node's assignments is: one small int32 all-to-all on the rail per call (all chunks at once).
    """

    def __init__(self, rail: Link, node: Link, layout: NodeLayout, route: Route, chunks: list[Chunk],
                 trace: list | None, device: torch.device) -> None:
        self.rail, self.node, self.route, self.chunks, self.trace = rail, node, route, chunks, trace
        self.plans = [rail_plan(c.counts_RR, layout, device) for c in chunks]
        if route.counts_CREK.shape[-1] == 1:  # K = 1 (top-1; expert choice too): sent without de-duplication
            self.tokens = [route.token_N.index_select(0, c.send_rows) for c in chunks]
            self.unique_plans = self.plans
            return
        S, P, C = layout.nodes, layout.per_node, len(chunks)
        n0, p0 = layout.node, layout.local
        # sender side: the distinct tokens per (chunk, destination node) and each row's index among them
        self.tokens = []
        unique_send: list[list[int]] = []
        inv_mc: list[list[torch.Tensor]] = [[] for _ in range(S)]
        for c in chunks:
            tok_N = route.token_N.index_select(0, c.send_rows)
            per_node = c.counts_RR[route.rank].view(S, P).sum(-1).tolist()
            uniq = [torch.unique(t, sorted=True, return_inverse=True) for t in tok_N.split(per_node)]
            self.tokens.append(torch.cat([u for u, _ in uniq]))
            unique_send.append([u.numel() for u, _ in uniq])
            for m, (_, inv) in enumerate(uniq):
                inv_mc[m].append(inv.to(torch.int32))
        # metadata to (m, p0): [U of each chunk, then the indices of chunk 0, 1, ...]
        meta = [torch.cat([torch.tensor([unique_send[i][m] for i in range(C)], dtype=torch.int32, device=device),
                           *inv_mc[m]]) for m in range(S)]
        via_me = [c.counts_RR.view(S, P, S, P)[:, p0, n0, :].sum(-1).tolist() for c in chunks]  # [C][S]
        recv_sizes = [C + sum(via_me[i][n] for i in range(C)) for n in range(S)]
        got = rail.exchange(torch.cat(meta), [t.numel() for t in meta], recv_sizes).long().cpu()
        unique_recv: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(C)]
        for n, block in enumerate(got.split(recv_sizes)):
            counts = block[:C].tolist()
            for i, inv in enumerate(block[C:].split([via_me[i][n] for i in range(C)])):
                unique_recv[i].append((counts[i], inv))
        self.unique_plans = [rail_plan(c.counts_RR, layout, device, unique_send[i], unique_recv[i])
                             for i, c in enumerate(chunks)]

    def dispatch(self, i: int, x_TD: torch.Tensor) -> Exchange:
        return rail_forward(self.unique_plans[i], x_TD.index_select(0, self.tokens[i]), self.rail, self.node,
                            self.trace, ("dispatch", i))

    def combine(self, i: int, y_MD: torch.Tensor) -> Exchange:
        return rail_adjoint(self.plans[i], y_MD, self.rail, self.node, self.trace, ("combine", i))

    def combine_grad(self, i: int, g_ND: torch.Tensor) -> Exchange:
        return rail_forward(self.plans[i], g_ND, self.rail, self.node, self.trace, ("combine_grad", i))

    def dispatch_grad(self, i: int, g_MD: torch.Tensor) -> Exchange:
        return rail_adjoint(self.unique_plans[i], g_MD, self.rail, self.node, self.trace, ("dispatch_grad", i))

    def x_grad(self, grads: list[torch.Tensor], zeros_TD: torch.Tensor) -> torch.Tensor:
        for tokens, g in zip(self.tokens, grads):
            zeros_TD.index_add_(0, tokens, g)
        return zeros_TD
