"""Routed experts computed where their weights lie: per-expert views instead of a stacked, copied tensor.

In a compact routed pass (``RingEngine``, CPU) the picked experts' weights lie in expert cache entries (hits and
admitted reads, pinned while in use) or in rows of the compact slot (reads the cache did not admit). This module
turns those byte buffers into per-expert weight views (:class:`ExpertViews`, shapes and strides as ``w[g]`` of the
stacked parameter has them) and runs a layer's :class:`~semoe.layers.experts.Experts` on them for one call
(:func:`experts_on_views`), through :func:`~semoe.ops.expert_ffn_views.expert_ffn_views`, which repeats the fused
op's ops in its order: the outputs are bit-identical to the resident model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from semoe.inference.sections import ExpertLayer, ParamView, Section
from semoe.layers.experts import Experts

__all__ = ["ExpertViews", "experts_on_views", "supports_views"]

Placement = tuple[torch.Tensor, tuple[tuple[int, int], ...]]  # byte buffer, (offset, nbytes) per stacked region


def supports_views(experts: Experts) -> bool:
    """Whether :func:`expert_ffn_views` reproduces this module's impl ("grouped_mm": the fused CPU op, or "loop")."""
    return experts.impl in ("grouped_mm", "loop")


class ExpertViews:
    """For one MoE layer: how an expert's byte buffer (an expert cache entry, or a row of the slot) becomes its
    ``w1`` / ``w3`` / ``w2`` (the section's :class:`ParamView` s applied to ``[1, ...]`` views of the row)."""

    def __init__(self, section: Section, xl: ExpertLayer, dtype: torch.dtype) -> None:
        shapes = {r.key: r.shape[1:] for r in section.regions}
        keys = [key for key, _ in xl.row_numel]
        self.dtype = dtype
        self.rows = [(key, shapes[key]) for key in keys]  # stacked regions in row order
        prefix = f"layers.{xl.layer}.moe.experts."
        self.params: list[tuple[str, ParamView]] = [(v.param.removeprefix(prefix), v) for v in section.views
                                                    if v.region in keys and v.param.startswith(prefix)]

    def weights(self, placements: list[Placement]) -> dict[str, list[torch.Tensor]]:
        """Parameter name ("w1", "w3", "w2") -> one view per placement (group g = placement g)."""
        out: dict[str, list[torch.Tensor]] = {name: [] for name, _ in self.params}
        for buf, ranges in placements:
            regs = {key: buf[off:off + n].view(self.dtype).view(1, *shape)
                    for (key, shape), (off, n) in zip(self.rows, ranges)}
            for name, pv in self.params:
                out[name].append(pv.apply(regs[pv.region])[0])
        return out


@contextmanager
def experts_on_views(experts: Experts, weights: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Within the block, ``experts`` computes group g with ``weights[...][g]`` instead of its bound parameters
    (lent through its ``weight_views``: no patched ``forward``)."""
    if not supports_views(experts):
        raise ValueError(f"experts impl {experts.impl!r} cannot run on per-expert views")
    experts.weight_views = weights
    try:
        yield
    finally:
        experts.weight_views = None
