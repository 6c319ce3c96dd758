"""Ops against plain-torch references (autograd of index ops, a per-group loop)."""

from __future__ import annotations

import pytest
import torch

from semoe.ops import grouped_mm, grouped_mm_loop, pad_rows, permute, unpermute

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)


def test_permute_unpermute_match_autograd_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([3, 0, 0, 5, 2, 3, 1])
    w = torch.rand(7, dtype=torch.float64, requires_grad=True)
    y = permute(x, idx) * 2.0
    out = unpermute(y, idx, w, 6)
    ref = torch.zeros(6, 5, dtype=torch.float64).index_add(0, idx, x[idx] * 2.0 * w[:, None])
    torch.testing.assert_close(out, ref)
    assert torch.autograd.gradcheck(lambda a, b: unpermute(permute(a, idx), idx, b, 6), (x, w))


def test_permute_with_inverse_matches_scatter_backward() -> None:
    """A permutation's backward through its inverse (a gather) equals the scatter-add backward."""
    torch.manual_seed(0)
    perm = torch.randperm(9)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(9, 4, dtype=torch.float64)
    (ref,) = torch.autograd.grad(permute(x, perm), x, g)
    out = permute(x, perm, torch.argsort(perm))
    assert torch.equal(out, x[perm])
    (got,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda a: permute(a, perm, torch.argsort(perm)), (x,))
    with pytest.raises(ValueError, match="permutation of all 9 rows"):
        permute(x, perm[:5], torch.argsort(perm))


def test_pad_rows_gradcheck() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    slots = torch.tensor([7, 0, 2, 5])
    out = pad_rows(x, slots, 8)
    assert out[1].abs().sum() == 0 and torch.equal(out[7], x[0].detach())
    assert torch.autograd.gradcheck(lambda a: pad_rows(a, slots, 8), (x,))


@pytest.mark.parametrize("counts", [[5, 0, 3, 9], [0, 0, 0, 4], [2, 2, 2, 2]])
def test_grouped_mm_matches_loop(counts: list[int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 8, requires_grad=True)
    w = torch.randn(len(counts), 8, 6, requires_grad=True)
    out = grouped_mm(x, w, counts)
    out.sum().backward()  # expanded stride-0 gradient: must not trip _grouped_mm's backward
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = grouped_mm_loop(x, w, counts)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)


def test_grouped_mm_empty() -> None:
    out = grouped_mm(torch.zeros(0, 4), torch.randn(3, 4, 5), [0, 0, 0])
    assert out.shape == (0, 5)


def _ffn_reference(x, w1, w2, w3, counts):
    h = grouped_mm_loop(x, w1, counts)
    a = torch.nn.functional.gelu(h) if w3 is None else torch.nn.functional.silu(h) * grouped_mm_loop(x, w3, counts)
    return grouped_mm_loop(a, w2, counts)


def _grads(fn, x, params, c):
    out = fn(x)
    return [out.detach(), *torch.autograd.grad((out * c).sum(), [x, *params])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("counts", [[5, 0, 3, 9], [0, 0, 4, 0], [40, 7, 0, 25]])
def test_expert_ffn_matches_reference_and_reuses_buffers(swiglu: bool, counts: list[int], dtype) -> None:
    """Output, input and weight gradients against the per-expert loop of plain autograd ops.

    float64: equal to 1e-12 (both are exact to ~1e-16). float32 and bfloat16 round differently (the fused op
    writes activations into its buffers, the loop forms them functionally), so each is compared with the
    exact result, float64 math on the same rounded inputs: the fused op's error (Frobenius norm) must be at
    most twice the loop's, plus one unit of the dtype's rounding of the result. Both errors are sums of many
    independent roundings of the same size, so their ratio stays near 1 on any CPU; a wrong expert, row or
    transpose gives an error of the order of the result itself."""
    from semoe.ops import FFNWorkspace, expert_ffn

    torch.manual_seed(0)
    G, D, F = len(counts), 6, 10

    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape).to(dtype).requires_grad_(True)

    w1, w2 = make(G, D, F), make(G, F, D)
    w3 = make(G, D, F) if swiglu else None
    params = [w for w in (w1, w2, w3) if w is not None]
    exact_params = [w.detach().double().requires_grad_(True) for w in params]
    e1, e2 = exact_params[0], exact_params[1]
    e3 = exact_params[2] if swiglu else None
    ws = FFNWorkspace()
    for _ in range(3):  # later steps reuse the workspace buffers
        x, c = make(sum(counts), D), torch.randn(sum(counts), D).to(dtype)
        got = _grads(lambda t: expert_ffn(t, w1, w2, w3, counts, ws), x, params, c)
        want = _grads(lambda t: _ffn_reference(t, w1, w2, w3, counts), x, params, c)
        assert all(a.dtype == dtype for a in got)
        assert not ws.busy()
        if dtype == torch.float64:
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
            continue
        xe = x.detach().double().requires_grad_(True)
        exact = _grads(lambda t: _ffn_reference(t, e1, e2, e3, counts), xe, exact_params, c.double())
        unit = torch.finfo(dtype).eps
        for a, b, e in zip(got, want, exact):
            err_a, err_b = float((a.double() - e).norm()), float((b.double() - e).norm())
            assert err_a <= 2 * err_b + unit * float(e.norm()), (err_a, err_b, float(e.norm()))


