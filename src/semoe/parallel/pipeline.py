"""Chunked dispatch -> experts -> combine with communication overlapped with the experts, forward and
backward, under one autograd function.

Legend: T local tokens, D hidden, N rows this rank dispatches, M rows it receives, R ranks of the
group, E experts, L local experts, C chunks.

Chunking. Chunk c is the rows of a range of each sender's tokens (``Route.counts_CREK``); the layer
counted its tokens per chunk in the one count exchange it does anyway, so every rank knows every
chunk's counts: no count exchange per chunk. All copies of a token (top-k) are in the same chunk, so
node-level de-duplication is as good as unchunked. Chunk c is an ordinary (smaller) all-to-all;
capacity and dropping were decided before chunking, so each row meets the same expert as unchunked,
and the outputs are put back in the unchunked row order.

Schedule (:func:`run_chunks`, the same forward and backward): the exchange into the experts for
chunks 0 and 1 is launched before chunk 0 computes; after chunk i computes, its exchange back is
launched, every exchange still in flight that was launched before chunk i computed is advanced by one
hop (waited, next hop launched), and chunk i+2's exchange in is launched. So the all-to-all of chunk
i+1 (and the return of chunk i-1) runs while chunk i's experts compute. Forward: in = dispatch, out =
combine. Backward: in = the combine's gradient to the owners, compute = the experts' backward of that
chunk (``torch.autograd.grad`` of the graph recorded in forward), out = the dispatch's gradient back.
With a trace list, every launch, wait (and whether the collective had already completed when waited
for) and compute start/end is recorded in order, which is how the tests check the overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from semoe.layers.comm import ExpertFn, Route
from semoe.parallel.all_to_all import Exchange


def _block_rows(starts: torch.Tensor, lo: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Concatenated ranges ``starts[b] + lo[b] + arange(sizes[b])`` over blocks b."""
    total = int(sizes.sum())
    first = torch.repeat_interleave(starts + lo, sizes, output_size=total)
    within = torch.arange(total) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes, output_size=total)
    return first + within


@dataclass(frozen=True)
class Chunk:
    """Chunk i of a route, as seen by this rank."""

    counts_RR: torch.Tensor  # [R, R] rows rank s sends rank d in this chunk (CPU)
    send_rows: torch.Tensor  # indices into this rank's N dispatched rows, ordered by receiver (device)
    recv_rows: torch.Tensor  # positions of the received rows in the whole source-major receive buffer (device)
    counts_SL: torch.Tensor  # [R, L] rows received per (source, local expert) (CPU)
    rank: int  # this rank in the group

    @property
    def send_splits(self) -> list[int]:
        return self.counts_RR[self.rank].tolist()

    @property
    def recv_splits(self) -> list[int]:
        return self.counts_RR[:, self.rank].tolist()


def split_route(route: Route, device: torch.device) -> list[Chunk]:
    """The chunks of ``route`` (see the module docstring)."""
    C, R, E, K = route.counts_CREK.shape
    L, r = E // R, route.rank
    part_CRG = route.counts_CREK.reshape(C, R, E * K)  # G: (expert, choice) blocks, the send order
    before_CRG = torch.cumsum(part_CRG, 0) - part_CRG  # rows of a block in earlier chunks
    full_RG = part_CRG.sum(0)
    send_starts = torch.cumsum(full_RG[r], 0) - full_RG[r]
    mine = slice(r * L * K, (r + 1) * L * K)  # this rank's (local expert, choice) blocks
    recv_full = full_RG[:, mine].reshape(-1)  # receive buffer: (source, local expert, choice) blocks
    recv_starts = torch.cumsum(recv_full, 0) - recv_full
    out = []
    for i in range(C):
        part, recv_before = part_CRG[i], before_CRG[i][:, mine].reshape(-1)
        out.append(Chunk(
            counts_RR=part.view(R, R, L * K).sum(-1),
            send_rows=_block_rows(send_starts, before_CRG[i, r], part[r]).to(device),
            recv_rows=_block_rows(recv_starts, recv_before, part[:, mine].reshape(-1)).to(device),
            counts_SL=part[:, mine].view(R, L, K).sum(-1), rank=r))
    return out


class _Ex:
    """Drives one :data:`Exchange` generator: created = its first hop launched."""

    def __init__(self, gen: Exchange) -> None:
        self.gen, self.done, self.result = gen, False, None
        self.advance()

    def advance(self) -> None:
        if self.done:
            return
        try:
            next(self.gen)
        except StopIteration as stop:
            self.done, self.result = True, stop.value

    def finish(self) -> torch.Tensor:
        while not self.done:
            self.advance()
        assert self.result is not None
        return self.result


def run_chunks(chunks: int, make_in: Callable[[int], Exchange], compute: Callable[[int, torch.Tensor], torch.Tensor],
               make_out: Callable[[int, torch.Tensor], Exchange], trace: list | None, tag: str) -> list[torch.Tensor]:
    """in(i) -> compute(i) -> out(i) for every chunk, chunk i+1's exchanges in flight while chunk i
    computes. The launch order depends only on ``chunks``, so it is the same on every rank."""
    ins = {0: _Ex(make_in(0))}
    if chunks > 1:
        ins[1] = _Ex(make_in(1))
    outs: list[_Ex] = []
    for i in range(chunks):
        x = ins.pop(i).finish()
        if trace is not None:
            trace.append(("compute", tag, i, "start"))
        y = compute(i, x)
        if trace is not None:
            trace.append(("compute", tag, i, "end"))
        outs.append(_Ex(make_out(i, y)))
        if i + 1 in ins:
            ins[i + 1].advance()
        if i >= 1:
            outs[i - 1].advance()
        if i + 2 < chunks:
            ins[i + 2] = _Ex(make_in(i + 2))
    return [o.finish() for o in outs]


