"""Routed-only expert loading, the expert cache and the cost model of the ring engine: output bit-identical to the
resident model in every mode; expert counts and bytes against the routers' own record; the cache policy; the cost
model's decisions against its formula; bad strategies and budgets; a corrupt expert tensor met mid-run."""

from __future__ import annotations

import itertools
import re
import threading
from pathlib import Path

import pytest
import torch

from semoe.cli.main import main
from semoe.inference.expert_cache import ExpertCache
from semoe.inference.loader import SlotRing
from semoe.inference.ring import ROUTED_MARGIN, MiB, RingEngine
from semoe.inference.sections import open_model, plan_sections
from semoe.storage.tensor_io import ReadPool
from tests.unit.test_ring import PROMPTS, build_hf, one_thread, write_word_tokenizer  # noqa: F401

transformers = pytest.importorskip("transformers")

NEW = 5


def _save(tmp_path: Path, family: str, seed: int, layers: int = 4, dtype: torch.dtype = torch.float32, **kw) -> Path:
    d = tmp_path / f"{family}-{seed}"
    build_hf(family, seed=seed, num_hidden_layers=layers).to(dtype).save_pretrained(d, safe_serialization=True, **kw)
    return d


def _ring_budget(d: Path, lps: int = 1, extra: int = MiB // 2) -> int:
    """Two slots of the largest section plus ``extra`` (the KV caches, activations and, if any, an expert cache)."""
    return 2 * plan_sections(open_model(d), lps).slot_bytes + extra


def _resident(d: Path, dtype: str = "float32", batch_size: int = 2, prompts: list[list[int]] = PROMPTS):
    """The whole model loaded once (no budget), prefill micro-batches of ``batch_size`` (as the rings below: the same
    matmul shapes, so the same bits)."""
    with RingEngine(d, dtype=dtype, batch_size=batch_size) as e:
        assert e.resident
        return e.generate(prompts, NEW, return_logits=True)


def _same(a, b) -> None:
    assert a.tokens == b.tokens
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))  # bit for bit


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_every_strategy_is_bit_identical_to_the_resident_model(tmp_path, family: str) -> None:
    d = _save(tmp_path, family, seed=11)
    ref, ref1 = _resident(d), _resident(d, prompts=PROMPTS[:1])
    for strategy in ("layer", "routed", "auto"):
        with RingEngine(d, max_memory=_ring_budget(d, extra=MiB), strategy=strategy, batch_size=2) as e:
            assert not e.resident
            got = e.generate(PROMPTS, NEW, return_logits=True)
            got1 = e.generate(PROMPTS[:1], NEW, return_logits=True)  # auto: decode of one sequence routes
        _same(got, ref)
        _same(got1, ref1)
        st = got1.stats
        if strategy == "layer":
            assert st.routed_layer_loads == 0 and st.experts_needed == 0
        else:
            assert st.routed_layer_loads > 0 and st.experts_needed > 0
        if strategy == "routed":
            assert got.stats.full_layer_loads == 0 and got.stats.prefetch_hit_rate > 0.5  # the next router
            # predicts most experts


def test_routed_variants_are_bit_identical(tmp_path) -> None:
    """Several layers per section (prediction inside a section), no cache, no prediction, one or three reader
    threads, several waves, the KV cache staged from elsewhere, a bf16 file computed in float32 (cast while read)
    and in bfloat16: the resident model's output in that dtype, bit for bit."""
    d = _save(tmp_path, "mixtral", seed=12, layers=6)
    ref = _resident(d)
    variants = [dict(layers_per_section=2), dict(expert_cache=0), dict(prefetch=False), dict(io_threads=1),
                dict(prefetch_depth=1), dict(prefetch_depth=1, layers_per_section=2), dict(prefetch_width=3),
                dict(dense_cache=False), dict(expert_cache=0, prefetch=False, layers_per_section=2),
                dict(io_threads=3, expert_cache=0, prefetch=False)]
    for kw in variants:
        lps = kw.get("layers_per_section", 1)
        with RingEngine(d, max_memory=_ring_budget(d, lps, MiB), strategy="routed", batch_size=2, **kw) as e:
            assert (e.cache is None) == (kw.get("expert_cache") == 0)
            _same(e.generate(PROMPTS, NEW, return_logits=True), ref)
    same_len = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [30, 31, 32, 33, 34], [40, 41, 42, 43, 44]]

    def one_per_wave(e: RingEngine) -> None:
        e.budget = e.ring_bytes + int(1.01 * e._resident_bytes([(1, 5, 5 + NEW - 1, 1)]))

    with RingEngine(d, batch_size=1) as e:  # references with the same batch shapes: one sequence per wave, and
        one_per_wave(e)  # all in one wave in prefill micro-batches of one
        ref_waves = e.generate(same_len, NEW, return_logits=True)
        assert ref_waves.stats.waves == 4
        e.budget = None
        ref_one = e.generate(same_len, NEW, return_logits=True)
    with RingEngine(d, max_memory=_ring_budget(d), strategy="routed", batch_size=1) as e:
        one_per_wave(e)
        got = e.generate(same_len, NEW, return_logits=True)
        assert got.stats.waves == 4
        _same(got, ref_waves)
        e._force_kv_staging = True
        e.budget = None
        _same(e.generate(same_len, NEW, return_logits=True), ref_one)
    bf = _save(tmp_path, "olmoe", seed=13, dtype=torch.bfloat16)
    for dtype in ("float32", "bfloat16"):
        ref = _resident(bf, dtype)
        budget = 2 * plan_sections(open_model(bf), 1, getattr(torch, dtype)).slot_bytes + MiB
        with RingEngine(bf, max_memory=budget, slots=2, strategy="routed", dtype=dtype, batch_size=2) as e:
            assert (e.plan.staging_bytes > 0) == (dtype == "float32")
            _same(e.generate(PROMPTS, NEW, return_logits=True), ref)


