"""Grouped expert FFN (GELU or SwiGLU) as one autograd op, with reusable activation buffers.

Legend: N rows sorted by expert, G experts (groups), D d_model, F d_ff.

Why an op of its own: on a CPU, glibc serves every block above its mmap threshold (<= 32 MiB) with
fresh zero-filled pages, so each ``[N, F]`` activation of a step (64 MiB at 8192 rows x 2048) costs
~16k page faults. This op writes the activations and their gradients into buffers that live in a
:class:`FFNWorkspace` and are reused step after step (``torch.mm(out=...)`` per expert, out-variants
of the activation functions), and saves only what the backward needs (x, the pre-activations and the
activation output). It runs one expert at a time, forward and backward, so that an expert's
``[n, F]`` block is consumed while it is still in the last-level cache, and the backward's ``[n, F]``
temporaries need only expert-sized buffers. Weight gradients and the input gradient go into reused
buffers too when nothing else holds the previous one (so with ``zero_grad(set_to_none=False)``
autograd adds them into ``p.grad`` without a fresh allocation); a gradient someone kept is never
overwritten. Weights given as casts (autocast's bfloat16 copies) get fresh weight gradients: their casts'
backward converts and drops them at once, so only one layer's exist at a time. A workspace is lent to one forward at a
time: while a graph that saved its buffers is alive (its backward has not run), another forward
uses fresh tensors instead, so gradient accumulation, chunked pipelines or several forwards before a
backward stay correct.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence

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

    def grad_like(self, name: str, like: torch.Tensor, shape: torch.Size | None = None) -> torch.Tensor:
        """A buffer shaped like a weight (or input; ``shape`` overrides its shape) for its gradient, reused
        when nobody else holds the last one (after autograd added it into ``p.grad`` in place); a fresh tensor
        while someone does (e.g. the caller kept the result of ``torch.autograd.grad``, or ``p.grad`` took it
        over)."""
        shape = like.shape if shape is None else shape
        held = name in self._bufs and (sys.getrefcount(self._bufs[name]) > 2  # a Python reference elsewhere
                                        or self._bufs[name]._use_count() != 1)  # or a C++ one (p.grad)
        buf = self._bufs.get(name)
        if buf is None or held or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_empty(shape)
            self._bufs[name] = buf
        return buf

    def get(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        need = rows * cols
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(int(need * 1.25) + cols, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:need].view(rows, cols)


WeightRows = torch.Tensor | Sequence[torch.Tensor]  # a stacked [G, ...] tensor, or one tensor per group

ROW_BUCKET = 32  # bf16/fp16 on a CPU: expert row blocks padded to a power of two up to this, then its multiples


def padded_rows(n: int, bucket: int) -> int:
    """``n`` rounded up to a power of two while below ``bucket``, to a multiple of ``bucket`` above (0 stays 0).

    Why: oneDNN, which runs 16-bit matmuls on a CPU, builds (JIT-compiles) a kernel for every new matrix
    shape, ~2 ms each; an expert's row count changes with every call, so without rounding nearly every
    bf16 GEMM pays that (measured on a 2-core Xeon with AMX, 1 thread: [M,256]x[256,1024] at 116 GFLOP/s
    with M varying in 400..700, 469 with M fixed). Rounded, a few shapes recur and stay in oneDNN's cache;
    the zero rows cost <= 1/bucket of an expert's compute at batch sizes and nothing in the results."""
    if n == 0 or bucket <= 1:
        return n
    if n <= bucket:
        return 1 << (n - 1).bit_length()
    return -(-n // bucket) * bucket


def _spans(counts: list[int], bucket: int = 1) -> list[tuple[int, int, int, int, int]]:
    """(group, first row, rows, first padded row, padded rows) of every non-empty group."""
    out, start, pstart = [], 0, 0
    for g, n in enumerate(counts):
        if n:
            p = padded_rows(n, bucket)
            out.append((g, start, n, pstart, p))
            pstart += p
        start += n
    return out


def _bucket(t: torch.Tensor) -> int:
    return ROW_BUCKET if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) else 1


def _to_padded(src_ND: torch.Tensor, dst_PD: torch.Tensor, spans: list[tuple[int, int, int, int, int]]) -> None:
    """Rows of every group into its padded block of ``dst``, the padding rows zeroed."""
    for _, s, n, ps, p in spans:
        dst_PD[ps:ps + n].copy_(src_ND[s:s + n])
        if p > n:
            dst_PD[ps + n:ps + p].zero_()


def _from_padded(src_PD: torch.Tensor, dst_ND: torch.Tensor, spans: list[tuple[int, int, int, int, int]]) -> None:
    for _, s, n, ps, _ in spans:
        dst_ND[s:s + n].copy_(src_PD[ps:ps + n])