class Transport:
    """How rows travel for one :class:`ExpertPipeline` call (flat or hierarchical): four directions per
    chunk, each an :data:`Exchange`, and how the dispatch gradients become the ``x_TD`` gradient."""

    def dispatch(self, i: int, x_TD: torch.Tensor) -> Exchange:
        raise NotImplementedError

    def combine(self, i: int, y_MD: torch.Tensor) -> Exchange:
        raise NotImplementedError

    def combine_grad(self, i: int, g_ND: torch.Tensor) -> Exchange:
        raise NotImplementedError

    def dispatch_grad(self, i: int, g_MD: torch.Tensor) -> Exchange:
        raise NotImplementedError

    def x_grad(self, grads: list[torch.Tensor], zeros_TD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ExpertPipeline:
    """One ``run_experts`` call: dispatch, experts and combine over ``chunks``, and its backward."""

    def __init__(self, route: Route, chunk_list: list[Chunk], transport: Transport, expert_fn: ExpertFn,
                 params: Sequence[torch.nn.Parameter], trace: list | None) -> None:
        self.route, self.chunks, self.transport = route, chunk_list, transport
        self.expert_fn, self.params, self.trace = expert_fn, list(params), trace
        self.saved: list[tuple[torch.Tensor, torch.Tensor] | None] = []

    def forward(self, x_TD: torch.Tensor, record: bool) -> torch.Tensor:
        """``y_ND`` (detached); with ``record``, each chunk's expert graph is kept for :meth:`backward`."""
        self.x_shape, self.x_dtype = x_TD.shape, x_TD.dtype

        def compute(i: int, x_MD: torch.Tensor) -> torch.Tensor:
            c = self.chunks[i]
            if not record:
                return self.expert_fn(x_MD, c.counts_SL, c.recv_rows)
            x_MD = x_MD.detach().requires_grad_(True)
            with torch.enable_grad():
                y_MD = self.expert_fn(x_MD, c.counts_SL, c.recv_rows)
            self.saved.append((x_MD, y_MD))
            return y_MD.detach()

        ys = run_chunks(len(self.chunks), lambda i: self.transport.dispatch(i, x_TD), compute,
                        self.transport.combine, self.trace, "forward")
        return _assemble([c.send_rows for c in self.chunks], ys, self.route.token_N.numel())

    def backward(self, grad_ND: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(gradient of ``x_TD``, gradients of ``params``)."""
        grad_ND = grad_ND.contiguous()
        wanted = [p for p in self.params if p.requires_grad]
        param_grads: list[torch.Tensor | None] = [None] * len(wanted)

        def compute(i: int, g_MD: torch.Tensor) -> torch.Tensor:
            saved, self.saved[i] = self.saved[i], None  # free each chunk's graph as soon as it is used
            assert saved is not None
            x_MD, y_MD = saved
            if not y_MD.requires_grad:  # no rows: nothing depends on the inputs
                return torch.zeros_like(x_MD)
            got = torch.autograd.grad(y_MD, [x_MD, *wanted], g_MD.to(y_MD.dtype), allow_unused=True)
            for k, g in enumerate(got[1:]):
                if g is not None:
                    param_grads[k] = g if param_grads[k] is None else param_grads[k] + g
            return got[0] if got[0] is not None else torch.zeros_like(x_MD)

        gs = run_chunks(len(self.chunks), lambda i: self.transport.combine_grad(
            i, grad_ND.index_select(0, self.chunks[i].send_rows)), compute, self.transport.dispatch_grad,
            self.trace, "backward")
        self.saved = []
        grad_x = self.transport.x_grad(gs, grad_ND.new_zeros(self.x_shape, dtype=self.x_dtype))
        it = iter(param_grads)
        return grad_x, [next(it) if p.requires_grad else None for p in self.params]


def _assemble(rows: list[torch.Tensor], parts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Put chunk outputs back in the unchunked row order: ``out[rows[i]] = parts[i]`` (exact copies)."""
    ref = parts[0]
    out = ref.new_empty((n, *ref.shape[1:]))
    return out.index_copy_(0, torch.cat(rows), torch.cat(parts))


class _PipelineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pipe: ExpertPipeline, x_TD: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.pipe = pipe
        return pipe.forward(x_TD, record=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND: torch.Tensor):  # type: ignore[override]
        pipe, ctx.pipe = ctx.pipe, None
        grad_x, grads = pipe.backward(grad_ND)
        return (None, grad_x, *grads)


def run_pipeline(pipe: ExpertPipeline, x_TD: torch.Tensor) -> torch.Tensor:
    """``y_ND`` of ``pipe`` on ``x_TD``, differentiable in ``x_TD`` and ``pipe.params`` when grad is on."""
    if torch.is_grad_enabled() and (x_TD.requires_grad or any(p.requires_grad for p in pipe.params)):
        return _PipelineFunction.apply(pipe, x_TD, *pipe.params)
    return pipe.forward(x_TD, record=False)
