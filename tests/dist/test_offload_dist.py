"""Expert offload under expert parallelism (ep 2) and with two expert replicas (dp 2 x ep 2): every rank
stores only its experts, and the offloaded run equals the in-memory run of the same layout bit for bit
(losses, gradient norms and every parameter after 20 steps with grad accumulation, clipping, AdamW).

Why bit-identical holds: both runs do the same ops in the same order on the same tensors; the expert
gradients' sum over replicas is one all-reduce per stacked tensor here and one over a fused buffer there,
and with two replicas every element is a + b either way (addition of two numbers commutes exactly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semoe.config import apply_overrides
from semoe.training.trainer import Trainer
from tests.dist.launcher import run_ranks
from tests.dist.trainer_parts import resumed_trainer, train_part
from tests.unit.test_offload import offload_run, params

pytestmark = pytest.mark.numerics


def _both(rank: int, world: int, run, out: str, cache: str, steps: int) -> dict:
    ref = Trainer(apply_overrides(run, ["storage.budget_mb=0"]), Path(out) / "ref", Path(cache), resume=None)
    off = Trainer(run, Path(out) / "off", Path(cache), resume=None)
    rows = [(ref.train_step(s), off.train_step(s)) for s in range(steps)]
    pa, pb = params(ref), params(off)
    return {"ref": [a["loss"] for a, _ in rows], "off": [b["loss"] for _, b in rows],
            "norm_ref": [a["grad_norm"] for a, _ in rows], "norm_off": [b["grad_norm"] for _, b in rows],
            "equal": sorted(n for n in pa if torch.equal(pa[n], pb[n])), "names": sorted(pa),
            "offsets": [k.mod.expert_offset for k in off.offload.keys],
            "stored": sum(e.nbytes for e in off.offload.store.entries.values()),
            "io": sum(b["io_mb"] for _, b in rows)}


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_offload_equals_in_memory_distributed(tmp_path, corpus_file, cache_dir, world: int, ep: int) -> None:
    run = apply_overrides(offload_run(corpus_file, steps=20, grad_accum=2, grad_clip=0.5),
                          [f"parallel.ep_size={ep}"])
    got = run_ranks(_both, world, tmp_path, run, str(tmp_path / "run"), str(cache_dir), 20, timeout=900)
    for r, g in enumerate(got):
        assert g["ref"] == g["off"] and g["norm_ref"] == g["norm_off"], r
        assert g["equal"] == g["names"], (r, sorted(set(g["names"]) - set(g["equal"])))
        assert g["io"] > 0
        assert set(g["offsets"]) == {(r % ep) * 2}  # this rank's experts only (4 experts / ep)
    full = 2 * 3 * 4 * (4 * 64 * 128 * 4)  # layers x params x (W, G, m, v) x all experts' bytes
    assert all(g["stored"] == full // ep for g in got)
    assert any(n > 0.5 for n in got[0]["norm_ref"])  # clipping was active


def _resume(rank: int, world: int, run, out: str, cache: str) -> list[float]:
    return resumed_trainer(run, out, cache, start_step=4).fit().losses


@pytest.mark.parametrize("first,second,store_first,store_second",
                         [(2, 1, True, True), (1, 2, True, True), (2, 1, True, False), (1, 2, False, True)])
def test_offloaded_resume_on_other_world_size(tmp_path, corpus_file, cache_dir, first: int, second: int,
                                              store_first: bool, store_second: bool) -> None:
    """Float64 (other world sizes sum in another order; see tests/dist/test_train_dist.py): an offloaded
    run resumes on another world size, offloaded or in memory, and an in-memory one resumes offloaded."""
    from semoe.config import ParallelConfig, replace

    base = offload_run(corpus_file, steps=8, budget_mb=1.2)  # float64: twice the float32 bytes
    base = replace(base, train=replace(base.train, dtype="float64"), parallel=ParallelConfig(ep_size=0))
    ref = Trainer(apply_overrides(base, ["storage.budget_mb=0"]), tmp_path / "ref", cache_dir,
                  resume=None).fit().losses
    runs = [base if s else apply_overrides(base, ["storage.budget_mb=0"]) for s in (store_first, store_second)]
    out = str(tmp_path / "run")
    part = (train_part(0, 1, runs[0], out, str(cache_dir), 4) if first == 1 else
            run_ranks(train_part, first, tmp_path, runs[0], out, str(cache_dir), 4)[0])
    assert part == pytest.approx(ref[:4], abs=1e-9)
    after = (_resume(0, 1, runs[1], out, str(cache_dir)) if second == 1 else
             run_ranks(_resume, second, tmp_path, runs[1], out, str(cache_dir))[0])
    assert after == pytest.approx(ref[4:], abs=1e-9)
