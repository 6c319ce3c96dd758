"""Gradient fusion: N optimizer steps with bucketed asynchronous reduction equal the plain per-class
reduction (losses and parameters), with gradient accumulation, a parameter that never gets a gradient,
dp replicas of the experts; buckets go out during backward; the trainer with every switch on matches
the trainer with none.

The two reductions add the ranks' gradients in different orders (other bucket boundaries, rings and
two-level sums), so they agree only up to rounding, and AdamW turns a last-bit difference in a gradient
that nearly cancels into a visible difference of the update (it divides by sqrt(v)): in float32, 3 steps
gave 2.4e-6 on one CPU's kernels and passed 1e-6 on another's. So these runs are in float64: the
gradients then differ by at most ~world * 2^-52 of their summands' magnitude (~1e-19 here), and an
AdamW step moves a parameter by at most lr * |d grad| / eps_adam more (1e-2 * 1e-19 / 1e-8 = 1e-13),
far below the 1e-10 tolerance whatever the CPU's kernels; bit-equality claims stay bit-equality."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

from semoe.config import ModelConfig, MoEConfig, RouterConfig, apply_overrides
from semoe.models.transformer import MoETransformer
from semoe.parallel import apply_expert_parallel, build_mesh, clip_grad_norm_, sync_gradients
from semoe.parallel.fusion import GradFusion, param_class
from semoe.training.trainer import Trainer
from tests.dist.launcher import run_ranks
from tests.unit.test_train import tiny_run

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)

STEPS, MICRO = 3, 2
TOL = {"abs": 1e-10, "rel": 1e-10}  # float64 runs; the module docstring derives it


def small_model() -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_ff=48, num_experts=4, activation="swiglu",
                    router=RouterConfig(top_k=2, capacity_factor=1.25))
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                                       dense_d_ff=48, moe=moe))
    model.unused = nn.Parameter(torch.ones(3))  # never gets a gradient: its bucket must still go out
    return model.double()  # see the module docstring


def _train_fn(rank: int, world: int, ep_size: int, fused: bool, bucket_mb: float,
              ranks_per_node: int | None = None) -> dict:
    model = small_model()
    mesh = build_mesh(ep_size)
    apply_expert_parallel(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    fusion = GradFusion(model, mesh, bucket_mb, ranks_per_node) if fused else None
    g = torch.Generator().manual_seed(100 + rank)
    losses, hooked = [], 0
    for step in range(STEPS):
        for m in range(MICRO):
            tokens = torch.randint(0, 64, (2, 9), generator=g)
            last = m == MICRO - 1
            with fusion.no_sync() if fusion is not None and not last else nullcontext():
                out = model(tokens[:, :-1])
                loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
                ((loss + out.router_loss) / MICRO).backward()
            losses.append(float(loss))
        if fusion is not None:
            fusion.finish()
        else:
            sync_gradients(model, mesh)
        clip_grad_norm_(model, 0.5, mesh)
        opt.step()
        opt.zero_grad(set_to_none=fusion is None or step % 2 == 1)  # fusion re-attaches its views either way
    hier = {}
    if fusion is not None:
        hooked, hier = fusion.launched_by_hook, fusion.hierarchical
        fusion.remove()
    return {"losses": losses, "params": {k: p.detach().clone() for k, p in model.named_parameters()},
            "hooked": hooked, "buckets": fusion.num_buckets if fusion else {}, "hier": hier}


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 2)])
def test_fusion_equals_plain_reduction(tmp_path, world: int, ep_size: int) -> None:
    plain = run_ranks(_train_fn, world, tmp_path, ep_size, False, 1.0)
    fused = run_ranks(_train_fn, world, tmp_path, ep_size, True, 0.01)  # ~10 KiB buckets: several per class
    for a, b in zip(plain, fused):
        assert b["losses"] == pytest.approx(a["losses"], **TOL)
        for name, p in a["params"].items():
            torch.testing.assert_close(b["params"][name], p, atol=TOL["abs"], rtol=TOL["rel"],
                                       msg=lambda m, n=name: f"{n}: {m}")
        assert all(n >= 1 for n in b["buckets"].values()) and b["buckets"]["dense"] > 1
        assert b["hooked"] > 0, "no bucket was reduced during backward"


@pytest.mark.parametrize("ep_size,expect", [
    (4, {"dense": True, "router": True, "expert": False}),   # experts have one replica: nothing to reduce
    (2, {"dense": True, "router": True, "expert": False}),   # expert replicas {0,2}, {1,3}: one rank per node
    (1, {"dense": True, "router": True, "expert": True}),    # pure data parallel: experts replicated on all 4
])
def test_hierarchical_fusion_equals_plain(tmp_path, ep_size: int, expect: dict) -> None:
    """4 ranks as 2 nodes x 2: reduce-scatter in the node, all-reduce on the rail, all-gather in the node
    gives the plain reduction's training run (the sum order differs: float64 tolerance), replicas stay
    bit-identical across ranks."""
    plain = run_ranks(_train_fn, 4, tmp_path, ep_size, False, 1.0)
    fused = run_ranks(_train_fn, 4, tmp_path, ep_size, True, 0.003, 2)  # odd-sized buckets: padded shards
    for a, b in zip(plain, fused):
        assert b["hier"] == expect
        assert b["losses"] == pytest.approx(a["losses"], **TOL)
        for name, p in a["params"].items():
            torch.testing.assert_close(b["params"][name], p, atol=TOL["abs"], rtol=TOL["rel"],
                                       msg=lambda m, n=name: f"{n}: {m}")
        assert b["hooked"] > 0 and b["buckets"]["dense"] > 2
    for name, p in fused[0]["params"].items():
        if param_class(name) != "expert" or ep_size == 1:
            for other in fused[1:]:
                assert torch.equal(other["params"][name], p), f"{name} differs between replicas"


def _bad_rpn(rank: int, world: int) -> str:
    try:
        GradFusion(small_model(), build_mesh(world), 1.0, ranks_per_node=3)
    except ValueError as e:
        return str(e)
    return "no error"


def test_hierarchical_fusion_bad_ranks_per_node(tmp_path) -> None:
    for msg in run_ranks(_bad_rpn, 4, tmp_path):
        assert "ranks_per_node=3 does not divide the world size 4" in msg
    with pytest.raises(ValueError, match="hierarchical_grads reduces the fusion buckets"):
        apply_overrides(tiny_run(Path("x")), ["parallel.grad_fusion=false", "parallel.hierarchical_grads=true"])


def test_param_classes() -> None:
    assert param_class("layers.0.moe.experts.w1") == "expert"
    assert param_class("layers.0.moe.router.weight") == "router"
    assert param_class("layers.0.moe.shared.w1") == "dense"
    assert param_class("tok_emb.weight") == "dense"


def _bad_bucket(rank: int, world: int, bucket_mb: float) -> str:
    try:
        GradFusion(small_model(), build_mesh(world), bucket_mb)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("bucket_mb", [0.0, -1.0])
def test_bad_bucket_size(tmp_path, bucket_mb: float) -> None:
    for msg in run_ranks(_bad_bucket, 2, tmp_path, bucket_mb):
        assert "bucket_mb must be > 0" in msg
    with pytest.raises(ValueError, match="bucket_mb"):
        apply_overrides(tiny_run(Path("x")), [f"parallel.bucket_mb={bucket_mb}"])


def _trainer_fn(rank: int, world: int, run, out: str, cache: str) -> dict:
    t = Trainer(run, Path(out), Path(cache), resume=None)
    losses = [t.train_step(s)["loss"] for s in range(3)]
    return {"losses": losses, "params": {k: p.detach().clone() for k, p in t.model.named_parameters()}}


def test_trainer_switches_match_defaults(tmp_path, corpus_file, cache_dir) -> None:
    """4 ranks as 2 nodes x 2, grad_accum 2: fusion + hierarchical all-to-all + 2 chunks + hierarchical
    gradient reduction == none of them (float64 runs, for the reason in the module docstring)."""
    base = apply_overrides(tiny_run(corpus_file, steps=3, ckpt_every=100),
                           ["train.grad_accum=2", "parallel.grad_fusion=false", "train.dtype=float64"])
    on = apply_overrides(base, ["parallel.grad_fusion=true", "parallel.bucket_mb=0.05",
                                "parallel.hierarchical_a2a=true", "parallel.ranks_per_node=2", "parallel.a2a_chunks=2",
                                "parallel.hierarchical_grads=true"])
    ref = run_ranks(_trainer_fn, 4, tmp_path, base, str(tmp_path / "a"), str(cache_dir))
    got = run_ranks(_trainer_fn, 4, tmp_path, on, str(tmp_path / "b"), str(cache_dir))
    for a, b in zip(ref, got):
        assert b["losses"] == pytest.approx(a["losses"], **TOL)
        for name, p in a["params"].items():
            assert p.dtype == torch.float64
            torch.testing.assert_close(b["params"][name], p, atol=TOL["abs"], rtol=TOL["rel"])
