"""``PretrainedInit`` (``semoe train --init-from``): the weights equal the HF importer's, each expert-parallel rank
reads only its own experts' bytes (per-expert and fused checkpoints), experts can go to an ``ExpertSink`` instead
of the model, and the model is held once in memory (a subprocess measures peak RSS)."""

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
from safetensors.torch import save_file

from semoe.models.hf import load_hf_checkpoint
from semoe.training.init import PretrainedInit, local_expert_ids
from tests.dist.launcher import run_ranks
from tests.hf_helpers import build_tiny_hf, save_mixtral_36mib, save_tiny_hf

transformers = pytest.importorskip("transformers")


def fused_copy(src: Path, dst: Path, hf) -> Path:
    """The same model saved with transformers' in-memory names (experts fused: gate_up_proj, down_proj)."""
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(dst / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    hf = build_tiny_hf("qwen2_moe", seed=3)
    per_expert = save_tiny_hf(hf, root / "hf", max_shard_size="150KB", bos=False)
    return {"per_expert": per_expert, "fused": fused_copy(per_expert, root / "fused", hf)}


def materialized(folder: Path, mesh_rank: int = 0, ep: int = 1) -> tuple[PretrainedInit, torch.nn.Module]:
    init = PretrainedInit.from_hf(folder)
    model = init.build(init.model_config)
    if ep > 1:
        for m in model.modules():
            if hasattr(m, "shard_") and hasattr(m, "expert_offset"):
                m.shard_(mesh_rank, ep)
    init.materialize(model, torch.device("cpu"), torch.float32)
    return init, model


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_weights_equal_the_importer(folders, layout: str) -> None:
    init, model = materialized(folders[layout])
    ref = load_hf_checkpoint(folders["per_expert"])
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    for name, p in want.items():
        assert torch.equal(got[name], p), name  # bytes copied, no arithmetic
    assert all(not b.any() for b in model.buffers())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert init.bytes_read == total  # every parameter read once


def _rank_reads(rank: int, world: int, folder: str) -> dict:
    init, model = materialized(Path(folder), rank, world)
    return {"bytes": init.bytes_read, "experts": dict(local_expert_ids(model)),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_each_rank_reads_only_its_experts(folders, layout: str, tmp_path: Path) -> None:
    res = run_ranks(_rank_reads, 2, tmp_path, str(folders[layout]))
    full = dict(load_hf_checkpoint(folders["per_expert"]).named_parameters())
    expert_bytes = sum(p.numel() * 4 for n, p in full.items() if ".moe.experts." in n)
    dense_bytes = sum(p.numel() * 4 for n, p in full.items() if ".moe.experts." not in n)
    for r in range(2):
        assert res[r]["bytes"] == dense_bytes + expert_bytes // 2  # half the experts, all the rest
        assert set(map(tuple, res[r]["experts"].values())) == {(2 * r, 2 * r + 1)}
        for name, p in res[r]["params"].items():
            want = full[name][2 * r:2 * r + 2] if ".moe.experts." in name else full[name]
            assert torch.equal(p, want), name


class RecordingSink:
    def __init__(self) -> None:
        self.got: dict[tuple[str, int], torch.Tensor] = {}

    def put(self, param: str, expert: int, value: torch.Tensor) -> None:
        self.got[(param, expert)] = value.clone()


def test_experts_go_to_a_sink(folders) -> None:
    """An expert store receives each local expert from the files; the model's expert parameters stay untouched."""
    init = PretrainedInit.from_hf(folders["per_expert"])
    model = init.build(init.model_config)
    for m in model.modules():
        if hasattr(m, "shard_") and hasattr(m, "expert_offset"):
            m.shard_(1, 2)
    init.materialize(model, torch.device("cpu"), torch.float32, load_weights=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(float("nan") if ".moe.experts." in n else 0.0)
    sink = RecordingSink()
    init.fill(model, experts=sink)
    full = dict(load_hf_checkpoint(folders["per_expert"]).named_parameters())
    stacked = {n for n in full if ".moe.experts." in n}
    assert set(sink.got) == {(n, e) for n in stacked for e in (2, 3)}
    for (n, e), v in sink.got.items():
        assert torch.equal(v, full[n][e])
    for n, p in model.named_parameters():
        assert bool(p.isnan().all()) if n in stacked else torch.equal(p, full[n]), n


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from semoe.inference.ring import process_memory
    from semoe.training.init import PretrainedInit
    init = PretrainedInit.from_hf(sys.argv[1])
    model = init.build(init.model_config)
    base = process_memory()
    init.materialize(model, torch.device("cpu"), torch.float32)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    largest = max(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"base": base["rss"], "peak": process_memory()["peak_rss"], "params": params, "largest": largest}))
""")


def test_model_is_held_once(tmp_path: Path) -> None:
    """Filling a ~50 MB model grows the process by its parameters plus one staging tensor and a fixed allowance,
    not twice the model (a random init followed by loading a state dict would)."""
    src = save_mixtral_36mib(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["base"]
    assert m["params"] > 45
    # measured: params + 4.1 MiB (2026-12-01; the largest tensor is staged, reads are positional: the page cache
    # is not in RSS). A random init followed by a state-dict load would be 2x params.
    assert grew < m["params"] + m["largest"] + 12 and grew < 1.5 * m["params"], m
