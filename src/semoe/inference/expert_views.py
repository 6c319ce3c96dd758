"""Routed experts computed where their weights lie: per-expert views instead of a stacked, copied tensor.

In a compact routed pass (``RingEngine``, CPU) the picked experts' weights lie in expert cache entries (hits and
admitted reads, pinned while in use) or in rows of the compact slot (reads the cache did not admit). This module
turns those byte buffers into per-expert weight views (:class:`ExpertViews`, shapes and strides as ``w[g]`` of the
stacked parameter has them) and runs a layer's :class:`~semoe.layers.experts.Experts` on them for one call
(:func:`experts_on_views`), through :func:`~semoe.ops.expert_ffn_views.expert_ffn_views`, which repeats the fused
op's ops in its order: the outputs are bit-identical to the resident model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
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
        for p in placements:
            for name, t in self.one(p).items():
                out[name].append(t)
        return out

    def one(self, placement: Placement) -> dict[str, torch.Tensor]:
        """Parameter name -> the view of one expert's weights."""
        buf, ranges = placement
        regs = {key: buf[off:off + n].view(self.dtype).view(1, *shape)
                for (key, shape), (off, n) in zip(self.rows, ranges)}
        return {name: pv.apply(regs[pv.region])[0] for name, pv in self.params}

    def lazy(self, groups: int, fetch: Callable[[int], Placement], ready: Callable[[int], bool]
             ) -> dict[str, Sequence[torch.Tensor]]:
        """Parameter name -> a sequence of ``groups`` views whose item g is built on first use from ``fetch(g)`` (which
        may wait for the expert's read); ``ready(g)``: whether it would not wait (``expert_ffn_views`` computes those
        groups first)."""
        memo: dict[int, dict[str, torch.Tensor]] = {}

        def get(g: int) -> dict[str, torch.Tensor]:
            if g not in memo:
                memo[g] = self.one(fetch(g))
            return memo[g]

        return {name: LazyRows(name, groups, get, ready) for name, _ in self.params}


class LazyRows(Sequence[torch.Tensor]):
    """One parameter's per-group weight views, each built when first indexed (see :meth:`ExpertViews.lazy`)."""

    def __init__(self, name: str, groups: int, get: Callable[[int], dict[str, torch.Tensor]],
                 ready: Callable[[int], bool]) -> None:
        self.name, self.groups, self._get, self.ready = name, groups, get, ready

    def __len__(self) -> int:
        return self.groups

    def __getitem__(self, g: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= g < self.groups:
            raise IndexError(g)
        return self._get(g)[self.name]


@contextmanager
def experts_on_views(experts: Experts, weights: Mapping[str, Sequence[torch.Tensor]]) -> Iterator[None]:
    """Within the block, ``experts`` computes group g with ``weights[...][g]`` instead of its bound parameters
    (lent through its ``weight_views``: no patched ``forward``)."""
    if not supports_views(experts):
        raise ValueError(f"experts impl {experts.impl!r} cannot run on per-expert views")
    experts.weight_views = weights  # type: ignore[assignment]
    try:
        yield
    finally:
        experts.weight_views = None