def forward_groups(x_PD: torch.Tensor, w1: WeightRows, w2: WeightRows, w3: WeightRows | None,
                   spans: list[tuple[int, int, int, int, int]], h1_PF: torch.Tensor, act_PF: torch.Tensor,
                   h3_PF: torch.Tensor | None, y_PD: torch.Tensor, keep: bool) -> None:
    """The forward's ops, one group after another: ``y[g] = act(x[g] @ w1[g]) @ w2[g]`` (GELU; SwiGLU when ``w3``
    is given) into ``y_PD``. ``w*[g]`` is a stacked ``[G, ...]`` tensor's row or a per-expert tensor of the same
    shape and strides (the ring's in-place views, ``ops.expert_ffn_views``): the same ops in the same order, so
    the same bits. ``keep``: every group's pre-activations and activation go to its own rows of ``h1_PF`` /
    ``h3_PF`` / ``act_PF`` (kept for the backward); otherwise they reuse the first rows of expert-sized chunks,
    and ``act_PF`` may be ``h1_PF`` itself (the activation in place)."""
    for g, _, _, ps, p in spans:
        x_p = x_PD[ps:ps + p]
        r = slice(ps, ps + p) if keep else slice(0, p)
        h1, act = h1_PF[r], act_PF[r]
        torch.mm(x_p, w1[g], out=h1)
        if w3 is None:
            torch.ops.aten.gelu.out(h1, out=act)  # in place where act is h1
        else:
            assert h3_PF is not None
            h3 = h3_PF[r]
            torch.mm(x_p, w3[g], out=h3)
            torch.ops.aten.silu.out(h1, out=act)
            act.mul_(h3)
        torch.mm(act, w2[g], out=y_PD[ps:ps + p])