def _routing_record(d: Path) -> dict[tuple[int, int], set[int]]:
    """(pass, layer) -> the experts the resident model's routers picked over the whole wave (all prompts)."""
    picked: dict[tuple[int, int], set[int]] = {}
    with RingEngine(d) as e:
        for i, block in enumerate(e.model.layers):
            def hook(_m, _inp, out, i=i):
                picked.setdefault((e.stats.passes, i), set()).update(
                    out.stats.routed_per_expert.nonzero().squeeze(1).tolist())
            block.moe.register_forward_hook(hook)
        e.generate(PROMPTS, NEW)
    return picked


def test_expert_counts_and_bytes_match_the_routers_record(tmp_path) -> None:
    d = _save(tmp_path, "qwen2_moe", seed=14)
    picked = _routing_record(d)
    needed = sum(len(v) for v in picked.values())
    distinct = len({(layer, e) for (_, layer), v in picked.items() for e in v})
    plan = plan_sections(open_model(d))
    xl = next(x for s in plan.sections for x in s.experts)
    dense = sum(s.dense_bytes_read for s in plan.sections)
    # no cache, no prediction: every picked expert of every pass is read on demand, nothing else
    with RingEngine(d, max_memory=_ring_budget(d), strategy="routed", expert_cache=0, prefetch=False,
                    dense_cache=False) as e:
        st = e.generate(PROMPTS, NEW).stats
    assert st.experts_needed == st.expert_misses == needed and st.expert_cache_hits == st.experts_prefetched == 0
    assert st.expert_bytes_read == needed * xl.disk_bytes
    assert st.bytes_read == NEW * dense + st.expert_bytes_read
    assert st.routed_layer_loads == NEW * 4 and st.bytes_per_token == st.bytes_read / st.new_tokens
    # a cache that holds every expert: each is read from disk once, every later use is a hit
    all_experts = 4 * xl.num_experts * xl.nbytes
    with RingEngine(d, max_memory=_ring_budget(d, extra=all_experts + MiB), slots=2, strategy="routed",
                    expert_cache=all_experts, prefetch=False) as e:
        st = e.generate(PROMPTS, NEW).stats
        assert e.cache.capacity == 4 * xl.num_experts
    assert st.experts_needed == needed and st.expert_misses == distinct == st.cache_inserts
    assert st.expert_cache_hits == needed - distinct and st.cache_hit_rate == (needed - distinct) / needed
    assert st.expert_bytes_read == distinct * xl.disk_bytes
    # with prediction: what was predicted and then picked is a prefetch hit; the rest of the picks are misses
    with RingEngine(d, max_memory=_ring_budget(d), strategy="routed", expert_cache=0) as e:
        st = e.generate(PROMPTS, NEW).stats
    assert st.experts_needed == needed and st.expert_prefetch_hits + st.expert_misses == needed
    assert st.experts_prefetched == st.expert_prefetch_hits + st.prefetch_wasted and st.prefetch_hit_rate > 0.5
    assert st.expert_bytes_read <= (needed + st.prefetch_wasted) * xl.disk_bytes


def test_prediction_depths_and_one_router_call_per_routed_layer(tmp_path) -> None:
    """The per-depth prediction counters against the resident model's routing record: depth 1 (the layer before's
    output) covers every routed layer of every pass; depth 2 (two layers before) exists once the routers' resident
    copies do (after the first pass) and for every layer but the first (the embedding is the only unit before it).
    And the model's router runs once per routed layer and chunk: its routing is handed to the MoE layer (the
    predictions use the copies)."""
    d = _save(tmp_path, "mixtral", seed=18)
    picked = _routing_record(d)
    needed = sum(len(v) for v in picked.values())
    later = sum(len(v) for (p, layer), v in picked.items() if p >= 1 and layer >= 1)
    with RingEngine(d, max_memory=_ring_budget(d), strategy="routed", expert_cache=0) as e:
        st = e.generate(PROMPTS, NEW).stats
        assert st.experts_needed == needed
        assert st.predicted_d1_needed == needed and st.predicted_d2_needed == later
        assert 0 < st.predicted_d1_hits <= needed and 0 < st.predicted_d2_hits <= later
        assert st.prediction_hit_rate_d1 == st.predicted_d1_hits / needed
        assert st.expert_prefetch_hits + st.expert_misses == needed
        assert st.experts_prefetched == st.expert_prefetch_hits + st.prefetch_wasted
        calls = [0]
        for block in e.model.layers:
            block.moe.router.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        one = e.generate(PROMPTS[:1], NEW, return_logits=True)
    assert calls[0] == 4 * NEW  # one sequence: one chunk per pass, 4 routed layers, NEW passes
    _same(one, _resident(d, prompts=PROMPTS[:1]))
    with RingEngine(d, max_memory=_ring_budget(d), strategy="routed", expert_cache=0, prefetch_depth=1) as e:
        st = e.generate(PROMPTS, NEW).stats
    assert st.predicted_d1_needed == needed and st.predicted_d2_needed == 0
    with pytest.raises(ValueError, match="prefetch_depth must be 1"):
        RingEngine(d, max_memory=_ring_budget(d), strategy="routed", prefetch_depth=3)
    with pytest.raises(ValueError, match="prefetch_width must be an integer >= 0"):
        RingEngine(d, max_memory=_ring_budget(d), strategy="routed", prefetch_width=-1)
    # a wider prediction (top k + 3 of 8) names more of the picked experts at depth 1 than the top k
    with RingEngine(d, max_memory=_ring_budget(d), strategy="routed", expert_cache=0, prefetch_width=3) as e:
        wide = e.generate(PROMPTS, NEW).stats
    assert wide.predicted_d1_needed == needed and wide.predicted_d1_hits > st.predicted_d1_hits