def test_padded_rows() -> None:
    from semoe.ops.expert_ffn import padded_rows

    assert [padded_rows(n, 32) for n in (0, 1, 2, 3, 5, 17, 32, 33, 64, 65, 497)] == [
        0, 1, 2, 4, 8, 32, 32, 64, 64, 96, 512]
    assert [padded_rows(n, 1) for n in (0, 3, 497)] == [0, 3, 497]  # float32: no padding


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])  # bf16: the padded row blocks
def test_expert_ffn_two_forwards_before_backward(dtype) -> None:
    """A second forward while the first graph is alive must not overwrite the first one's buffers: the
    gradients equal those of two separate graphs of the same op (same ops, same order: bit-equal)."""
    from semoe.ops import FFNWorkspace, expert_ffn

    torch.manual_seed(0)
    counts = [3, 4]

    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape).to(dtype).requires_grad_(True)

    w1, w2, w3 = make(2, 4, 8), make(2, 8, 4), make(2, 4, 8)
    ws = FFNWorkspace()
    xa, xb = make(7, 4), make(7, 4)
    ya, yb = expert_ffn(xa, w1, w2, w3, counts, ws), expert_ffn(xb, w1, w2, w3, counts, ws)
    assert ws.busy()
    (ya.square().sum() + yb.sum()).backward()
    ref_a = torch.autograd.grad(expert_ffn(xa, w1, w2, w3, counts, FFNWorkspace()).square().sum(), [xa])[0]
    ref_b = torch.autograd.grad(expert_ffn(xb, w1, w2, w3, counts, FFNWorkspace()).sum(), [xb])[0]
    assert torch.equal(xa.grad, ref_a) and torch.equal(xb.grad, ref_b)
    del ya, yb
    assert not ws.busy()


def test_expert_ffn_never_overwrites_a_kept_weight_gradient() -> None:
    from semoe.ops import FFNWorkspace, expert_ffn

    torch.manual_seed(0)
    counts = [3, 5]
    w1, w2 = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True)
    ws = FFNWorkspace()
    x = torch.randn(8, 4)
    g1 = torch.autograd.grad(expert_ffn(x, w1, w2, None, counts, ws).sum(), [w1])[0]
    kept = g1.clone()
    g2 = torch.autograd.grad((2 * expert_ffn(x, w1, w2, None, counts, ws)).sum(), [w1])[0]
    assert torch.equal(g1, kept) and torch.allclose(g2, 2 * kept)
    # in-place accumulation into p.grad reuses the buffer and stays exact
    w1.grad = torch.zeros_like(w1)
    for _ in range(3):
        expert_ffn(x, w1, w2, None, counts, ws).sum().backward()
    torch.testing.assert_close(w1.grad, 3 * kept)


def test_expert_ffn_inference_mode_then_training() -> None:
    from semoe.ops import FFNWorkspace, expert_ffn

    w1, w2 = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True)
    ws = FFNWorkspace()
    with torch.inference_mode():
        a = expert_ffn(torch.randn(6, 4), w1, w2, None, [2, 4], ws)
    x = torch.randn(6, 4)
    expert_ffn(x, w1, w2, None, [2, 4], ws).sum().backward()  # buffers still usable outside inference mode
    assert a.shape == (6, 4) and w1.grad is not None


