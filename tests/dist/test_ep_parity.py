"""Expert-parallel MoE layer == the single-process layer on the same seed and global batch:
forward output, aux losses and every parameter gradient, for every router kind, with uneven token
counts per rank (one rank may have none) and experts that get no tokens.

In float64: the two layouts multiply differently shaped blocks (per rank vs the whole batch, so other
GEMM kernels and blockings) and sum gradients over ranks in another order. The float64 results then
differ by ~1e-15 relative, far below the 1e-10 tolerance on any CPU, and a routing decision (top-k,
capacity) cannot flip on a near-tie the way it can in float32, where logits differ in the last bit."""

from __future__ import annotations

import pytest
import torch

from semoe.config import MoEConfig, RouterConfig
from semoe.layers import MoELayer
from semoe.parallel import apply_expert_parallel, build_mesh, clip_grad_norm_, grad_norm, sync_gradients
from tests.dist.launcher import run_ranks

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)

D, E = 16, 8
TOL = 1e-10  # float64: see the module docstring
SPLITS = {2: [13, 6], 4: [9, 0, 5, 7]}  # uneven local token counts; rank 1 of 4 has none

CASES = {
    "top1_switch": RouterConfig(top_k=1, capacity_factor=1.0),
    "top2_gshard": RouterConfig(top_k=2, capacity_factor=1.25),
    "top2_dropless_renorm": RouterConfig(top_k=2, capacity_factor=None, normalize_topk=True),
    "top3_sigmoid": RouterConfig(top_k=3, score_func="sigmoid", capacity_factor=None, normalize_topk=True),
    "top2_capacity_score": RouterConfig(top_k=2, capacity_factor=0.75, drop_policy="score"),
    "top2_random_second": RouterConfig(top_k=2, second_expert="random", capacity_factor=1.0),
    "top2_noisy": RouterConfig(top_k=2, noise="gaussian", capacity_factor=None, seed=3),
    "top1_jitter": RouterConfig(top_k=1, noise="jitter", jitter_eps=0.1, capacity_factor=1.5, seed=5),
    "expert_choice": RouterConfig(kind="expert_choice", top_k=2, capacity_factor=1.0),
    "aux_free_bias": RouterConfig(top_k=2, capacity_factor=None, bias_update_rate=0.01),
}


def make_cfg(name: str, impl: str = "grouped_mm", shared: bool = False) -> MoEConfig:
    return MoEConfig(d_model=D, d_ff=24, num_experts=E, activation="swiglu", router=CASES[name],
                     expert_impl=impl, num_shared_experts=1 if shared else 0, shared_d_ff=20,
                     shared_expert_gate=shared)


def make_layer(cfg: MoEConfig) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(cfg).double()
    with torch.no_grad():  # starve the last expert so that some experts get zero tokens
        layer.router.weight[-1, 0] = -10.0  # input feature 0 is always 1 (see make_batch)
    return layer