def test_prediction_cost_rule(tmp_path) -> None:
    """A predicted expert on disk is read ahead only when p * min(t, d * W) > (1 - p) * t * u (p: the depth's measured
    precision, t: its read time, W: one MoE layer's compute, u: the disk is the bottleneck); cached ones always (a
    copy); ``prefetch="always"`` reads every one. The formula with fixed numbers, then a run whose reads are priced
    so slow that no disk prediction pays: bit-identical to the resident model, nothing read ahead, every pick read on
    demand, the predictions still made and counted (precision and recall keep being measured)."""
    d = _save(tmp_path, "mixtral", seed=19)
    picked = _routing_record(d)
    needed = sum(len(v) for v in picked.values())
    with RingEngine(d, max_memory=_ring_budget(d), strategy="routed", expert_cache=0) as e:
        xl = next(x for s in e.plan.sections for x in s.experts)
        ring = e._ring
        t = 1e-3  # one expert's read: 1 ms
        ring.bw_expert.nbytes, ring.bw_expert.seconds = 2**22 * xl.disk_bytes, 2**22 * t
        assert e._worth_reading(xl, [1, 2], 1) == [1, 2]  # nothing measured yet (W unknown): read
        e._next_pass_tokens = 1  # f(1) = 0.25 of E = 8: 2 expected needed reads per layer (2 ms)
        for W, p, depth, read in ((5e-3, 0.3, 1, True),  # compute-bound (2 ms of reads < W): any p pays
                                  (1e-3, 0.6, 1, True),  # disk-bound: 0.6 * 1 > 0.4 * 1
                                  (1e-3, 0.4, 1, False),  # 0.4 * 1 < 0.6 * 1
                                  (0.2e-3, 0.8, 1, False),  # 0.8 * 0.2 < 0.2 * 1
                                  (0.2e-3, 0.8, 2, True)):  # depth 2 hides twice the compute: 0.8 * 0.4 > 0.2
            e._layer_compute_s, e._precision[depth] = W, [100 * p, 100.0]
            assert (e._worth_reading(xl, [1, 2], depth) == [1, 2]) is read, (W, p, depth)
        e.prefetch = "always"
        assert e._worth_reading(xl, [1, 2], 1) == [1, 2]
    with pytest.raises(ValueError, match="prefetch must be True"):
        RingEngine(d, max_memory=_ring_budget(d), strategy="routed", prefetch="sometimes")
    with RingEngine(d, max_memory=_ring_budget(d), strategy="routed", expert_cache=0) as e:
        ring = e._ring
        ring.bw_expert.nbytes, ring.bw_expert.seconds = 2**30, 1e6  # ~1 KB/s: no read ahead pays once W is known
        ring.bw_expert.add = lambda *a: None  # type: ignore[method-assign]
        r = e.generate(PROMPTS, NEW, return_logits=True)
    st = r.stats
    _same(r, _resident(d))
    assert st.experts_needed == needed and st.predicted_d1_needed == needed  # predictions made and counted
    # the first MoE layer's compute measures W; predictions made before it (for layers 1 and 2 of the first pass)
    # are read, none after
    assert 0 < st.predictions_skipped and st.experts_prefetched <= 2 * 8
    assert st.expert_prefetch_hits + st.expert_misses == needed


def test_dense_cache_reads_each_dense_part_once(tmp_path) -> None:
    """With room for every section's dense part, each is read from disk on the first pass only and copied from
    the dense cache on the later ones (bit-identical output, the bytes counted exactly); the expert cache gets what
    is left. With room for some, the first sections read fit and the others are read every pass."""
    d = _save(tmp_path, "olmoe", seed=19)
    ref = _resident(d)
    plan = plan_sections(open_model(d))
    dense_disk = [s.dense_bytes_read for s in plan.sections]  # float32 file, float32 compute: slot bytes = disk
    S = len(plan.sections)
    with RingEngine(d, max_memory=_ring_budget(d, extra=sum(dense_disk) + MiB), strategy="routed", batch_size=2,
                    expert_cache=0, prefetch=False) as e:
        got = e.generate(PROMPTS, NEW, return_logits=True)
        assert e._ring.dense_bytes == sum(dense_disk) == e._dense_total and len(e._ring.dense_cache) == S
    _same(got, ref)
    st = got.stats
    assert st.dense_cache_bytes == (NEW - 1) * sum(dense_disk)
    assert st.bytes_read == sum(dense_disk) + st.expert_bytes_read and st.expert_misses == st.experts_needed
    # room for the embedding and the first layer's dense part only
    with RingEngine(d, max_memory=_ring_budget(d, extra=sum(dense_disk) + MiB), strategy="routed", batch_size=2,
                    expert_cache=0, prefetch=False) as e:
        e._dense_total = dense_disk[0] + dense_disk[1]  # the cap the budget would set
        got = e.generate(PROMPTS, NEW, return_logits=True)
        assert sorted(e._ring.dense_cache) == [0, 1]
    _same(got, ref)
    assert got.stats.dense_cache_bytes == (NEW - 1) * (dense_disk[0] + dense_disk[1])
    assert got.stats.bytes_read == NEW * sum(dense_disk) - got.stats.dense_cache_bytes + got.stats.expert_bytes_read


