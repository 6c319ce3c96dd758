"""The Trainer with ``parallel.fsdp=true`` (dense parameters sharded over 2 ranks with FSDP2, experts under
expert parallelism or in the expert store) trains like the Trainer without it, and its checkpoints resume
into a run with or without FSDP.

Float64, 1e-10: FSDP reduce-scatters each micro-batch's dense gradients (sum, then / world) where the plain
path all-reduces the accumulated ones and multiplies by 1/world, and the norm sums shards' squares, so the
rounding differs; every other op is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from semoe.config import apply_overrides
from semoe.training.trainer import Trainer
from tests.dist.launcher import run_ranks
from tests.unit.test_train import tiny_run

def _full_params(t: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter at its full value (collective: FSDP shards are gathered), experts read from the store."""
    out = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
           for n, p in t.model.named_parameters()}
    if t.offload is not None:
        for k in t.offload.keys:
            out[k.name] = t.offload.store.acquire(f"{k.name}/W").clone()
            t.offload.store.release(f"{k.name}/W")
    return out


def _pair(rank: int, world: int, run, out: str, cache: str, steps: int) -> dict:
    ref = Trainer(run, Path(out) / "ref", Path(cache), resume=None)
    sh = Trainer(apply_overrides(run, ["parallel.fsdp=true"]), Path(out) / "fsdp", Path(cache), resume=None)
    assert ref.fusion is not None and sh.fusion is None
    rows = [(ref.train_step(s), sh.train_step(s)) for s in range(steps)]
    pa, pb = _full_params(ref), _full_params(sh)
    dense = [(n, p) for n, p in sh.model.named_parameters() if ".experts." not in n]
    return {"ref": [a["loss"] for a, _ in rows], "fsdp": [b["loss"] for _, b in rows],
            "norm_ref": [a["grad_norm"] for a, _ in rows], "norm_fsdp": [b["grad_norm"] for _, b in rows],
            "names": (sorted(pa), sorted(pb)),
            "diff": max(float((pa[n] - pb[n]).abs().max()) for n in pa),
            "sharded": all(isinstance(p, DTensor) for _, p in dense),
            "experts_plain": all(not isinstance(p, DTensor) for n, p in sh.model.named_parameters()
                                 if ".experts." in n),
            "local": sum(p.to_local().numel() for _, p in dense), "full": sum(p.numel() for _, p in dense),
            "offloaded": sh.offload is not None}


@pytest.mark.numerics
@pytest.mark.parametrize("ep,budget", [(1, 0.0), (2, 0.0), (2, 1.2)], ids=["dp2", "ep2", "ep2-offload"])
def test_fsdp_trainer_equals_unsharded(tmp_path, corpus_file, cache_dir, ep: int, budget: float) -> None:
    """6 steps, AdamW with weight decay, grad accumulation 2, clipping active; dp 2 (ep 1), ep 2, and ep 2 with
    the experts in the expert store."""
    run = apply_overrides(tiny_run(corpus_file, steps=6, ckpt_every=100, dtype="float64", grad_accum=2,
                                   grad_clip=0.5),
                          [f"parallel.ep_size={ep}", f"storage.budget_mb={budget}"])
    got = run_ranks(_pair, 2, tmp_path, run, str(tmp_path / "run"), str(cache_dir), 6, timeout=900)
    for r, g in enumerate(got):
        assert g["fsdp"] == pytest.approx(g["ref"], abs=1e-10, rel=0), r
        assert g["norm_fsdp"] == pytest.approx(g["norm_ref"], abs=1e-10, rel=0), r
        assert g["names"][0] == g["names"][1]
        assert g["diff"] < 1e-10, (r, g["diff"])
        assert g["sharded"] and g["experts_plain"] and g["local"] < g["full"]
        assert g["offloaded"] == (budget > 0)
    assert got[0]["ref"] == got[1]["ref"]  # the mean over ranks
    assert any(n > 0.5 for n in got[0]["norm_ref"])  # clipping was active


def _save(rank: int, world: int, run, out: str, cache: str) -> list[float]:
    ref = Trainer(run, Path(out) / "ref", Path(cache), resume=None).fit().losses
    t = Trainer(apply_overrides(run, ["parallel.fsdp=true"]), Path(out) / "fsdp", Path(cache), resume=None)
    for s in range(3):
        t.train_step(s)
    t.save(3)
    return ref


def _resume(rank: int, world: int, run, out: str, cache: str) -> list[list[float]]:
    got = []
    for name, fsdp in (("plain", False), ("sharded", True)):
        t = Trainer(apply_overrides(run, [f"parallel.fsdp={str(fsdp).lower()}"]), Path(out) / name, Path(cache),
                    resume=str(Path(out) / "fsdp" / "checkpoints"))
        assert t.start_step == 3
        got.append(t.fit().losses)
    return got


@pytest.mark.numerics
@pytest.mark.parametrize("ep", [1, 2])
def test_fsdp_checkpoint_resumes_with_and_without_fsdp(tmp_path, corpus_file, cache_dir, ep: int) -> None:
    """An FSDP run saved at step 3 (full dense tensors, layout-free) resumes into a run without FSDP and into
    one with it; both continue like the uninterrupted run without FSDP (steps 4..6)."""
    run = apply_overrides(tiny_run(corpus_file, steps=6, ckpt_every=100, dtype="float64", grad_accum=2,
                                   grad_clip=0.5), [f"parallel.ep_size={ep}"])
    out = str(tmp_path / "run")
    ref = run_ranks(_save, 2, tmp_path, run, out, str(cache_dir), timeout=900)[0]
    for plain, sharded in run_ranks(_resume, 2, tmp_path, run, out, str(cache_dir), timeout=900):
        assert plain == pytest.approx(ref[3:], abs=1e-10, rel=0)
        assert sharded == pytest.approx(ref[3:], abs=1e-10, rel=0)


def test_fsdp_refuses_hierarchical_grads() -> None:
    """hierarchical_grads reduces fusion buckets, which FSDP replaces for the dense gradients: a clear error."""
    from semoe.config import ParallelConfig

    with pytest.raises(ValueError, match="parallel.fsdp"):
        ParallelConfig(fsdp=True, hierarchical_grads=True)
    assert ParallelConfig(fsdp=True).fsdp
