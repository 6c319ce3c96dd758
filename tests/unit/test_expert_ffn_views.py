"""The inference expert FFN on per-expert weight views: bit-identical to the fused op on the stacked weights (and
to the loop impl), weights taken from separate buffers with the stacked parameter's strides; bad input refused."""

from __future__ import annotations

import pytest
import torch

from semoe.layers.experts import Experts
from semoe.ops.expert_ffn import expert_ffn
from semoe.ops.expert_ffn_views import expert_ffn_views


def _scattered(w_GAB: torch.Tensor, transposed: bool) -> list[torch.Tensor]:
    """Each ``w[g]`` copied into a buffer of its own (at some multiple of 64 bytes into it), as a cache entry holds
    it: the same shape and strides as ``w[g]`` (``transposed``: stored [B, A], viewed [A, B], as an HF file's
    ``t12`` view gives). (At an address that is not 64-byte aligned MKL's float32 GEMM rounds differently: the
    stacked tensor's rows and the ring's cache entries and slot rows are 64-byte aligned.)"""
    out = []
    for g in range(w_GAB.shape[0]):
        A, B = w_GAB.shape[1:]
        off = 64 // w_GAB.element_size() * (g + 1)
        buf = torch.empty(A * B + off, dtype=w_GAB.dtype)[off:]
        if transposed:
            v = buf.view(B, A).t()
        else:
            v = buf.view(A, B)
        v.copy_(w_GAB[g])
        assert v.stride() == w_GAB[g].stride()
        out.append(v)
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swiglu", [False, True])
def test_views_are_bit_identical_to_the_fused_op(dtype: torch.dtype, swiglu: bool) -> None:
    torch.manual_seed(0)
    G, D, Fd = 6, 48, 80
    # stacked as the ring binds HF weights: [G, F, D] storage viewed [G, D, F] (w1, w3) and [G, D, F] -> [G, F, D]
    w1 = torch.randn(G, Fd, D, dtype=dtype).transpose(1, 2)
    w3 = torch.randn(G, Fd, D, dtype=dtype).transpose(1, 2) if swiglu else None
    w2 = torch.randn(G, D, Fd, dtype=dtype).transpose(1, 2)
    for counts in ([3, 0, 1, 7, 0, 40], [1, 1, 0, 0, 0, 0], [0] * 6, [33, 2, 5, 9, 17, 1]):
        x = torch.randn(sum(counts), D, dtype=dtype)
        with torch.inference_mode():
            ref = expert_ffn(x, w1, w2, w3, counts)
            got = expert_ffn_views(x, _scattered(w1, True), _scattered(w2, True),
                                   _scattered(w3, True) if swiglu else None, counts)
        assert got.dtype == ref.dtype and torch.equal(got, ref)  # bit for bit: the same ops in the same order


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_views_compute_ready_groups_first_with_the_same_bits(dtype: torch.dtype) -> None:
    """Weights lent as :class:`LazyRows` (the ring's misses still being read): the groups ``ready`` now are fetched
    and computed first, the others after, each in id order; the output is bit-identical to the fused op's."""
    from semoe.inference.expert_views import LazyRows

    torch.manual_seed(1)
    G, D, Fd = 5, 48, 80
    w1 = torch.randn(G, Fd, D, dtype=dtype).transpose(1, 2)
    w3 = torch.randn(G, Fd, D, dtype=dtype).transpose(1, 2)
    w2 = torch.randn(G, D, Fd, dtype=dtype).transpose(1, 2)
    views = {"w1": _scattered(w1, True), "w3": _scattered(w3, True), "w2": _scattered(w2, True)}
    counts = [3, 0, 7, 1, 20]
    ready = {1, 3}  # group 1 has no rows: never fetched
    fetched: list[int] = []

    def get(g: int) -> dict[str, torch.Tensor]:
        if not fetched or fetched[-1] != g:
            fetched.append(g)
        return {name: v[g] for name, v in views.items()}

    lazy = {name: LazyRows(name, G, get, lambda g: g in ready) for name in views}
    x = torch.randn(sum(counts), D, dtype=dtype)
    with torch.inference_mode():
        ref = expert_ffn(x, w1, w2, w3, counts)
        got = expert_ffn_views(x, lazy["w1"], lazy["w2"], lazy["w3"], counts)
    assert torch.equal(got, ref)
    assert fetched == [3, 0, 2, 4]  # the ready group with rows first, then the rest in id order
    with pytest.raises(IndexError):
        lazy["w1"][G]


@pytest.mark.numerics
def test_views_reproduce_the_loop_impl_and_only_touch_used_groups() -> None:
    torch.manual_seed(1)
    ex = Experts(5, 32, 64, "swiglu", impl="loop")
    counts = [4, 0, 9, 0, 2]
    x = torch.randn(sum(counts), 32)
    with torch.inference_mode():
        ref = ex(x, counts)
        used = {g for g, n in enumerate(counts) if n}
        # groups without rows get a weight that would poison the result if it were read
        poison = [lambda w, g=g: w.detach()[g] if g in used else torch.full_like(w.detach()[g], float("nan"))
                  for g in range(5)]
        views = {n: [poison[g](getattr(ex, n)) for g in range(5)] for n in ("w1", "w2", "w3")}
        got = expert_ffn_views(x, views["w1"], views["w2"], views["w3"], counts, impl="loop")
        got_fused = expert_ffn_views(x, views["w1"], views["w2"], views["w3"], counts)
    assert torch.equal(got, ref)
    assert torch.isfinite(got_fused).all()


def test_bad_input_is_refused() -> None:
    w = [torch.randn(8, 16)]
    w2 = [torch.randn(16, 8)]
    with pytest.raises(RuntimeError, match="inference op"):
        expert_ffn_views(torch.randn(2, 8, requires_grad=True), w, w2, None, [2])
    with torch.inference_mode():
        with pytest.raises(ValueError, match="counts sum to 3"):
            expert_ffn_views(torch.randn(2, 8), w, w2, None, [3])
        with pytest.raises(ValueError, match="group 1 has rows but only 1 weight"):
            expert_ffn_views(torch.randn(2, 8), w, w2, None, [1, 1])
        with pytest.raises(ValueError, match="not 'padded'"):
            expert_ffn_views(torch.randn(2, 8), w, w2, None, [2], impl="padded")