def test_expert_cache_policy_decayed_lfu() -> None:
    c = ExpertCache(entry_bytes=10, capacity_bytes=25, half_life=2.0)  # 2 entries
    assert c.capacity == 2 and c.capacity_bytes == 20
    c.touch(0, [1, 1, 1])  # expert (0, 1) used three times: score 3
    c.touch(0, [2])
    assert c.admit((0, 1)) is not None and c.admit((0, 2)) is not None  # free entries: admitted
    assert c.admit((0, 1)) is None  # already in
    c.touch(0, [3])  # a one-off: score 1, not above (0, 2)'s 1 -> not admitted
    assert c.admit((0, 3)) is None and set(c.entries) == {(0, 1), (0, 2)}
    for _ in range(4):  # four ticks: (0, 2) decays to 1/4, (0, 1) to 3/4
        c.tick()
    c.touch(0, [3])  # (0, 3): 1 * 2**-2 + 1 = 1.25 beats the lowest entry (0, 2)'s 0.25
    buf = c.admit((0, 3))
    assert buf is not None and buf.numel() == 10 and set(c.entries) == {(0, 1), (0, 3)} and c.evictions == 1
    assert c._decayed((0, 1)) == pytest.approx(3 * 2 ** -2) and c._decayed((0, 3)) == pytest.approx(1.25)
    assert c.layer_count(0) == 2 and c.layer_count(1) == 0
    c.resize(10)  # one entry: the lowest-scored goes
    assert set(c.entries) == {(0, 3)} and c.nbytes == 10
    c.resize(0)
    assert not c.entries and c.admit((0, 5)) is None
    # pinned entries (computed from in place) are never evicted: admissions evict the lowest unpinned one
    c = ExpertCache(entry_bytes=10, capacity_bytes=20)
    c.touch(0, [1, 1, 2])
    a, b = c.admit((0, 1)), c.admit((0, 2), pin=True)
    assert a is not None and b is not None and c.pinned == 1 and c.pin((0, 3)) is None
    assert c.admit((0, 3), force=True) is not None and set(c.entries) == {(0, 2), (0, 3)}  # (0, 1) went, not (0, 2)
    assert c.pin((0, 3)) is not None and c.admit((0, 4), force=True) is None  # every entry pinned: no room
    c.resize(0)
    assert set(c.entries) == {(0, 2), (0, 3)}  # (a resize between passes finds none pinned; pinned ones stay)
    c.unpin([(0, 2), (0, 3)])
    c.resize(0)
    assert not c.entries and c.pinned == 0
    with pytest.raises(ValueError, match="entry size must be > 0"):
        ExpertCache(0)


def test_cost_model_follows_its_formula(tmp_path, caplog) -> None:
    """With the measured rates held equal and no cache, routed loading costs f(T) = 1 - (1 - k/E)^T of the whole
    layer: chosen exactly when f(T) < ROUTED_MARGIN. Mixtral-shaped (E 8, k 2): prefills (20 or 5 tokens) and
    decode steps of 4 sequences (f = 0.68) stream whole layers, decode steps of one sequence (f = 0.25) route."""
    d = _save(tmp_path, "mixtral", seed=15)
    with RingEngine(d, max_memory=_ring_budget(d), strategy="auto", expert_cache=0) as e:
        ring = e._ring
        for bw in (ring.bw_section, ring.bw_expert):  # equal rates, not updated by the run
            bw.nbytes, bw.seconds = 2**30, 1.0
            bw.add = lambda *a: None  # type: ignore[method-assign]
        with caplog.at_level("INFO", logger="semoe.inference.ring"):
            r4 = e.generate(PROMPTS, NEW)
            r1 = e.generate([PROMPTS[0]], NEW)
        assert r4.tokens == _resident(d).tokens
        decisions = list(e.decisions)
    assert {T for _, _, T, *_ in decisions} >= {1, 4, 5, 20}
    for _, _, T, mode, t_layer, t_routed in decisions:
        f = 1 - (1 - 2 / 8) ** T
        assert t_routed == pytest.approx(f * t_layer)
        assert mode == ("dense" if f < ROUTED_MARGIN else "full"), (T, f)
    assert r4.stats.full_layer_loads == 4 * NEW and r4.stats.routed_layer_loads == 0
    assert r1.stats.full_layer_loads == 4 and r1.stats.routed_layer_loads == 4 * (NEW - 1)
    assert any("cost model: section 1 (layer.0) for 20 tokens: whole layer" in m for m in caplog.messages)
    assert any("for 1 tokens: routed experts" in m for m in caplog.messages)


def test_cost_model_counts_cached_experts(tmp_path) -> None:
    """Cached experts cost a copy instead of a read: with every expert cached and copies far faster than reads,
    routed loading wins even where f(T) ~ 1 (the prefill)."""
    d = _save(tmp_path, "mixtral", seed=16)
    xl = next(x for s in plan_sections(open_model(d)).sections for x in s.experts)
    size = 4 * xl.num_experts * xl.nbytes
    with RingEngine(d, max_memory=_ring_budget(d, extra=size + MiB), slots=2, strategy="routed",
                    expert_cache=size) as e:
        e.generate(PROMPTS, 2)  # fills the cache (prefill picks every expert)
        assert all(e.cache.layer_count(i) == 8 for i in range(4))
        e.strategy = "auto"
        ring = e._ring
        for bw, rate in ((ring.bw_section, 1.0), (ring.bw_expert, 1.0), (ring.bw_cache, 100.0)):
            bw.nbytes, bw.seconds = int(rate * 2**30), 1.0
            bw.add = lambda *a: None  # type: ignore[method-assign]
        r = e.generate(PROMPTS, NEW)
        assert r.stats.full_layer_loads == 0 and r.stats.expert_misses == 0 and r.stats.cache_hit_rate == 1.0
        prefill = [x for x in e.decisions if x[2] == 20]
        f = 1 - (1 - 2 / 8) ** 20  # every expert cached: f * E copies at 100x the read rate
        assert prefill and all(m == "dense" and t_r == pytest.approx(f * t_l / 100) for *_, m, t_l, t_r in prefill)


def _many_experts(tmp_path: Path, seed: int) -> Path:
    """An OLMoE-shaped model with 16 experts top-4: four contributions per token, so the order in which the MoE
    layer sums them matters for the bits (the compact slots' renumbering must keep it)."""
    d = tmp_path / f"olmoe16-{seed}"
    build_hf("olmoe", seed=seed, num_hidden_layers=4, num_experts=16, num_experts_per_tok=4).save_pretrained(
        d, safe_serialization=True)
    return d


