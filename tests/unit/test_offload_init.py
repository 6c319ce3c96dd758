"""``semoe train --init-from HF_DIR --set storage.budget_mb=...``: ``PretrainedInit`` fills the experts straight
into the expert store (``ExpertOffload.sink``), expert by expert from the files, without materialising them in
the model. The offloaded fine-tune equals the in-memory one, and building it stays within the budget (RSS)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from semoe.config import apply_overrides
from semoe.layers.experts import Experts
from semoe.training.init import PretrainedInit
from semoe.training.trainer import Trainer
from tests.dist.launcher import run_ranks
from tests.hf_helpers import build_tiny_hf, save_mixtral_36mib, save_tiny_hf
from tests.unit.test_finetune import finetune_run, write_sft
from tests.unit.test_offload import params

transformers = pytest.importorskip("transformers")


def min_budget_mb(model: torch.nn.Module) -> float:
    """The smallest budget ``ExpertOffload`` accepts for ``model`` (one layer's working set), in MiB."""
    sizes = [[p.numel() * p.element_size() for p in m.parameters(recurse=False)]
             for m in model.modules() if isinstance(m, Experts)]
    return max(max(4 * max(s) for s in sizes), max(sum(s) + max(s) for s in sizes)) / 2**20


def _compare(rank: int, world: int, folder: str, data: str, out: str) -> dict:
    """In-memory and offloaded fine-tunes from ``folder``, 4 steps each (grad accumulation 2, clipping)."""
    out_dir = Path(out)
    init = PretrainedInit.from_hf(folder)
    run = finetune_run(init, Path(data), steps=4, grad_accum=2, grad_clip=0.5)
    ref = Trainer(run, out_dir / "ref", out_dir / "cache", resume=None, init=init)
    experts = {n: p.detach().clone() for n, p in ref.model.named_parameters() if ".experts." in n}
    total = sum(p.numel() * p.element_size() for p in experts.values()) / 2**20
    budget = max(1.05 * min_budget_mb(ref.model), total)  # W of all experts; W, G, m, v need 4x that
    init2 = PretrainedInit.from_hf(folder)
    off = Trainer(apply_overrides(run, [f"storage.budget_mb={budget}"]), out_dir / "off", out_dir / "cache",
                  resume=None, init=init2)
    start = params(off)
    rows = [(ref.train_step(s), off.train_step(s)) for s in range(4)]
    pa, pb = params(ref), params(off)
    return {"offloaded": off.offload is not None, "model_experts": [n for n, _ in off.model.named_parameters()
                                                                   if ".experts." in n],
            "reads": (init.experts_read, init2.experts_read, init.bytes_read, init2.bytes_read),
            "start_equal": all(torch.equal(start[n], v) for n, v in experts.items()),
            "loss": ([a["loss"] for a, _ in rows], [b["loss"] for _, b in rows]),
            "norm": ([a["grad_norm"] for a, _ in rows], [b["grad_norm"] for _, b in rows]),
            "end_equal": all(torch.equal(pa[n], pb[n]) for n in pa),
            "within": off.offload.store.stats.peak_resident <= budget * 2**20}


def _check(g: dict) -> None:
    assert g["offloaded"] and g["model_experts"] == []  # no expert parameter in the model
    a, b, na, nb = g["reads"]
    assert a == b and na == nb  # the same experts, the same bytes read
    assert g["start_equal"]  # the store holds the checkpoint's experts
    assert g["loss"][0] == g["loss"][1] and g["norm"][0] == g["norm"][1]
    assert g["end_equal"] and g["within"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hf_offload")
    return (save_tiny_hf(build_tiny_hf("mixtral"), root / "hf", max_shard_size="150KB", bos=True),
            write_sft(root / "d.jsonl"))


@pytest.mark.numerics
def test_offloaded_finetune_from_hf_equals_in_memory(hf_folder, tmp_path) -> None:
    """float32, bit for bit: the same ops on the same values (the store's copy casts as the model's does)."""
    _check(_compare(0, 1, str(hf_folder[0]), str(hf_folder[1]), str(tmp_path / "run")))


@pytest.mark.numerics
def test_offloaded_finetune_from_hf_ep2(hf_folder, tmp_path) -> None:
    """ep 2: each rank fills only its own experts into its store (rows expert - expert_offset)."""
    got = run_ranks(_compare, 2, tmp_path, str(hf_folder[0]), str(hf_folder[1]), str(tmp_path / "run"),
                    timeout=600)
    for g in got:
        _check(g)
    assert got[0]["reads"][0] != got[1]["reads"][0]  # the ranks read different experts


def _resume(rank: int, world: int, folder: str, data: str, out: str, budget: float) -> tuple[list, list]:
    out_dir = Path(out)
    init = PretrainedInit.from_hf(folder)
    run = apply_overrides(finetune_run(init, Path(data), steps=4), [f"storage.budget_mb={budget}"])
    ref = Trainer(run, out_dir / "ref", out_dir / "cache", resume=None, init=init).fit().losses
    part = Trainer(run, out_dir / "part", out_dir / "cache", resume=None, init=PretrainedInit.from_hf(folder))
    for s in range(2):
        part.train_step(s)
    part.save(2)
    again = Trainer(run, out_dir / "part", out_dir / "cache", resume="auto", init=PretrainedInit.from_hf(folder))
    assert again.start_step == 2 and again.offload is not None
    return ref, again.fit().losses


@pytest.mark.numerics
def test_offloaded_finetune_from_hf_resumes(hf_folder, tmp_path) -> None:
    """Resuming an offloaded fine-tune skips the fill (the checkpoint's experts go into the store): bit-equal."""
    ref, after = _resume(0, 1, str(hf_folder[0]), str(hf_folder[1]), str(tmp_path / "run"), 0.5)
    assert after == ref[2:]


PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from semoe.config import apply_overrides
    from semoe.training.init import PretrainedInit
    from semoe.training.trainer import Trainer
    from tests.unit.test_finetune import finetune_run

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    folder, data, out, budget = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
    init = PretrainedInit.from_hf(folder)
    run = apply_overrides(finetune_run(init, data), [f"storage.budget_mb={budget}"])
    Trainer(run, out / "warm", out / "cache", resume=None, init=PretrainedInit.from_hf(folder))  # corpus cached
    import gc
    gc.collect()
    base = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t = Trainer(run, out / "run", out / "cache", resume=None, init=init)
    experts = sum(p.numel() * p.element_size() for n, p in t.model.named_parameters() if ".experts." in n)
    print(json.dumps({"grew": status("VmHWM") - base, "experts_in_model": experts,
                      "store_peak": t.offload.store.stats.peak_resident if t.offload else 0}))
""")


def _probe(folder: Path, data: Path, out: Path, budget: float) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(folder), str(data), str(out), str(budget)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_building_from_hf_into_the_store_stays_within_budget(tmp_path) -> None:
    """A Mixtral with 36 MiB of float32 experts (6 layers x 8 experts x 3 x 256 x 256), budget 10 MiB. Building
    the in-memory trainer grows the process by its experts plus a fixed overhead (dense part, staging, corpus,
    allocator); building the offloaded one must grow by at most that overhead + the budget + 4 MiB (two expert
    tensors of one key: a staging slab and its copy). Materialising all experts once would exceed it by 22 MiB."""
    src = save_mixtral_36mib(tmp_path / "hf")
    data = write_sft(tmp_path / "d.jsonl")
    budget = 10.0
    mem = _probe(src, data, tmp_path / "mem", 0)
    off = _probe(src, data, tmp_path / "off", budget)
    print("RSS growth MiB: in memory", mem["grew"] / 2**20, "offloaded", off["grew"] / 2**20)
    expert_bytes = 6 * 8 * 3 * 256 * 256 * 4
    assert mem["experts_in_model"] == expert_bytes and off["experts_in_model"] == 0
    overhead = mem["grew"] - expert_bytes
    assert 0 < off["store_peak"] <= budget * 2**20
    assert off["grew"] <= overhead + budget * 2**20 + 4 * 2**20, (off["grew"] / 2**20, overhead / 2**20)
    assert mem["grew"] > off["grew"] + 16 * 2**20