@pytest.mark.parametrize("rows", [0, 1, 700, 5000])
def test_unpermute_blocks_match_reference(rows: int) -> None:
    """More rows than one block (the op works in ~1 MiB blocks), duplicates, and double backward."""
    torch.manual_seed(0)
    T, D = 64, 96
    y = torch.randn(rows, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(rows, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, T, (rows,))
    c = torch.randn(T, D, dtype=torch.float64)
    out = unpermute(y, idx, w, T)
    ref = torch.zeros(T, D, dtype=torch.float64).index_add(0, idx, y * w[:, None])
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad((out * c).sum(), [y, w])
    want = torch.autograd.grad((ref * c).sum(), [y, w])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if rows:
        gy, _ = torch.autograd.grad((unpermute(y, idx, w, T) * c).sum(), [y, w], create_graph=True)
        (gg,) = torch.autograd.grad(gy.sum(), [w])  # d/dw of sum_n w[n] * sum_d c[idx[n], d]
        torch.testing.assert_close(gg, c[idx].sum(1))


def test_expert_ffn_never_overwrites_a_kept_input_gradient() -> None:
    from semoe.ops import FFNWorkspace, expert_ffn

    torch.manual_seed(0)
    counts = [3, 5]
    w1, w2 = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True)
    ws = FFNWorkspace()
    x = torch.randn(8, 4, requires_grad=True)
    (g1,) = torch.autograd.grad(expert_ffn(x, w1, w2, None, counts, ws).sum(), [x])
    kept = g1.clone()
    (g2,) = torch.autograd.grad((3 * expert_ffn(x, w1, w2, None, counts, ws)).sum(), [x])
    assert torch.equal(g1, kept) and torch.allclose(g2, 3 * kept)
    del g1, g2
    for _ in range(2):  # nobody holds it any more: the buffer is reused, results stay exact
        (g,) = torch.autograd.grad(expert_ffn(x, w1, w2, None, counts, ws).sum(), [x])
        torch.testing.assert_close(g, kept)
        del g


def test_expert_ffn_retain_graph_backward_twice() -> None:
    """The backward never writes into the saved activations: a retained graph can run backward again."""
    from semoe.ops import FFNWorkspace, expert_ffn

    torch.manual_seed(0)
    for swiglu in (False, True):
        w1, w2 = torch.randn(3, 4, 8, requires_grad=True), torch.randn(3, 8, 4, requires_grad=True)
        w3 = torch.randn(3, 4, 8, requires_grad=True) if swiglu else None
        x = torch.randn(9, 4, requires_grad=True)
        y = expert_ffn(x, w1, w2, w3, [4, 0, 5], FFNWorkspace())
        a = torch.autograd.grad(y.sum(), [x, w1], retain_graph=True)
        a = [t.clone() for t in a]
        b = torch.autograd.grad(y.sum(), [x, w1])
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v)


@pytest.mark.numerics
def test_expert_ffn_cast_weights_get_fresh_gradients() -> None:
    """Weights given as bfloat16 casts of float32 master weights (what the experts do under autocast): the
    master weights' gradients are bit-equal to those of the same op given the bfloat16 weights as leaves (the
    same GEMMs, converted by the cast's backward), and the workspace keeps no weight-sized gradient buffer (a
    buffer per layer would only hold a dead 16-bit copy of every layer's weight gradients)."""
    from semoe.ops import FFNWorkspace, expert_ffn

    torch.manual_seed(0)
    counts = [40, 0, 7, 25]
    G, D, F = len(counts), 8, 12
    masters = [torch.randn(G, D, F, requires_grad=True), torch.randn(G, F, D, requires_grad=True),
               torch.randn(G, D, F, requires_grad=True)]
    leaves = [m.detach().bfloat16().requires_grad_(True) for m in masters]
    x, c = torch.randn(sum(counts), D).bfloat16(), torch.randn(sum(counts), D).bfloat16()
    ws_cast, ws_leaf = FFNWorkspace(), FFNWorkspace()
    for _ in range(2):  # the second step: a reused workspace
        w1, w2, w3 = (m.to(torch.bfloat16) for m in masters)
        got = torch.autograd.grad((expert_ffn(x, w1, w2, w3, counts, ws_cast) * c).sum(), masters)
        want = torch.autograd.grad((expert_ffn(x, *leaves[:2], leaves[2], counts, ws_leaf) * c).sum(), leaves)
        for a, b in zip(got, want):
            assert a.dtype == torch.float32 and torch.equal(a, b.float())
    assert not {"g_w1", "g_w2", "g_w3"} & ws_cast._bufs.keys()
    assert {"g_w1", "g_w2", "g_w3"} <= ws_leaf._bufs.keys()