def test_compact_slots_are_bit_identical_and_give_the_cache_their_room(tmp_path) -> None:
    """Decode passes of one or two sequences run from compact slots (the dense part + T k experts), computed in place
    (cache hits from their entries, no copy), and so does the prefill where an expert cache holds its extra picks
    (else it runs from whole-layer slots): the layout switches at the pass boundaries, the expert cache grows by what
    the smaller slots free, entries are evicted under a small budget, and the output equals the resident model's bit
    for bit (with and without prediction, no cache)."""
    d = _many_experts(tmp_path, seed=21)
    one, two = [PROMPTS[0]], [PROMPTS[0], PROMPTS[2]]  # (two of the same length: a decode pass of two tokens)
    ref1, ref2 = _resident(d, prompts=one), _resident(d, prompts=two)
    plan = plan_sections(open_model(d))
    xl = next(x for sec in plan.sections for x in sec.experts)
    for kw in (dict(prefetch=False), {}, dict(expert_cache=0), dict(io_threads=1, prefetch_depth=1),
               dict(layers_per_section=2)):
        lps = kw.get("layers_per_section", 1)
        budget = 2 * plan_sections(open_model(d), lps).slot_bytes + MiB // 2
        with RingEngine(d, max_memory=budget, strategy="routed", batch_size=2, dense_cache=False, **kw) as e:
            full_cache = e.cache.capacity if e.cache is not None else 0  # before any pass: whole-layer slots
            got1 = e.generate(one, NEW, return_logits=True)
            in_place, copied = e._ring.in_place, e._ring.bw_cache.nbytes  # (a first prefill has no hits to copy)
            pinned = e.cache.pinned if e.cache is not None else 0
            assert e._rows == 4 and e._ring.slots[0].numel() < lps * (plan.slot_bytes - 10 * xl.nbytes)  # top-4
            compact_cache = e.cache.capacity if e.cache is not None else 0
            got2 = e.generate(two, NEW, return_logits=True)
            assert e._rows == 8  # 2 x top-4
        _same(got1, ref1)
        _same(got2, ref2)
        # with an expert cache the prefill runs in its wave's decode layout (its picks beyond the slot rows go to cache
        # entries: one switch per call, none back), without one in whole layers (then the decode passes compact)
        cached = "expert_cache" not in kw
        assert got1.stats.layout_switches == 1 and got2.stats.layout_switches == (1 if cached else 2)
        assert got1.stats.full_layer_loads == 0 and got1.stats.routed_layer_loads == NEW * 4
        if "expert_cache" not in kw and lps == 1:
            assert compact_cache >= full_cache + 2 * 10  # the 2 x (16 - 4 - 2 spare) freed rows, at least
        if kw == dict(prefetch=False):  # deterministic: admissions in the order of the on-demand reads
            st = got1.stats
            assert st.experts_needed == st.expert_cache_hits + st.expert_misses and st.expert_prefetch_hits == 0
            # hits are computed in place: no copy into a slot (the copy rate is never measured), no pin left
            assert in_place and st.expert_cache_hits > 0 and copied == 0 and pinned == 0
            assert got2.stats.cache_evictions > 0  # 8 rows instead of 4 took room back; the prefill's extra picks
    # a bf16 file computed in float32 (cast while read into rows and into cache entries) and in bfloat16
    bf = tmp_path / "olmoe16-bf16"
    build_hf("olmoe", seed=22, num_hidden_layers=4, num_experts=16, num_experts_per_tok=4).to(
        torch.bfloat16).save_pretrained(bf, safe_serialization=True)
    for dtype in ("float32", "bfloat16"):
        ref = _resident(bf, dtype, prompts=one)
        budget = 2 * plan_sections(open_model(bf), 1, getattr(torch, dtype)).slot_bytes + MiB // 2
        with RingEngine(bf, max_memory=budget, strategy="routed", dtype=dtype, batch_size=2) as e:
            got = e.generate(one, NEW, return_logits=True)
            assert got.stats.layout_switches == 1
        _same(got, ref)


def test_auto_chooses_compact_slots_by_the_cost_model(tmp_path) -> None:
    """strategy auto: compact slots exactly for the passes the cost model routes in every MoE section (decode of one
    sequence; and its prefill, run in the decode layout, since routing it is expected to read less than whole layers),
    whole layers for the others (``compact_slots=False``: the prefill): same bits either way."""
    d = _many_experts(tmp_path, seed=23)
    ref = _resident(d, prompts=[PROMPTS[0]])
    budget = _ring_budget(d)
    for compact in (True, False):
        with RingEngine(d, max_memory=budget, strategy="auto", batch_size=2, compact_slots=compact) as e:
            ring = e._ring
            for bw in (ring.bw_section, ring.bw_expert):  # equal rates, not updated by the run
                bw.nbytes, bw.seconds = 2**30, 1.0
                bw.add = lambda *a: None  # type: ignore[method-assign]
            got = e.generate([PROMPTS[0]], NEW, return_logits=True)
        _same(got, ref)
        f1 = 1 - (1 - 4 / 16)  # one token: f = k / E = 0.25 < ROUTED_MARGIN; the prefill (5 tokens): f = 0.76
        assert f1 < ROUTED_MARGIN < 1 - (1 - 4 / 16) ** 5
        assert got.stats.layout_switches == (1 if compact else 0)
        if compact:  # the prefill in the decode passes' compact layout (its extra picks into the cache): f(5) < 1
            assert got.stats.full_layer_loads == 0 and got.stats.routed_layer_loads == NEW * 4
        else:
            assert got.stats.full_layer_loads == 4 and got.stats.routed_layer_loads == (NEW - 1) * 4


