"""Grouped expert FFN (GELU or SwiGLU) as one autograd op, with reusable activation buffers.

Legend: N rows sorted by expert, G experts (groups), D d_model, F d_ff.

Why an op of its own: on a CPU, glibc serves every block above its mmap threshold (<= 32 MiB) with
fresh zero-filled pages, so each ``[N, F]`` activation of a step (64 MiB at 8192 rows x 2048) costs
~16k page faults. This op writes the activations and their gradients into buffers that live in a
:class:`FFNWorkspace` and are reused step after step (``torch.mm(out=...)`` per expert, out-variants
of the activation functions), and saves only what the backward needs (x, the pre-activations and the
activation output). Weight gradients go into reused buffers too when nothing else holds the previous
one (so with ``zero_grad(set_to_none=False)`` autograd adds them into ``p.grad`` without a fresh
allocation); a gradient someone kept is never overwritten. A workspace is lent to one forward at a
time: while a graph that saved its buffers is alive (its backward has not run), another forward
uses fresh tensors instead, so gradient accumulation, chunked pipelines or several forwards before a
backward stay correct.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch.autograd.function import once_differentiable


class _Token:
    """Held by the autograd context of the forward that borrowed the workspace."""


class FFNWorkspace:
    """Reusable ``[rows, cols]`` buffers keyed by name, grown by 25% headroom when too small."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self._owner: weakref.ref | None = None

    def busy(self) -> bool:
        return self._owner is not None and self._owner() is not None

    def lend(self) -> _Token:
        token = _Token()
        self._owner = weakref.ref(token)
        return token

    def release(self) -> None:
        self._owner = None

    def grad_like(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like a weight for its gradient, reused when nobody else holds the last one
        (after autograd added it into ``p.grad`` in place); a fresh tensor while someone does (e.g. the
        caller kept the result of ``torch.autograd.grad``, or ``p.grad`` took it over)."""
        held = name in self._bufs and (sys.getrefcount(self._bufs[name]) > 2  # a Python reference elsewhere
                                        or self._bufs[name]._use_count() != 1)  # or a C++ one (p.grad)
        buf = self._bufs.get(name)
        if buf is None or held or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty_like(like)
            self._bufs[name] = buf
        return buf

    def get(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        need = rows * cols
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(int(need * 1.25) + cols, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:need].view(rows, cols)


def _mm_groups(a_NK: torch.Tensor, w_GKM: torch.Tensor, out_NM: torch.Tensor, counts: list[int],
               transpose_w: bool = False) -> torch.Tensor:
    start = 0
    for g, n in enumerate(counts):
        if n:
            w = w_GKM[g].t() if transpose_w else w_GKM[g]
            torch.mm(a_NK[start:start + n], w, out=out_NM[start:start + n])
        start += n
    return out_NM


def _weight_grads(a_NK: torch.Tensor, g_NM: torch.Tensor, counts: list[int], grad: torch.Tensor) -> torch.Tensor:
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.mm(a_NK[start:start + n].t(), g_NM[start:start + n], out=grad[g])
        else:
            grad[g].zero_()
        start += n
    return grad


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1, w2, w3, counts, ws):  # type: ignore[override]
        N, F = x_ND.shape[0], w1.shape[-1]
        needs_grad = any(ctx.needs_input_grad[:4])
        # inference-mode tensors cannot be written outside inference mode later: no workspace there
        use_ws = ws is not None and not ws.busy() and not torch.is_inference_mode_enabled()

        def buf(name: str) -> torch.Tensor:
            return ws.get(name, N, F, x_ND) if use_ws else x_ND.new_empty((N, F))

        if use_ws and needs_grad:
            ctx.token = ws.lend()
        h1 = _mm_groups(x_ND, w1, buf("h1"), counts)
        act = buf("act")
        if w3 is None:
            torch.ops.aten.gelu.out(h1, out=act)
            h3 = None
        else:
            h3 = _mm_groups(x_ND, w3, buf("h3"), counts)
            torch.ops.aten.silu.out(h1, out=act)
            act.mul_(h3)
        y_ND = _mm_groups(act, w2, x_ND.new_empty((N, w2.shape[-1])), counts)
        ctx.counts, ctx.ws, ctx.use_ws, ctx.swiglu = counts, ws, use_ws, w3 is not None
        ctx.save_for_backward(x_ND, w1, w2, w3, h1, h3, act)
        return y_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ND):  # type: ignore[override]
        x_ND, w1, w2, w3, h1, h3, act = ctx.saved_tensors
        counts, ws = ctx.counts, ctx.ws
        g_ND = g_ND.contiguous()
        N, F = h1.shape

        def buf(name: str) -> torch.Tensor:
            return ws.get(name, N, F, x_ND) if ctx.use_ws else x_ND.new_empty((N, F))

        def wgrad(name: str, w: torch.Tensor) -> torch.Tensor:
            return ws.grad_like(name, w) if ctx.use_ws else torch.empty_like(w)

        g_act = _mm_groups(g_ND, w2, buf("g_act"), counts, transpose_w=True)
        g_w2 = _weight_grads(act, g_ND, counts, wgrad("g_w2", w2))
        if not ctx.swiglu:
            g_h1 = torch.ops.aten.gelu_backward.grad_input(g_act, h1, grad_input=act)  # act is free now
            g_w1 = _weight_grads(x_ND, g_h1, counts, wgrad("g_w1", w1))
            g_x = _mm_groups(g_h1, w1, x_ND.new_empty(x_ND.shape), counts, transpose_w=True)
            g_w3 = None
        else:
            torch.mul(g_act, h3, out=act)  # d act / d silu(h1)
            g_h1 = torch.ops.aten.silu_backward.grad_input(act, h1, grad_input=h3)  # h3 is free after the line above
            torch.ops.aten.silu.out(h1, out=act)
            g_h3 = g_act.mul_(act)
            g_w1 = _weight_grads(x_ND, g_h1, counts, wgrad("g_w1", w1))
            g_w3 = _weight_grads(x_ND, g_h3, counts, wgrad("g_w3", w3))
            g_x = _mm_groups(g_h1, w1, x_ND.new_empty(x_ND.shape), counts, transpose_w=True)
            start = 0
            for g, n in enumerate(counts):  # g_x += g_h3 @ w3^T
                if n:
                    g_x[start:start + n].addmm_(g_h3[start:start + n], w3[g].t())
                start += n
        if ctx.use_ws and hasattr(ctx, "token"):
            ws.release()
        return g_x, g_w1, g_w2, g_w3, None, None


def expert_ffn(x_ND: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None,
               counts: list[int], workspace: FFNWorkspace | None = None) -> torch.Tensor:
    """``y = act(x @ w1[g]) @ w2[g]`` per group g of rows (GELU; SwiGLU when ``w3`` is given:
    ``(silu(x @ w1[g]) * (x @ w3[g])) @ w2[g]``). ``counts[g]`` rows belong to group g."""
    return _ExpertFFN.apply(x_ND.contiguous(), w1, w2, w3, list(counts), workspace)