def make_batch(total: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(total, D, generator=g, dtype=torch.float64)
    x[:, 0] = 1.0
    return x, torch.randn(total, D, generator=g, dtype=torch.float64)


def reference(cfg: MoEConfig, groups: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Single-process layer, one forward per expert-parallel group; objective = mean over groups."""
    layer = make_layer(cfg).train()
    outs, auxes, zs = [], [], []
    total = 0.0
    for x, c in groups:
        layer.router.calls.zero_()
        x = x.clone().requires_grad_(True)
        o = layer(x)
        total = total + ((o.out * c).sum() + o.router_loss) / len(groups)
        outs.append(o.out.detach())
        auxes.append(float(o.aux_loss.detach()))
        zs.append(float(o.z_loss.detach()))
    total.backward()
    return {"out": outs, "aux": auxes, "z": zs, "grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
            "bias": layer.router.expert_bias.clone(), "norm": float(torch.cat(
                [p.grad.reshape(-1) for p in layer.parameters()]).norm())}


def ep_rank_fn(rank: int, world: int, name: str, impl: str, shared: bool, ep_size: int, splits: list[int]) -> dict:
    cfg = make_cfg(name, impl, shared)
    layer = make_layer(cfg).train()
    mesh = build_mesh(ep_size)
    apply_expert_parallel(layer, mesh)
    dp_index, ep_index = divmod(rank, ep_size)
    x_all, c_all = make_batch(sum(splits) * (world // ep_size))
    group_tokens = sum(splits)
    start = dp_index * group_tokens + sum(splits[:ep_index])
    n = splits[ep_index]
    x = x_all[start:start + n].clone().requires_grad_(True)
    o = layer(x)
    loss = ep_size * (o.out * c_all[start:start + n]).sum() + o.router_loss
    loss.backward()
    sync_gradients(layer, mesh)
    norm = float(grad_norm(layer, mesh))
    return {"out": o.out.detach(), "aux": float(o.aux_loss), "z": float(o.z_loss),
            "grads": {k: p.grad.clone() for k, p in layer.named_parameters()},
            "offset": layer.experts.expert_offset, "local": layer.experts.num_local_experts,
            "bias": layer.router.expert_bias.clone(), "norm": norm, "dropped": o.stats.dropped,
            "zero_experts": int((o.stats.tokens_per_expert == 0).sum())}


def check(results: list[dict], ref: dict, ep_size: int, splits: list[int]) -> None:
    for rank, res in enumerate(results):
        dp_index, ep_index = divmod(rank, ep_size)
        lo = sum(splits[:ep_index])
        torch.testing.assert_close(res["out"], ref["out"][dp_index][lo:lo + splits[ep_index]], atol=TOL, rtol=TOL)
        assert res["aux"] == pytest.approx(ref["aux"][dp_index], abs=TOL)
        assert res["z"] == pytest.approx(ref["z"][dp_index], abs=TOL)
        torch.testing.assert_close(res["bias"], ref["bias"], atol=TOL, rtol=0)
        for name, g in res["grads"].items():
            want = ref["grads"][name]
            if ".experts." in f".{name}":
                want = want[res["offset"]:res["offset"] + res["local"]]
            assert g.dtype == torch.float64
            torch.testing.assert_close(g, want, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")
        assert res["norm"] == pytest.approx(ref["norm"], rel=TOL)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_single_process(tmp_path, name: str, world: int) -> None:
    splits = SPLITS[world]
    x, c = make_batch(sum(splits))
    ref = reference(make_cfg(name), [(x, c)])
    results = run_ranks(ep_rank_fn, world, tmp_path, name, "grouped_mm", False, world, splits)
    check(results, ref, world, splits)
    if CASES[name].kind == "topk":  # expert choice fills every expert by construction
        assert any(r["zero_experts"] > 0 for r in results), "the test should include experts with zero tokens"


@pytest.mark.parametrize("name,impl,shared", [("top2_gshard", "padded", True), ("top2_capacity_score", "loop", True),
                                              ("top2_dropless_renorm", "grouped_mm", True)])
def test_ep_dp_2x2_grad_rules(tmp_path, name: str, impl: str, shared: bool) -> None:
    """4 ranks = 2 replicas x ep 2: dense grads averaged over the world, expert grads over replicas."""
    splits = [7, 10]
    x, c = make_batch(2 * sum(splits))
    n = sum(splits)
    ref = reference(make_cfg(name, impl, shared), [(x[:n], c[:n]), (x[n:], c[n:])])
    results = run_ranks(ep_rank_fn, 4, tmp_path, name, impl, shared, 2, splits)
    check(results, ref, 2, splits)


def _clip_fn(rank: int, world: int) -> dict:
    cfg = make_cfg("top2_dropless_renorm")
    layer = make_layer(cfg).train()
    mesh = build_mesh(2)
    apply_expert_parallel(layer, mesh)
    x, c = make_batch(12)
    x = x[rank * 6:(rank + 1) * 6]
    o = layer(x)
    (2 * (o.out * c[rank * 6:(rank + 1) * 6]).sum() + o.router_loss).backward()
    sync_gradients(layer, mesh)
    before = float(clip_grad_norm_(layer, 0.01, mesh))
    after = float(grad_norm(layer, mesh))
    return {"before": before, "after": after}


def test_clip_counts_each_expert_once(tmp_path) -> None:
    x, c = make_batch(12)
    ref = reference(make_cfg("top2_dropless_renorm"), [(x, c)])
    results = run_ranks(_clip_fn, 2, tmp_path)
    for r in results:
        assert r["before"] == pytest.approx(ref["norm"], rel=TOL)
        assert r["after"] == pytest.approx(0.01, rel=1e-3)  # max_norm / (norm + 1e-6): the 1e-6 shows


def _bias_fn(rank: int, world: int) -> list[float]:
    from semoe.parallel.grads import sync_router_bias

    cfg = make_cfg("aux_free_bias")
    layer = make_layer(cfg).train()
    mesh = build_mesh(2)  # 2 replicas x ep 2
    apply_expert_parallel(layer, mesh)
    x, _ = make_batch(40)
    layer(x[rank * 10:(rank + 1) * 10])  # each replica sees other tokens, so its bias moves differently
    before = layer.router.expert_bias.clone()
    sync_router_bias(layer, mesh)
    return [before.tolist(), layer.router.expert_bias.tolist()]


def test_aux_free_bias_is_synchronised_over_replicas(tmp_path) -> None:
    res = run_ranks(_bias_fn, 4, tmp_path)
    befores, afters = [r[0] for r in res], [r[1] for r in res]
    assert befores[0] == befores[1] and befores[2] == befores[3]  # equal inside an ep group
    assert befores[0] != befores[2]  # replicas drifted apart
    for a in afters:
        assert a == pytest.approx([(p + q) / 2 for p, q in zip(befores[0], befores[2])], abs=TOL)
