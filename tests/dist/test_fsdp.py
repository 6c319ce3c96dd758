"""apply_fsdp: dense parameters sharded over 2 data-parallel ranks (FSDP2, gloo) train exactly like the
unsharded model with the trainer's gradient rules (float64, 1e-10: FSDP2 reduce-scatters the sum and divides,
the plain path all-reduces and multiplies by 1/world, and shards its gradients' norms, so rounding differs)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from semoe.config import apply_overrides
from semoe.models.recipes import tiny
from semoe.models.transformer import MoETransformer
from semoe.parallel import apply_expert_parallel, build_mesh, sync_gradients
from semoe.parallel.fsdp import apply_fsdp
from semoe.parallel.mesh import dense_mesh
from tests.dist.launcher import run_ranks

pytestmark = pytest.mark.numerics


class _Both:
    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad()


def _run(rank: int, world: int) -> dict:
    cfg = apply_overrides(tiny(), ["model.moe.router.capacity_factor=none", "model.vocab_size=64"]).model
    mesh = build_mesh(1)  # ep 1: every rank holds every expert, dp = world
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = MoETransformer(cfg).double()
        apply_expert_parallel(m, mesh)
        models.append(m)
    ref, model = models
    apply_fsdp(model, dense_mesh())
    assert isinstance(model.layers[0], FSDPModule) and isinstance(model, FSDPModule)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    # DTensor (sharded dense) and plain (expert) parameters in separate foreach groups
    sharded = [p for p in model.parameters() if hasattr(p, "to_local")]
    plain = [p for p in model.parameters() if not hasattr(p, "to_local")]
    opt = _Both(torch.optim.AdamW(sharded, lr=1e-2, weight_decay=0.1, foreach=True),
                torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1, foreach=True))
    g = torch.Generator().manual_seed(1 + rank)
    losses = []
    for _ in range(4):
        x = torch.randint(0, 64, (2, 16), generator=g)
        pair = []
        for m, o in ((ref, opt_ref), (model, opt)):
            out = m(x)
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1)[:-1], x.flatten()[1:])
            loss.backward()
            if m is ref:
                sync_gradients(ref, mesh)
            else:  # experts are not FSDP's: the trainer's rule (sum over replicas / world)
                for n, p in m.named_parameters():
                    if ".experts." in n:
                        dist.all_reduce(p.grad)
                        p.grad.mul_(1.0 / world)
            o.step()
            o.zero_grad()
            pair.append(float(loss))
        losses.append(pair)
    diff = 0.0
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        full = b.full_tensor() if hasattr(b, "full_tensor") else b
        diff = max(diff, float((a.detach() - full.detach()).abs().max()))
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    return {"losses": losses, "diff": diff, "local": local, "full": sum(p.numel() for p in ref.parameters())}


def test_fsdp_dense_sharding_equals_unsharded(tmp_path) -> None:
    got = run_ranks(_run, 2, tmp_path)
    for g in got:
        for a, b in g["losses"]:
            assert a == pytest.approx(b, abs=1e-10)
        assert g["diff"] < 1e-10
        assert g["local"] < g["full"]  # dense parameters are sharded
