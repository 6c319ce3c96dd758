"""Compute precision: the "auto" decision, bf16 mixed precision in the MoE layer and the trainer."""

from __future__ import annotations

import pytest
import torch

from semoe import precision
from semoe.config import MoEConfig, RouterConfig, TrainConfig, apply_overrides
from semoe.layers import MoELayer
from semoe.precision import MatmulProbe, autocast, resolve_dtype
from semoe.training.trainer import Trainer
from tests.unit.test_train import tiny_run

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)


@pytest.mark.parametrize("probe,want", [
    (MatmulProbe(onednn_bf16=True, fp32_gflops=355.0, bf16_gflops=2124.0), torch.bfloat16),  # AMX Xeon
    (MatmulProbe(onednn_bf16=True, fp32_gflops=300.0, bf16_gflops=320.0), torch.float32),  # emulated bf16
    (MatmulProbe(onednn_bf16=False, fp32_gflops=150.0, bf16_gflops=0.0), torch.float32),  # AVX2 EPYC
])
def test_auto_follows_the_probe(monkeypatch, probe: MatmulProbe, want: torch.dtype) -> None:
    monkeypatch.setattr(precision, "cpu_matmul_probe", lambda: probe)
    assert resolve_dtype("auto", "cpu") == want
    assert resolve_dtype("float32", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    # CUDA: bf16 for training; inference keeps a 16-bit checkpoint's own dtype (no device needed to decide)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cuda", native=torch.float16) == torch.float16
    assert resolve_dtype("auto", "cuda", native=torch.float32) == torch.bfloat16


def test_probe_measures_this_cpu() -> None:
    p = precision.cpu_matmul_probe()
    assert p.fp32_gflops > 0
    assert (p.bf16_gflops > 0) == p.onednn_bf16
    assert p.fast_bf16 == (p.onednn_bf16 and p.bf16_gflops >= precision.FAST_RATIO * p.fp32_gflops)


def test_bad_dtype_names() -> None:
    with pytest.raises(ValueError, match=r"train\.dtype='half' is not supported; choose one of"):
        TrainConfig(dtype="half")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        resolve_dtype("int8")


@pytest.mark.parametrize("impl", ["grouped_mm", "loop", "padded"])
def test_layer_under_bf16_autocast(impl: str) -> None:
    """Experts (the fused CPU op included) compute in bf16 under autocast, the router stays float32, the
    combine sums in float32, gradients arrive float32 in the float32 parameters; the result is within
    bf16 rounding of the float32 layer (a few 2^-8 relative: operands rounded once per matmul)."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=64, d_ff=128, num_experts=4, activation="swiglu", expert_impl=impl,
                    router=RouterConfig(top_k=2, capacity_factor=2.0))
    layer = MoELayer(cfg).train()
    ref = MoELayer(cfg).train()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(256, 64)
    c = torch.randn(256, 64)
    seen: list[torch.dtype] = []
    layer.experts.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with autocast("cpu", torch.bfloat16):
        o = layer(x)
        logits, _ = layer.router.logits(x, layer.comm)
    assert seen == [torch.bfloat16] and logits.dtype == torch.float32 and o.out.dtype == torch.float32
    ((o.out * c).sum() + o.router_loss).backward()
    o_ref = ref(x)
    ((o_ref.out * c).sum() + o_ref.router_loss).backward()
    assert o.stats.tokens_per_expert.tolist() == o_ref.stats.tokens_per_expert.tolist()  # same routing
    rel = float((o.out - o_ref.out).detach().norm() / o_ref.out.detach().norm())
    assert 1e-4 < rel < 2e-2, rel  # really bf16 (not float32), and close
    for (name, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
        assert p.dtype == p.grad.dtype == torch.float32, name
        err = float((p.grad - q.grad).norm() / q.grad.norm())
        assert err < 3e-2, (name, err)


def test_trainer_bf16_mixed_precision(tmp_path, corpus_file, cache_dir) -> None:
    """train.dtype=bfloat16: float32 master weights and AdamW state, the loss falls like float32's."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        run = apply_overrides(tiny_run(corpus_file, steps=12, ckpt_every=100, eval_every=100),
                              [f"train.dtype={dtype}"])
        t = Trainer(run, tmp_path / dtype, cache_dir, resume=None)
        assert t.compute_dtype == getattr(torch, dtype)
        runs[dtype] = [t.train_step(s)["loss"] for s in range(12)]
        assert all(p.dtype == torch.float32 for p in t.model.parameters())
        state = t.optimizer.state[next(iter(t.model.parameters()))]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    f32, bf16 = runs["float32"], runs["bfloat16"]
    assert bf16[-1] < bf16[0] - 0.5
    assert bf16 != f32  # it computed in bf16
    assert abs(bf16[-1] - f32[-1]) < 0.1 * f32[-1]