def test_a_layer_larger_than_the_budget_is_served_by_routed_passes(tmp_path) -> None:
    """Below two whole-layer slots, compact slots with as many expert rows as fit serve every pass (prefill
    included) whose routers pick no more than that; the minimum budget is two slots of the dense part + top-k
    experts (+ one sequence), stated in the error below it; a pass that picks more than the slots hold is a clear
    error."""
    d = _many_experts(tmp_path, seed=24)
    plan = plan_sections(open_model(d))
    xl = next(x for sec in plan.sections for x in sec.experts)
    dense = max(sec.nbytes for sec in plan.sections) - 16 * xl.nbytes
    budget = 2 * (dense + 10 * xl.nbytes) + MiB // 2  # two slots of the dense part + ~10 experts
    assert budget < 2 * plan.slot_bytes
    prompt = [[7]]  # one token: 4 picks per layer in every pass
    ref = _resident(d, prompts=prompt)
    with RingEngine(d, max_memory=budget, batch_size=1, prefetch=False) as e:  # auto
        assert not e._full_fits and 4 <= e._rows_fit < 16
        got = e.generate(prompt, NEW, return_logits=True)
        st = got.stats
        assert st.full_layer_loads == 0 and st.layout_switches == 1  # the rows that fit, then 4 (one token, top-4)
        assert 0 < e.cache.capacity < 32 and st.cache_evictions > 0  # a cache for half the experts: evictions
        _same(got, ref)
        with pytest.raises(ValueError, match=r"picked \d+ experts, but max_memory=.* holds \d+ per slot .*raise "
                                             r"--max-memory to at least \d+MB"):
            e.generate([list(range(1, 9))], 1)  # 8 tokens: up to 32 picks
    with pytest.raises(ValueError, match=r"at least ([\d.]+) MiB for K=2 slots of the largest section .* or "
                                         r"([\d.]+) MiB for 2 compact slots of the dense part and 4 experts") as err:
        RingEngine(d, max_memory=2 * (dense + 3 * xl.nbytes))
    minimum = float(re.search(r"or ([\d.]+) MiB for 2 compact", str(err.value)).group(1))
    with RingEngine(d, max_memory=f"{minimum + 0.05}MB", batch_size=1) as e:
        assert e._rows_fit == 4
        _same(e.generate(prompt, NEW, return_logits=True), ref)


