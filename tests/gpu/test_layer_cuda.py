"""The MoE layer and a training run on CUDA: the same outputs and gradients as on the CPU (float32, the
grouped_mm path falls back to per-expert matmuls off Hopper; bf16 through ``torch._grouped_mm`` on
Hopper), and the trainer's loss falls."""

from __future__ import annotations

import copy

import pytest
import torch

from semoe.config import MoEConfig, RouterConfig
from semoe.layers import MoELayer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


CASES = [(impl, act, cf) for impl in ("grouped_mm", "loop", "padded") for act in ("swiglu", "gelu")
         for cf in (1.25, None) if not (impl == "padded" and cf is None)]  # padded needs a capacity


@pytest.mark.parametrize("impl,activation,cf", CASES)
def test_layer_cuda_matches_cpu(impl: str, activation: str, cf: float | None) -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=64, d_ff=128, num_experts=8, activation=activation, expert_impl=impl,
                    router=RouterConfig(top_k=2, capacity_factor=cf, min_capacity=1))
    cpu = MoELayer(cfg).train()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 33, 64)
    c = torch.randn(4, 33, 64)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    try:
        outs = []
        for layer, dev in ((cpu, "cpu"), (gpu, "cuda")):
            xi = x.to(dev).requires_grad_(True)
            o = layer(xi)
            ((o.out * c.to(dev)).sum() + o.router_loss).backward()
            outs.append((o, xi.grad))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    (oc, gxc), (og, gxg) = outs
    assert oc.stats.tokens_per_expert.tolist() == og.stats.tokens_per_expert.tolist()
    torch.testing.assert_close(og.out.cpu(), oc.out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gxg.cpu(), gxc, atol=1e-4, rtol=1e-4)
    for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(pg.grad.cpu(), pc.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_layer_cuda_bf16_grouped_mm_matches_loop() -> None:
    """bfloat16 on CUDA (``torch._grouped_mm`` on Hopper, else per-expert matmuls) against the per-expert loop
    in bfloat16: same routing, outputs and gradients within bfloat16 rounding."""
    torch.manual_seed(0)
    outs = []
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    base = MoELayer(MoEConfig(d_model=64, d_ff=128, num_experts=8, activation="swiglu",
                              router=RouterConfig(top_k=2, capacity_factor=None)))
    for impl in ("grouped_mm", "loop"):
        layer = copy.deepcopy(base)
        layer.experts.impl = impl
        layer = layer.cuda().to(torch.bfloat16).train()
        o = layer(x)
        o.out.float().pow(2).mean().backward()
        outs.append((o.out.float(), layer.experts.w1.grad.float(), o.stats.tokens_per_expert.tolist()))
    (y_g, g_g, n_g), (y_l, g_l, n_l) = outs
    assert n_g == n_l and torch.isfinite(y_g).all() and torch.isfinite(g_g).all()
    for a, b in ((y_g, y_l), (g_g, g_l)):  # bfloat16 keeps ~3 significant digits; sums in other orders
        assert float((a - b).norm() / b.norm()) < 0.02


def test_training_loss_falls_on_cuda(tmp_path, corpus_file, cache_dir) -> None:
    from tests.unit.test_train import tiny_run

    from semoe.training.trainer import Trainer

    trainer = Trainer(tiny_run(corpus_file, steps=30), tmp_path / "run", cache_dir)
    assert trainer.device.type == "cuda"
    result = trainer.fit()
    assert result.last_val_loss < result.first_val_loss - 1.0