class _ExpertFFN(torch.autograd.Function):
    """One expert at a time, forward and backward: each expert's ``[n, F]`` intermediates are produced and
    consumed while they are still in the last-level cache (an expert's block is ~8 MiB at the benchmark's
    sizes, the whole ``[N, F]`` is 64 MiB), and the backward's ``[n, F]`` temporaries live in a few
    expert-sized chunk buffers instead of ``[N, F]`` ones. The saved activations are never written to,
    so a graph kept with ``retain_graph=True`` can run backward again. In 16 bits on a CPU the rows of each
    expert sit in a block padded with zero rows (:func:`padded_rows`): P rows in all instead of N."""

    @staticmethod
    def forward(ctx, x_ND, w1, w2, w3, counts, ws):  # type: ignore[override]
        N, D, F = x_ND.shape[0], x_ND.shape[1], w1.shape[-1]
        spans = _spans(counts, _bucket(x_ND))
        padded = any(n != p for _, _, n, _, p in spans)
        P = spans[-1][3] + spans[-1][4] if spans else 0
        chunk = max((p for *_, p in spans), default=0)
        needs_grad = any(ctx.needs_input_grad[:4])
        # inference-mode tensors cannot be written outside inference mode later: no workspace there
        use_ws = ws is not None and not ws.busy() and not torch.is_inference_mode_enabled()

        def buf(name: str, rows: int, cols: int = F) -> torch.Tensor:
            return ws.get(name, rows, cols, x_ND) if use_ws else x_ND.new_empty((rows, cols))

        if use_ws and needs_grad:
            ctx.token = ws.lend()
        x_PD = x_ND
        if padded:
            x_PD = buf("x_pad", P, D)
            _to_padded(x_ND, x_PD, spans)
        y_ND = x_ND.new_empty((N, w2.shape[-1]))
        y_PD = buf("y_pad", P, D) if padded else y_ND
        swiglu = w3 is not None
        if needs_grad:  # keep every expert's pre-activations and activation output for the backward
            h1_PF, act_PF = buf("h1", P), buf("act", P)
            h3_PF = buf("h3", P) if swiglu else None
        else:  # nothing is kept: one expert-sized chunk (two for SwiGLU), activations in place
            h1_PF = act_PF = buf("h1", chunk)
            h3_PF = buf("h3", chunk) if swiglu else None
        forward_groups(x_PD, w1, w2, w3, spans, h1_PF, act_PF, h3_PF, y_PD, keep=needs_grad)
        if padded:
            _from_padded(y_PD, y_ND, spans)
        ctx.spans, ctx.padded, ctx.ws, ctx.use_ws, ctx.swiglu = spans, padded, ws, use_ws, swiglu
        # weights given as casts (autocast's 16-bit copies of float32 master weights: non-leaf tensors): the cast's
        # backward converts their gradients at once and drops them, so a buffer kept per layer would only hold
        # three weight-sized 16-bit tensors per layer for the whole run; fresh ones live one layer at a time
        ctx.cast_w = [w is not None and w.grad_fn is not None for w in (w1, w2, w3)]
        if needs_grad:
            ctx.x_shape = x_ND.shape
            ctx.save_for_backward(x_PD, w1, w2, w3, h1_PF, h3_PF, act_PF)
        return y_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ND):  # type: ignore[override]
        x_PD, w1, w2, w3, h1_PF, h3_PF, act_PF = ctx.saved_tensors
        ws, swiglu, spans, padded = ctx.ws, ctx.swiglu, ctx.spans, ctx.padded
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        need_w3 = swiglu and ctx.needs_input_grad[3]
        g_ND = g_ND.contiguous()
        chunk, F = max((p for *_, p in spans), default=0), h1_PF.shape[1]
        P, D = x_PD.shape

        def buf(name: str, rows: int = chunk, cols: int = F) -> torch.Tensor:
            return ws.get(name, rows, cols, x_PD) if ctx.use_ws else x_PD.new_empty((rows, cols))

        def wgrad(name: str, w: torch.Tensor, needed: bool, cast: bool) -> torch.Tensor | None:
            if not needed:
                return None
            return ws.grad_like(name, w) if ctx.use_ws and not cast else torch.empty_like(w)

        g_PD = g_ND
        if padded:
            g_PD = buf("g_pad", P, D)
            _to_padded(g_ND, g_PD, spans)
        g_x = None
        if need_x:
            g_x = ws.grad_like("g_x", x_PD, ctx.x_shape) if ctx.use_ws else x_PD.new_empty(ctx.x_shape)
        g_xP = (buf("g_x_pad", P, D) if padded else g_x) if need_x else None
        g_w1, g_w2 = wgrad("g_w1", w1, need_w1, ctx.cast_w[0]), wgrad("g_w2", w2, need_w2, ctx.cast_w[1])
        g_w3 = wgrad("g_w3", w3, need_w3, ctx.cast_w[2]) if swiglu else None
        busy = {g for g, *_ in spans}
        for g_w in (g_w1, g_w2, g_w3):  # experts without rows get a zero gradient
            for g in range(0 if g_w is None else g_w.shape[0]):
                if g not in busy:
                    g_w[g].zero_()
        g_act_c = buf("g_act")
        if swiglu:
            g_sw_c, silu_c = buf("g_silu"), buf("silu")
        for g, _, _, ps, p in spans:
            x_p, g_p = x_PD[ps:ps + p], g_PD[ps:ps + p]
            h1, act = h1_PF[ps:ps + p], act_PF[ps:ps + p]
            g_act = g_act_c[:p]
            torch.mm(g_p, w2[g].t(), out=g_act)
            if g_w2 is not None:
                torch.mm(act.t(), g_p, out=g_w2[g])
            if not swiglu:
                g_h1 = torch.ops.aten.gelu_backward.grad_input(g_act, h1, grad_input=g_act)  # in place
                g_h3 = None
            else:
                h3 = h3_PF[ps:ps + p]
                g_h1 = torch.mul(g_act, h3, out=g_sw_c[:p])  # d loss / d silu(h1)
                torch.ops.aten.silu_backward.grad_input(g_h1, h1, grad_input=g_h1)
                g_h3 = g_act.mul_(torch.ops.aten.silu.out(h1, out=silu_c[:p]))
            if g_w1 is not None:
                torch.mm(x_p.t(), g_h1, out=g_w1[g])
            if g_w3 is not None:
                torch.mm(x_p.t(), g_h3, out=g_w3[g])
            if g_xP is not None:
                g_x_p = torch.mm(g_h1, w1[g].t(), out=g_xP[ps:ps + p])
                if g_h3 is not None:
                    g_x_p.addmm_(g_h3, w3[g].t())
        if padded and g_x is not None:
            _from_padded(g_xP, g_x, spans)
        if ctx.use_ws and hasattr(ctx, "token"):
            ws.release()
        return g_x, g_w1, g_w2, g_w3, None, None


def expert_ffn(x_ND: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None,
               counts: list[int], workspace: FFNWorkspace | None = None) -> torch.Tensor:
    """``y = act(x @ w1[g]) @ w2[g]`` per group g of rows (GELU; SwiGLU when ``w3`` is given:
    ``(silu(x @ w1[g]) * (x @ w3[g])) @ w2[g]``). ``counts[g]`` rows belong to group g."""
    return _ExpertFFN.apply(x_ND.contiguous(), w1, w2, w3, list(counts), workspace)
