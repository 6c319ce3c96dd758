"""The ring engine's CUDA path (pinned host buffers, a copy stream, per-slot events): same greedy tokens as
transformers and as the CPU path, device memory within the budget, KV cache in host memory."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

transformers = pytest.importorskip("transformers")

from tests.unit.test_ring import (  # noqa: E402
    NEW,
    PROMPTS,
    build_hf,
    hf_greedy,
    model_bytes,
    save_memory_test_model,
)

from semoe.inference.ring import MiB, RingEngine  # noqa: E402


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "olmoe"])
def saved(request, tmp_path_factory):
    hf = build_hf(request.param)
    d = tmp_path_factory.mktemp(f"cuda_{request.param}")
    hf.save_pretrained(d, safe_serialization=True)
    return d, [hf_greedy(hf, p, NEW)[0] for p in PROMPTS]


@pytest.mark.parametrize("kv_device", [None, "cpu"])
def test_cuda_ring_matches_transformers(saved, kv_device) -> None:
    d, refs = saved
    budget = model_bytes(d) // 4
    with RingEngine(d, max_memory=budget, device="cuda", kv_device=kv_device, batch_size=2) as engine:
        assert engine.num_slots == 2 and not engine.resident
        result = engine.generate(PROMPTS, NEW, return_logits=True)
    with RingEngine(d, max_memory=budget, batch_size=2) as cpu:
        on_cpu = cpu.generate(PROMPTS, NEW, return_logits=True)
    assert result.tokens == refs == on_cpu.tokens
    for a, b in zip(result.logits, on_cpu.logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)  # TF32 may be on for CUDA matmuls
    st = result.stats
    assert st.loads == NEW * len(engine.plan.sections)
    # every load is one host-to-device copy of its section, timed by events on the copy stream
    assert st.copy_bytes == NEW * sum(s.nbytes for s in engine.plan.sections) and st.copy_s > 0
    assert 0 <= st.stall_s <= st.wall_s and 0.0 <= st.copy_hidden_share <= 1.0 and st.h2d_gb_per_s > 0
    assert on_cpu.stats.copy_s == 0 and on_cpu.stats.copy_hidden_share == 0.0


def test_cuda_memory_within_budget(tmp_path) -> None:
    """A ~67 MB model with a 16 MiB device budget: the engine's device allocations stay within it."""
    save_memory_test_model(tmp_path)
    budget = 16 * MiB
    assert model_bytes(tmp_path) >= 4 * budget
    x = torch.randn(64, 64, device="cuda")  # cuBLAS / SDPA workspaces exist before the measurement
    torch.nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None]) @ x
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with RingEngine(tmp_path, max_memory=budget, device="cuda", batch_size=2) as engine:
        result = engine.generate([list(range(1, 17)), list(range(3, 19))], 6)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    assert result.stats.passes == 6 and result.stats.wait_s < result.stats.wall_s
    assert peak <= budget + 2 * MiB, (peak / MiB, budget / MiB)


def test_cuda_resident_and_bf16(saved) -> None:
    d, refs = saved
    with RingEngine(d, device="cuda") as engine:  # no budget: every section loaded once
        assert engine.resident
        assert engine.generate(PROMPTS, NEW).tokens == refs
        again = engine.generate(PROMPTS, NEW)
        assert again.tokens == refs and again.stats.loads == 0
    with RingEngine(d, device="cuda", dtype=torch.bfloat16, max_memory=model_bytes(d) // 4) as engine:
        out = engine.generate(PROMPTS, NEW).tokens
    assert [len(t) for t in out] == [NEW] * len(PROMPTS)  # bf16 runs; tokens may differ from float32