def test_bad_strategies_and_budgets(tmp_path, capsys) -> None:
    d = _save(tmp_path, "mixtral", seed=17)
    write_word_tokenizer(d)
    with pytest.raises(ValueError, match=r"strategy='fast' is not one of \['auto', 'layer', 'routed'\]"):
        RingEngine(d, strategy="fast")
    with pytest.raises(ValueError, match=r"strategy='routed' was asked for, but no --max-memory was given.*nothing "
                                         r"is streamed"):
        RingEngine(d, strategy="routed")
    total = plan_sections(open_model(d)).total_bytes
    with pytest.raises(ValueError, match=rf"strategy='layer' was asked for, but max_memory=.* holds the whole model "
                                         rf"\({total / MiB:.1f} MiB\)"):
        RingEngine(d, strategy="layer", max_memory=4 * total)
    budget = _ring_budget(d)
    with pytest.raises(ValueError, match=r"an expert cache of 64\.00 MiB does not fit: max_memory=.* leaves "
                                         r"[\d.]+ MiB after the ring .*lower --expert-cache"):
        RingEngine(d, max_memory=budget, strategy="routed", expert_cache="64MB")
    with pytest.raises(ValueError, match=r"with strategy 'layer' .*no expert is read on its own"):
        RingEngine(d, max_memory=budget + 2 * MiB, slots=2, strategy="layer", expert_cache="1MB")
    args = ["generate", "--model", str(d), "--prompt", "w1 w2", "--temperature", "0", "--max-new-tokens", "2",
            "--dtype", "float32"]
    for extra, match in ((["--strategy", "fast"], "is not one of"),
                         (["--strategy", "routed", "--max-memory", f"{budget}", "--expert-cache", "64MB"],
                          "does not fit"),
                         (["--expert-cache", "lots"], "cannot read memory size")):
        assert main([*args, *extra]) == 2
        cap = capsys.readouterr()
        assert match in cap.err and cap.out == ""
    # a routed run prints what it read per token and the hit rates
    assert main([*args, "--strategy", "routed", "--max-memory", str(budget)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.match(r"read: [\d.]+ MiB per new token; routed experts: cache hit rate \d+%, prediction hit rate \d+%",
                    out[2]), out


def _expert_only_shard(d: Path) -> tuple[Path, list[str]]:
    from semoe.storage.safetensors_io import read_header

    for f in sorted(d.glob("model-*.safetensors")):
        names = list(read_header(f).tensors)
        if names and all(re.search(r"\.experts\.\d+\.", n) for n in names):
            return f, names
    raise AssertionError("no shard holds only expert tensors; change max_shard_size")


def test_corrupt_expert_tensor_met_mid_run(tmp_path, monkeypatch, capsys) -> None:
    """A shard holding only expert tensors is truncated after the engine indexed the folder: the routed read that
    meets it fails with the file's and the tensor's name, in the API and in the CLI (which prints nothing)."""
    d = _save(tmp_path, "mixtral", seed=18, max_shard_size="60KB")
    write_word_tokenizer(d)
    shard, names = _expert_only_shard(d)
    good = shard.read_bytes()
    engine = RingEngine(d, max_memory=_ring_budget(d), strategy="routed")
    shard.write_bytes(good[:len(good) // 3])
    with pytest.raises(ValueError) as e:
        engine.generate(PROMPTS, NEW)
    msg = str(e.value)
    assert shard.name in msg and "unexpected end of file" in msg
    assert any(f"'{n}'" in msg for n in names), msg
    engine.close()
    shard.write_bytes(good)
    real_init = SlotRing.__init__

    def open_then_truncate(self, *a, **k):
        real_init(self, *a, **k)
        shard.write_bytes(good[:len(good) // 3])  # the file changes after the engine opened it

    monkeypatch.setattr(SlotRing, "__init__", open_then_truncate)
    args = ["generate", "--model", str(d), "--prompt", "w1 w2 w3", "--temperature", "0", "--max-new-tokens", "3",
            "--strategy", "routed", "--max-memory", str(_ring_budget(d)), "--dtype", "float32"]
    assert main(args) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and shard.name in cap.err and any(f"'{n}'" in cap.err for n in names), cap.err


def test_split_runs_cover_the_same_bytes(tmp_path) -> None:
    """A run cut into pieces of at most ``limit`` bytes reads the same bytes into the same buffers (scatter views
    split across piece boundaries), each piece naming the run's reads."""
    from semoe.inference.loader import split_runs
    from semoe.storage.tensor_io import PositionalReader, byte_view, coalesce

    data = torch.randint(0, 256, (10_000,), dtype=torch.uint8)
    f = tmp_path / "blob"
    f.write_bytes(data.numpy().tobytes())
    with PositionalReader(f) as r:
        outs = [torch.zeros(n, dtype=torch.uint8) for n in (1000, 3333, 17, 4650)]
        offs = [100, 1100, 4433, 4450]  # consecutive: one run of 9000 bytes
        runs = coalesce((r, o, byte_view(t), f"t{i}") for i, (o, t) in enumerate(zip(offs, outs)))
        assert len(runs) == 1
        pieces = split_runs(runs, 1024)
        assert [p.nbytes for p in pieces] == [1024] * 8 + [9100 - 100 - 8 * 1024]
        assert all(p.parts == runs[0].parts for p in pieces)
        assert [p.offset for p in pieces] == [100 + 1024 * i for i in range(9)]
        assert sum(p.read() for p in pieces) == 9000
    for o, t in zip(offs, outs):
        assert torch.equal(t, data[o:o + t.numel()])
    assert split_runs(runs, 10_000) == runs  # short runs stay as they are


def test_predictions_read_in_pieces_stay_bit_identical(tmp_path) -> None:
    """Predictions read in tiny pieces (on-demand jobs served between them, in compact slots and whole-layer slots):
    bit-identical to the resident model, every pick counted as a hit or a miss (with 512-byte pieces on-demand jobs
    are served inside predictions: 20 per run here, counted in ``prediction_yields``; how many is timing)."""
    d = _save(tmp_path, "mixtral", seed=23)
    ref = _resident(d)
    for compact in (True, False):
        with RingEngine(d, max_memory=_ring_budget(d), strategy="routed", prefetch="always",
                        compact_slots=compact, batch_size=2) as e:
            e._ring.prediction_piece = 512
            got = e.generate(PROMPTS, NEW, return_logits=True)
        _same(got, ref)
        st = got.stats
        assert st.experts_prefetched > 0
        assert st.expert_cache_hits + st.expert_prefetch_hits + st.expert_misses >= st.experts_needed


class _GatedPool(ReadPool):
    """Two reader threads that log each expert they read (``("read", (layer, expert))``, in call order) and, before
    reading an expert whose layer's previous expert (read by the previous call) the compute has not taken yet
    (``placement`` returned it: logged by the test as ``("placed", key)``), wait up to 10 s for it to be taken. With
    each miss placed as soon as its own reads are done the compute takes it at once; with a layer's misses placed
    together it could not before they all were read. ``fail_at``: the gated call of that number raises ``OSError``."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__(2)
        self.cv = threading.Condition()
        self.log: list[tuple[str, tuple[int, int]]] = []
        self.untaken: set[tuple[int, int]] = set()  # read, and not taken by the compute since
        self.last: tuple[int, int] | None = None
        self.gated = self.timeouts = 0
        self.fail_at = fail_at
        self.call_of: dict[int, int] = {}  # log index of a read -> the number of the call that read it
        self.calls = 0

    def run(self, runs):  # type: ignore[override]
        keys = sorted({_expert_key(r.tensor) for run in runs for r in run.parts})
        prev = self.last
        if prev is not None and prev[0] == keys[0][0]:  # a later miss of the same layer
            self.gated += 1
            with self.cv:
                if not self.cv.wait_for(lambda: prev not in self.untaken, timeout=10):
                    self.timeouts += 1
            if self.gated == self.fail_at:
                raise OSError("injected read error")
        n = super().run(runs)
        with self.cv:
            self.untaken.update(keys)
            for k in keys:
                self.call_of[len(self.log)] = self.calls
                self.log.append(("read", k))
            self.calls += 1
        self.last = keys[-1]
        return n

    def took(self, key: tuple[int, int]) -> None:
        with self.cv:
            self.untaken.discard(key)
            self.log.append(("placed", key))
            self.cv.notify_all()


def _expert_key(tensor: str) -> tuple[int, int]:
    m = re.search(r"layers\.(\d+)\..*experts\.(\d+)\.", tensor)
    assert m is not None, tensor
    return int(m.group(1)), int(m.group(2))


def _gated_engine(d: Path, monkeypatch, pool: _GatedPool, compact_slots: bool = True, batch_size: int = 2
                  ) -> RingEngine:
    """Decode passes computed in place (compact slots unless ``compact_slots=False``), every pick a miss read on
    demand (no cache, no prediction), the reads through ``pool``; the compute's ``placement`` calls reported to it."""
    budget = 2 * plan_sections(open_model(d)).slot_bytes + MiB // 2
    e = RingEngine(d, max_memory=budget, strategy="routed", batch_size=batch_size, dense_cache=False,
                   expert_cache=0, prefetch=False, compact_slots=compact_slots)
    ring = e._ring
    ring.pool.close()
    ring.pool = pool
    real = ring.placement

    def placement(ticket, layer, x):
        where = real(ticket, layer, x)
        pool.took((layer.layer, x))
        return where

    monkeypatch.setattr(ring, "placement", placement)
    return e


def _read_segments(pool: _GatedPool) -> list[list[tuple[int, tuple[int, int]]]]:
    """(log index, key) of each run of consecutive reads of one layer in the gated pool's log."""
    segments: list[list[tuple[int, tuple[int, int]]]] = []
    for i, (what, key) in enumerate(pool.log):
        if what == "read":
            if segments and segments[-1][-1][1][0] == key[0]:
                segments[-1].append((i, key))
            else:
                segments.append([(i, key)])
    return segments


def _assert_each_taken_before_the_next_read(segments: list[list[tuple[int, tuple[int, int]]]],
                                            pool: _GatedPool, ascending: bool = True) -> None:
    """Each miss was taken by the compute before the next read of its layer (a later call of the pool) began."""
    for s in segments:
        if ascending:  # ascending ids: the compute's order (one MoE call per layer)
            assert [k for _, k in s] == sorted(k for _, k in s)
        for (i, a), (j, _) in itertools.pairwise(s):
            if pool.call_of[i] != pool.call_of[j]:
                assert ("placed", a) in pool.log[i:j]


def test_each_miss_is_computed_from_once_its_own_read_is_done(tmp_path, monkeypatch) -> None:
    """In place, a routed layer's misses are read one after the other in ascending id order (the order the compute
    takes them) and each is placed when its own reads are done: the compute takes miss j (and computes its group)
    before miss j + 1 is read (the gated pool waits for that; it would time out if the misses were placed together),
    and the output is the resident model's, bit for bit."""
    d = _many_experts(tmp_path, seed=24)
    one = [PROMPTS[0]]
    ref = _resident(d, prompts=one)
    pool = _GatedPool()
    with _gated_engine(d, monkeypatch, pool) as e:
        got = e.generate(one, NEW, return_logits=True)
        assert e._ring.in_place and e._rows == 4
    _same(got, ref)
    segments = _read_segments(pool)
    # every pool call after an earlier one of its layer was gated (the prefill's too: it runs from whole-layer slots,
    # placed two experts at a time), and none timed out
    calls = [len({pool.call_of[i] for i, _ in s}) for s in segments]
    assert pool.gated == sum(c - 1 for c in calls) and pool.timeouts == 0
    decode = [s for s in segments if len(s) == 4]  # decode passes: 4 layers x 4 picks (a prefill reads 8 or more)
    assert len(decode) == (NEW - 1) * 4
    assert all(len({pool.call_of[i] for i, _ in s}) == 4 for s in decode)  # compact: one read per miss
    _assert_each_taken_before_the_next_read(segments, pool)


SAME_LEN = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [30, 31, 32, 33, 34], [40, 41, 42, 43, 44]]


@pytest.mark.parametrize("prompts", ["one", "four", "mixed"])
def test_whole_layer_slots_compute_each_miss_once_its_own_read_is_done(tmp_path, monkeypatch, prompts: str) -> None:
    """Routed passes from whole-layer slots (compact slots off; with four sequences and top-4 of 16 a pass can pick
    every expert, as at T k >= E in the bench) are placed as their reads finish too: the misses are read into their
    own rows (no cache here) in the order the compute takes them (ascending ids in one MoE call; "mixed": three prompt
    lengths, three calls per layer, each call's picks first), one whole expert per reader thread (two at a time),
    and the compute takes each pair before the next pair is read (the gated pool times out otherwise: before, a
    layer's misses were one job, computed from once all were read); bit-identical to the resident model."""
    d = _many_experts(tmp_path, seed=26)
    batch = {"one": [PROMPTS[0]], "four": SAME_LEN, "mixed": PROMPTS}[prompts]
    bs = 4 if prompts == "four" else 2  # (prefill micro-batches: "four" prefills in one call)
    ref = _resident(d, prompts=batch, batch_size=bs)
    pool = _GatedPool()
    with _gated_engine(d, monkeypatch, pool, compact_slots=False, batch_size=bs) as e:
        got = e.generate(batch, NEW, return_logits=True)
        assert e._ring.in_place and e._rows is None and got.stats.full_layer_loads == 0
    _same(got, ref)
    segments = _read_segments(pool)
    assert len(segments) >= NEW * 4 and pool.timeouts == 0
    calls = [len({pool.call_of[i] for i, _ in s}) for s in segments]  # pool calls per run of one layer's reads
    assert all(2 * c >= len(s) for c, s in zip(calls, segments))  # at most one expert per reader thread a call
    assert pool.gated == sum(c - 1 for c in calls) >= (NEW - 1) * 4  # (decode: 4 picks or more a layer, two calls)
    _assert_each_taken_before_the_next_read(segments, pool, ascending=prompts != "mixed")


def test_a_miss_whose_read_fails_fails_the_compute_waiting_for_it(tmp_path, monkeypatch) -> None:
    """The read of a layer's third miss fails after the compute took the first two: the compute, waiting for the
    third, gets the error (naming the file and the tensor) instead of waiting for ever; the engine closes."""
    d = _many_experts(tmp_path, seed=25)
    pool = _GatedPool(fail_at=2)
    e = _gated_engine(d, monkeypatch, pool)
    try:
        with pytest.raises(ValueError, match="injected read error") as err:
            e.generate([PROMPTS[0]], NEW)
    finally:
        e.close()
    msg = str(err.value)
    assert "model.safetensors" in msg and re.search(r"'model\.layers\.\d+\.mlp\.experts\.\d+\.", msg), msg
    assert pool.timeouts == 0 and sum(ev[0] == "placed" for ev in pool.log) >= 2
