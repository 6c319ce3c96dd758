"""The model's attention under 16-bit compute on a CPU: a training pass with small heads runs it in float32
(torch's 16-bit CPU flash-attention backward is slow there), inference and large heads keep the 16-bit kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semoe.models.transformer import SMALL_HEAD, _attention

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)


def _qkv(head: int, dtype: torch.dtype, grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 16, head, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("autocast", [False, True])
def test_small_heads_train_in_float32(autocast: bool) -> None:
    dtype = torch.bfloat16
    q, k, v = _qkv(32, torch.float32 if autocast else dtype, True)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        y = _attention(q, k, v, is_causal=True)
    assert y.dtype == dtype
    q16, k16, v16 = (t.detach().to(dtype).float() for t in (q, k, v))  # the 16-bit inputs, computed in float32
    ref = F.scaled_dot_product_attention(q16, k16, v16, is_causal=True).to(dtype)
    assert torch.equal(y, ref)  # the same float32 kernel on the same inputs, then the same rounding
    y.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_small_heads_grads_match_the_16_bit_kernel_to_its_noise() -> None:
    q, k, v = _qkv(32, torch.bfloat16, True)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    gy = torch.randn(2, 4, 16, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    _attention(q, k, v, is_causal=True).backward(gy)
    F.scaled_dot_product_attention(q2, k2, v2, is_causal=True).backward(gy)
    for a, b in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        # bf16 keeps 8 bits: the 16-bit kernel's own rounding of intermediates is ~2^-8 relative of the largest
        assert (a.float() - b.float()).abs().max() <= 2 ** -6 * b.float().abs().max()


@pytest.mark.parametrize("head,grad", [(32, False), (SMALL_HEAD, True)])
def test_inference_and_large_heads_keep_the_16_bit_kernel(head: int, grad: bool) -> None:
    q, k, v = _qkv(head, torch.bfloat16, grad)
    with torch.set_grad_enabled(grad):
        y = _attention(q, k, v, is_causal=True)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(y, ref)
