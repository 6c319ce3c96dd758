"""The grouped expert FFN for inference, each expert's weights a tensor of its own (no stacked ``[E, ...]`` tensor).

Legend: N rows sorted by expert, G experts (groups), D d_model, F d_ff.

Why: the ring's routed passes (``semoe.inference``) keep an expert's weights wherever they already are: an entry of
the expert cache, or the row of a compact slot a disk read went to. Stacking them into one ``[G, D, F]`` tensor
would be a copy on the critical path after the router; this op takes, per group, views of those weights.

The ops and their order are exactly those of :func:`semoe.ops.expert_ffn.expert_ffn` without gradients (the
forward of ``_ExpertFFN``): in 16 bits on a CPU each group's rows are padded with zero rows to
:func:`~semoe.ops.expert_ffn.padded_rows`, then per group ``mm(x, w1, out=h1)``, GELU (or SiLU times
``mm(x, w3)``) in place in an expert-sized chunk buffer, ``mm(act, w2, out=y)``; so a view with the shape and strides
that ``w[g]`` of the stacked tensor has gives bit-identical outputs. ``impl="loop"`` mirrors
:func:`semoe.ops.grouped_mm.grouped_mm_loop` (``x_g @ w[g]`` per group, the activation elementwise) instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from semoe.ops.expert_ffn import _bucket, _from_padded, _spans, _to_padded, forward_groups

__all__ = ["expert_ffn_views"]


def expert_ffn_views(x_ND: torch.Tensor, w1: Sequence[torch.Tensor], w2: Sequence[torch.Tensor],
                     w3: Sequence[torch.Tensor] | None, counts: Sequence[int], impl: str = "grouped_mm"
                     ) -> torch.Tensor:
    """``y = act(x @ w1[g]) @ w2[g]`` per group g of rows (GELU; SwiGLU when ``w3`` is given), where ``w1[g]``
    (``[D, F]``), ``w3[g]`` and ``w2[g]`` (``[F, D]``) are separate tensors; ``counts[g]`` rows belong to group g
    (groups without rows need no weights: ``w1[g]`` is not touched). A weight sequence with a ``ready(g)`` method
    (:class:`~semoe.inference.expert_views.LazyRows`) has the groups ready now computed first. Inference only (no
    autograd). ``impl``: the
    :class:`~semoe.layers.experts.Experts` impl whose results to reproduce bit for bit: "grouped_mm" (the fused CPU
    op) or "loop"."""
    if torch.is_grad_enabled() and (x_ND.requires_grad or any(w.requires_grad for w in w1)):
        raise RuntimeError("expert_ffn_views is an inference op (no backward): call it under torch.no_grad() or "
                           "torch.inference_mode()")
    if impl not in ("grouped_mm", "loop"):
        raise ValueError(f"expert_ffn_views reproduces impl 'grouped_mm' or 'loop', not {impl!r}")
    if sum(counts) != x_ND.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)}, but x has {x_ND.shape[0]} rows")
    used = [g for g, n in enumerate(counts) if n]
    if used and max(used) >= len(w1):
        raise ValueError(f"group {max(used)} has rows but only {len(w1)} weight tensors were given")
    if impl == "loop":
        return _loop(x_ND, w1, w2, w3, counts)
    x_ND = x_ND.contiguous()
    N, D = x_ND.shape
    spans = _spans(list(counts), _bucket(x_ND))
    padded = any(n != p for _, _, n, _, p in spans)
    P = spans[-1][3] + spans[-1][4] if spans else 0
    chunk = max((p for *_, p in spans), default=0)
    ready = getattr(w1, "ready", None)
    if ready is not None and len(spans) > 1:  # weights still being read (the ring's misses): the groups whose weights
        # are in place first, the others after, each in id order (each group's ops and rows are its own: same bits)
        spans = sorted(spans, key=lambda sp: not ready(sp[0]))
    first = spans[0][0] if spans else 0
    Fd = w1[first].shape[-1] if used else 0
    x_PD = x_ND
    if padded:
        x_PD = x_ND.new_empty((P, D))
        _to_padded(x_ND, x_PD, spans)
    y_ND = x_ND.new_empty((N, w2[first].shape[-1] if used else D))
    y_PD = x_ND.new_empty((P, D)) if padded else y_ND
    h1_c = x_ND.new_empty((chunk, Fd))
    h3_c = x_ND.new_empty((chunk, Fd)) if w3 is not None else None
    forward_groups(x_PD, w1, w2, w3, spans, h1_c, h1_c, h3_c, y_PD, keep=False)
    if padded:
        _from_padded(y_PD, y_ND, spans)
    return y_ND


def _loop(x_ND: torch.Tensor, w1: Sequence[torch.Tensor], w2: Sequence[torch.Tensor],
          w3: Sequence[torch.Tensor] | None, counts: Sequence[int]) -> torch.Tensor:
    """``Experts(impl="loop")``'s ops: per-group matmuls, the activation over all rows at once (an elementwise
    kernel's vector body and scalar tail may round differently, so it runs over the same tensor as there)."""
    if not x_ND.shape[0]:
        return x_ND.new_zeros((0, x_ND.shape[1]))

    def mm(x: torch.Tensor, ws: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([xg @ ws[g] for g, xg in enumerate(torch.split(x, list(counts), dim=0)) if xg.shape[0]])

    h1 = mm(x_ND, w1)
    act = F.silu(h1) * mm(x_ND, w3) if w3 is not None else F.gelu(h1)
    return mm(act, w2)
