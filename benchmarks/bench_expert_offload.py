"""Decode within a memory budget with the page cache cold: semoe's whole-layer ring, its routed-only ring with the
expert cache (and the cost model choosing), HF accelerate and llama.cpp, on the same random HF checkpoints.

Run (from the repository root; timings under ``flock -x /tmp/semoe-cpu.lock`` on a shared machine):

    python benchmarks/bench_expert_offload.py --models mixtral-e8k2      # one model, B = 1, 4, 16 (~2 min)
    python benchmarks/bench_expert_offload.py --models many-e32k4
    python benchmarks/bench_expert_offload.py --smoke                    # tiny models, one process each (CI)

Models (random weights, float32, made once under --workdir with transformers, offline): ``mixtral-e8k2`` (Mixtral,
8 experts, top-2) and ``many-e32k4`` (Mixtral layout, 32 experts, top-4: the many-experts regime of OLMoE /
Qwen-MoE, f(1) = 0.125), 0.75-1.5 MiB per expert: latency-bound reads; ``mixtral-e8k2-big`` / ``many-e32k4-big``:
the same shapes with experts of a real checkpoint's size (hidden 1024, expert FFN 2048 / 1024: 24 / 12 MiB each in
float32; OLMoE's are 12 MiB in bf16), 4 layers, 0.8 / 1.6 GiB (one model and batch size per call, ~2-5 min each;
with 4 layers a budget of 1/2 is the two slots alone: use --budget-frac 0.75).
Each folder also gets a SentencePiece ``tokenizer.model`` (trained offline; the GGUF
converter needs a vocabulary) and, when the llama.cpp converter is found (``--llama-cpp-src``: a folder with
``convert_hf_to_gguf.py`` and ``gguf-py``, e.g. ``vendor/llama.cpp`` of the llama-cpp-python sdist), a GGUF in
f32 made by it from the same folder (no quantisation).

Rows (``impl``), each in its own process, the budget --budget-frac of the weights (1/4):
  semoe-layer   ``RingEngine(strategy="layer")``: every pass streams every section (today's ring)
  semoe-routed  ``RingEngine(strategy="routed")``: the dense part, then only the experts the routers pick (the
                next layer's predicted ahead), the expert cache in what the budget leaves
  semoe-auto    ``RingEngine(strategy="auto")``: the cost model picks per layer and pass
  semoe-routed-wide  (only with --impls) routed with whole-layer slots (``compact_slots=False``): the engine before
                compact slots, for an A/B in the same window
  accelerate    ``from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...)``
  llama.cpp     llama-cpp-python (built from source), the GGUF memory-mapped (llama.cpp's default), batched
                decode through ``llama_decode`` with one sequence id per prompt, f32 KV cache; no budget exists
                in llama.cpp: it maps the whole file and populates the mapping on load (``cold_load_s``;
                ``tokens_per_s_incl_load`` adds it to the timed call). So it runs confined to the same memory
                (``MemoryCgroup``, cgroup v1, where a writable memory controller exists; ``--no-confine`` to
                skip): its worker moves itself into a fresh group before it starts and, after its imports, sets the
                group's limit to what is charged then (its post-import base: interpreter, libllama, numpy) +
                the budget + semoe's documented overhead (24 MiB), i.e. what semoe's rows may use above their own
                post-import base. v1 charges the mapped GGUF's page cache to the group, so the kernel evicts
                mapped pages under the limit and llama.cpp reads them from disk again. JSON: ``confined``,
                ``cgroup_base_mb``, ``cgroup_limit_mb``, ``cgroup_peak_mb``, ``cgroup_failcnt`` (times the limit
                was hit); ``confined: false`` (and a note) where no cgroup could be made: then its decode runs
                from memory
Decode: B prompts (B = 1, 4, 16) of --prompt-len tokens, --new tokens each, greedy; tokens_per_s counts new tokens
(the prefill pass is inside the timed call). Page cache cold: the model's files are evicted
(``posix_fadvise(DONTNEED)``) before every timed call, semoe drops each range after reading it (every pass reads
from disk), accelerate's files are evicted before every forward, llama.cpp's GGUF is evicted after it is
mapped (the pages it touches stay mapped for that call: mmap's behaviour). Each timed call uses other prompts
(the expert cache cannot replay a previous call's routing); one warm-up call first.

Per row (JSON lines on stdout): impl, model, batch, cache, tokens_per_s, bound_tokens_per_s, x_of_bound,
bytes_read_per_token (``/proc/self/io`` read_bytes of the timed calls: what storage delivered), semoe's own
file bytes per token, peak_rss_mb, base_rss_mb, budget_mb, model_mb, hit rates (semoe), read_gb_per_s.
Bound: per pass max(bytes the policy must read / read rate, resident compute per pass), summed over the passes;
bytes = everything (semoe-layer, accelerate) or the dense part + f(T) of the expert bytes not in the expert cache,
f(T) = 1 - (1 - k/E)^T for the pass's T tokens (routed rows, llama.cpp; uniform random routers make it exact in
expectation). Read rate: the best this disk showed in the batch size's window: 16 MiB sequential reads and single
experts (2 readers, ``POSIX_FADV_RANDOM``), each measured before and after the rows (mean), and the whole-layer
ring's own storage bytes over its wall time (``read_gb_per_s``, ``read_gb_per_s_before`` / ``_after``,
``expert_read_gb_per_s_before`` / ``_after``, ``layer_ring_read_gb_per_s``); ``bound_expert_rate_tokens_per_s``
prices the expert bytes at the single-expert rate instead. Resident compute: semoe with no budget, same prompts.
The summary line gives the targets
of issue #14 (B=1 routed >= 0.7/f(1) x whole-layer; every semoe row within 1.3x of its bound; >= 1.3x llama.cpp
at B=1 and B=16; peak RSS <= base + budget + 24 MiB) and whatever failed (e.g. llama.cpp not built: the error).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_offload import MemorySampler, _status, evict, read_bandwidth
from common import emit_json, log, median, random_mixtral_checkpoint, stdout_to_stderr

MiB = 2**20
IO_THREADS = 2  # RingEngine's default reader pool
OVERHEAD_MIB = 24  # documented fixed overhead above the post-import RSS (docs/inference.md)
BASE = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1,
            max_position_embeddings=256)
MODELS = {
    "mixtral-e8k2": dict(BASE, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2),
    "many-e32k4": dict(BASE, intermediate_size=256, num_local_experts=32, num_experts_per_tok=4),
}
# Realistic per-expert size (OLMoE's experts are 12 MiB in bf16, Mixtral's 336 MiB): 24 / 12 MiB per expert in
# float32, 4 layers, ~0.8 / 1.6 GiB. Run one model and one batch size per call (--models / --batches).
BIG = dict(BASE, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
MODELS.update({
    "mixtral-e8k2-big": dict(BIG, intermediate_size=2048, num_local_experts=8, num_experts_per_tok=2),
    "many-e32k4-big": dict(BIG, intermediate_size=1024, num_local_experts=32, num_experts_per_tok=4),
})
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)
SMOKE = {
    "mixtral-e8k2": dict(TINY, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    "many-e32k4": dict(TINY, intermediate_size=32, num_local_experts=32, num_experts_per_tok=4),
}
SMOKE.update({f"{m}-big": SMOKE[m] for m in list(SMOKE)})
IMPLS = ("semoe-layer", "semoe-routed", "semoe-auto", "accelerate", "llama.cpp")
#: optional rows (--impls): routed loading with whole-layer slots (``compact_slots=False``, the engine before compact
#: slots), for an A/B in the same window
EXTRA_IMPLS = ("semoe-routed-wide",)
WORDS = ("the king and queen of our land shall speak to thee my lord good night sweet prince what news from rome "
         "to be or not is question noble friends come hither answer one two three four five").split()


# ------------------------------------------------------------------------------------------ set-up
def sentencepiece_model(path: Path) -> None:
    """A small SentencePiece BPE ``tokenizer.model`` (trained offline on a fixed word list)."""
    import sentencepiece as spm

    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=96, model_type="bpe",
                                   minloglevel=2)
    (path / "tokenizer.model").write_bytes(buf.getvalue())


def ensure_model(workdir: Path, name: str, cfg: dict[str, Any]) -> Path:
    """The HF folder of ``name`` (random Mixtral-layout weights, routers spread wide), made once, with a
    SentencePiece ``tokenizer.model`` when sentencepiece is installed (added to a folder made without it)."""
    has_spm = importlib.util.find_spec("sentencepiece") is not None
    path = random_mixtral_checkpoint(workdir, name, cfg, sentencepiece_model if has_spm else None)
    if has_spm and not (path / "tokenizer.model").is_file():
        sentencepiece_model(path)
    return path


# ------------------------------------------------------------------------------------------ memory cgroup
class MemoryCgroup:
    """A cgroup (v1 memory controller) that confines one child process, page cache included: in v1 the file pages a
    process faults in (its memory-mapped GGUF) are charged to its cgroup, so under the limit the kernel evicts them
    and a mapped model is read from disk again, as semoe's ring reads what its budget cannot hold.

    :meth:`create` makes ``<this process's memory cgroup>/<name>`` (nested, so the machine's own accounting still
    covers it; the mount's root as a fallback) or returns ``(None, why)`` where no writable memory controller
    exists (then the row runs unconfined). The child moves itself in before it starts (:meth:`command`); the child
    sets the limit once its imports are charged (:func:`confine_after_imports`); :meth:`remove` moves any process
    left back to the parent group, then removes the group."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, name: str) -> tuple[MemoryCgroup | None, str | None]:
        if not (cls.ROOT / "memory.limit_in_bytes").is_file():
            return None, f"no cgroup v1 memory controller at {cls.ROOT}"
        bases = []
        try:
            with open("/proc/self/cgroup") as f:
                for line in f:
                    _, ctrl, rel = line.rstrip("\n").split(":", 2)
                    if "memory" in ctrl.split(","):
                        bases.append(cls.ROOT / rel.lstrip("/"))
        except OSError:
            pass
        bases.append(cls.ROOT)
        errors = []
        for base in dict.fromkeys(bases):
            path = base / name
            try:
                path.mkdir()
                (path / "memory.limit_in_bytes").write_text("-1")  # unlimited until the child sets its limit
                return cls(path), None
            except OSError as e:
                errors.append(f"{path}: {e}")
                if path.is_dir():
                    cls(path).remove()
        return None, "no writable memory cgroup: " + "; ".join(errors)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into this group (the pid is kept by ``exec``)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def remove(self) -> None:
        parent = self.path.parent / "cgroup.procs"
        for _ in range(50):
            try:
                pids = (self.path / "cgroup.procs").read_text().split()
            except OSError:
                return
            for pid in pids:
                try:
                    parent.write_text(pid)
                except OSError:
                    pass
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        log(f"could not remove the cgroup {self.path}")


def _cg_read(path: Path, key: str) -> int:
    return int((path / key).read_text().split()[0])


def confine_after_imports(cgroup: str, extra: int) -> dict[str, Any]:
    """In the child, after its imports: the group's limit = what is charged to it now (interpreter, libraries and
    their pages, i.e. the post-import base) + ``extra`` (semoe's budget + its documented overhead); the peak counter
    restarts here."""
    path = Path(cgroup)
    base = _cg_read(path, "memory.usage_in_bytes")
    (path / "memory.limit_in_bytes").write_text(str(base + extra))
    (path / "memory.max_usage_in_bytes").write_text("0")
    return {"cgroup_base_mb": base / MiB, "cgroup_limit_mb": _cg_read(path, "memory.limit_in_bytes") / MiB}


def cgroup_peaks(cgroup: str) -> dict[str, Any]:
    path = Path(cgroup)
    return {"cgroup_peak_mb": _cg_read(path, "memory.max_usage_in_bytes") / MiB,
            "cgroup_failcnt": _cg_read(path, "memory.failcnt")}


def evict_plain(paths: list[Path]) -> None:
    """``posix_fadvise(DONTNEED)`` of whole files (for the llama.cpp worker, which does not import torch)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ensure_bf16(model: Path) -> Path:
    """A bfloat16 copy of the float32 HF folder ``model`` (``<model>-bf16``: each safetensors file cast, config and
    tokenizer copied), made once: the checkpoint format of every Mixtral / Qwen-MoE / OLMoE release."""
    from safetensors.torch import load_file, save_file

    out = model.with_name(model.name + "-bf16")
    if (out / "config.json").is_file():
        return out
    import torch

    tmp = out.with_name("." + out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        if f.suffix == ".safetensors":
            tensors = {k: v.to(torch.bfloat16) for k, v in load_file(f).items()}
            save_file(tensors, tmp / f.name, metadata={"format": "pt"})
        elif f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
            (tmp / f.name).write_text(json.dumps(cfg, indent=2))
        elif f.is_file() and f.suffix != ".gguf":
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def ensure_gguf(model: Path, src: Path | None, dtype: str = "float32") -> tuple[Path | None, str | None]:
    """(the GGUF of ``model`` made by llama.cpp's converter, in f32 or bf16 as ``dtype``, None) or (None, why not)."""
    outtype = "f32" if dtype == "float32" else "bf16"
    gguf = model / f"model-{outtype}.gguf"
    if gguf.is_file():
        return gguf, None
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "llama_cpp is not installed (pip install llama-cpp-python builds it from source)"
    if src is None or not (src / "convert_hf_to_gguf.py").is_file():
        return None, ("llama.cpp's convert_hf_to_gguf.py not found: pass --llama-cpp-src (vendor/llama.cpp of the "
                      "llama-cpp-python sdist)")
    if not (model / "tokenizer.model").is_file():
        return None, "no tokenizer.model for the converter (pip install sentencepiece)"
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype,
                           "--outfile", str(gguf)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        return None, f"convert_hf_to_gguf.py failed: {proc.stderr.strip().splitlines()[-1:]}"
    return gguf, None


def expert_read_bandwidth(files: list[Path], experts: list[list[tuple[Any, int, int]]], threads: int,
                          n: int = 24) -> float:
    """Bytes/s of cold reads of ``n`` single experts (a fixed random sample; each its pieces, adjacent ones merged)
    by ``threads`` readers at once through descriptors marked ``POSIX_FADV_RANDOM``: how the ring reads a routed
    expert (its default reader pool). The files are evicted first and afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    sample = random.Random(0).sample(experts, min(n, len(experts)))
    runs = []
    for pieces in sample:
        merged: list[list[Any]] = []
        for path, off, nb in sorted(pieces, key=lambda p: (str(p[0]), p[1])):
            if merged and merged[-1][0] == path and merged[-1][1] + merged[-1][2] == off:
                merged[-1][2] += nb
            else:
                merged.append([path, off, nb])
        runs.append(merged)
    fds = {}
    for f in {str(p) for pieces in sample for p, _, _ in pieces}:
        fds[f] = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fds[f], 0, 0, os.POSIX_FADV_RANDOM)
    bufs = [bytearray(max(nb for r in runs for _, _, nb in r)) for _ in range(threads)]

    def read(i: int) -> int:
        mv, got = memoryview(bufs[i % threads]), 0
        for path, off, nb in runs[i]:
            done = 0
            while done < nb:
                k = os.preadv(fds[str(path)], [mv[done:nb]], off + done)
                if k <= 0:
                    raise OSError(f"short read of {path}")
                done += k
            got += nb
        return got

    evict(files)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, range(len(runs))))
        rate = total / (time.perf_counter() - t0)
    finally:
        for fd in fds.values():
            os.close(fd)
        evict(files)
    return rate


def prompt_sets(batch: int, prompt_len: int, reps: int, vocab: int) -> list[list[list[int]]]:
    """reps + 1 different prompt batches (the first for the warm-up)."""
    rng = random.Random(batch * 1000 + prompt_len)
    return [[[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(batch)] for _ in range(reps + 1)]


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes"):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------------------ workers
def run_semoe(spec: dict[str, Any]) -> dict[str, Any]:
    from semoe.inference.ring import RingEngine

    strategy = spec["impl"].removeprefix("semoe-").removesuffix("-wide") if spec["budget"] is not None else "auto"
    extra: dict[str, Any] = {"prefetch_width": spec["prefetch_width"]} if spec.get("prefetch_width") else {}
    if spec["impl"].endswith("-wide"):
        extra["compact_slots"] = False
    engine = RingEngine(spec["model"], max_memory=spec["budget"], strategy=strategy, dtype=spec["dtype"],
                        batch_size=len(spec["prompts"][0]), drop_page_cache=spec["budget"] is not None, **extra)
    files = sorted(Path(spec["model"]).glob("*.safetensors"))
    times, stats, io_bytes = [], [], 0
    try:
        for rep, prompts in enumerate(spec["prompts"]):
            if spec["budget"] is not None:
                evict(files)
            b0, t0 = read_bytes(), time.perf_counter()
            result = engine.generate(prompts, spec["new"])
            if rep:
                times.append(time.perf_counter() - t0)
                io_bytes += read_bytes() - b0
                stats.append(result.stats)
        new = sum(s.new_tokens for s in stats)
        out = {"times": times, "tokens_out": result.tokens, "passes": stats[-1].passes, "resident": engine.resident,
               "io_bytes_per_token": io_bytes / new, "semoe_bytes_per_token": sum(s.bytes_read for s in stats) / new,
               "cache_hit_rate": sum(s.expert_cache_hits for s in stats) / max(1, sum(s.experts_needed for s in stats)),
               "prefetch_hit_rate": sum(s.expert_prefetch_hits for s in stats) / max(1, sum(s.experts_needed
                                                                                          for s in stats)),
               **{f"prediction_hit_rate_d{d}": sum(getattr(s, f"predicted_d{d}_hits", 0) for s in stats) / max(
                   1, sum(getattr(s, f"predicted_d{d}_needed", 0) for s in stats)) for d in (1, 2)},
               "routed_layer_loads": sum(s.routed_layer_loads for s in stats),
               "experts_prefetched": sum(s.experts_prefetched for s in stats),
               "prefetch_wasted": sum(s.prefetch_wasted for s in stats),
               "predictions_skipped": sum(s.predictions_skipped for s in stats),
               "full_layer_loads": sum(s.full_layer_loads for s in stats),
               "cache_mb": engine.cache.capacity_bytes / MiB if engine.cache is not None else 0.0,
               "cache_fraction": (engine.cache.capacity / max(1, sum(len(x.reads) for s in engine.plan.sections
                                                                     for x in s.experts))
                                  if engine.cache is not None else 0.0),
               "load_s": median([s.load_s for s in stats]), "wait_s": median([s.wait_s for s in stats]),
               "compute_s": median([s.compute_s for s in stats])}
    finally:
        engine.close()
    return out


def run_accelerate(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    offload = Path(spec["workdir"]) / "offload"
    shutil.rmtree(offload, ignore_errors=True)
    with stdout_to_stderr():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec["model"], device_map="auto", max_memory={"cpu": spec["budget"]}, offload_folder=str(offload),
            dtype=torch.float32)
    model.eval()
    files = sorted(Path(spec["model"]).glob("*.safetensors")) + sorted(p for p in offload.rglob("*") if p.is_file())
    model.register_forward_pre_hook(lambda *_: evict(files))
    times, io_bytes = [], 0
    with torch.no_grad():
        for rep, prompts in enumerate(spec["prompts"]):
            x = torch.tensor(prompts)
            b0, t0 = read_bytes(), time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=spec["new"],
                                 min_new_tokens=spec["new"], eos_token_id=None, pad_token_id=0)
            if rep:
                times.append(time.perf_counter() - t0)
                io_bytes += read_bytes() - b0
    new = len(spec["prompts"][0]) * spec["new"] * (len(spec["prompts"]) - 1)
    return {"times": times, "tokens_out": out[:, x.shape[1]:].tolist(), "passes": spec["new"],
            "io_bytes_per_token": io_bytes / new}


def run_llama(spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    gguf = Path(spec["gguf"])
    B, P, N = len(spec["prompts"][0]), len(spec["prompts"][0][0]), spec["new"]
    times, loads, io_bytes, out = [], [], 0, []
    for rep, prompts in enumerate(spec["prompts"]):
        evict_plain([gguf])
        t_load = time.perf_counter()
        with stdout_to_stderr():  # llama.cpp maps the file and populates the mapping: this reads the whole model
            llm = llama_cpp.Llama(str(gguf), n_ctx=16, n_threads=spec["threads"], use_mmap=True, verbose=False)
        t_load = time.perf_counter() - t_load
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = B * (P + N) + 16, B * P, B * P, B
        cp.n_threads = cp.n_threads_batch = spec["threads"]
        # KV cache: f32 like semoe's float32 runs; f16 (GGML type 1: llama.cpp's default) for bfloat16 runs
        kv = 0 if spec["dtype"] == "float32" else 1
        cp.kv_unified, cp.type_k, cp.type_v = True, kv, kv
        ctx = llama_cpp.llama_init_from_model(llm._model.model, cp)
        batch = llama_cpp.llama_batch_init(B * P, 0, B)
        V = llm.n_vocab()

        def decode(items: list[tuple[int, int, int, bool]], ctx: Any = ctx, batch: Any = batch,
                   V: int = V) -> list[int]:
            batch.n_tokens = len(items)
            for i, (t, p, s, want) in enumerate(items):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, want
                batch.seq_id[i][0] = s
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            return [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(V,))))
                    for i, it in enumerate(items) if it[3]]

        evict_plain([gguf])  # drops what is not mapped (unconfined, with a populated mapping: nothing)
        b0, t0 = read_bytes(), time.perf_counter()
        nxt = decode([(t, p, b, p == P - 1) for b, pr in enumerate(prompts) for p, t in enumerate(pr)])
        toks = [[x] for x in nxt]
        for step in range(1, N):
            nxt = decode([(nxt[b], P + step - 1, b, True) for b in range(B)])
            for b in range(B):
                toks[b].append(nxt[b])
        if rep:
            times.append(time.perf_counter() - t0)
            loads.append(t_load)
            io_bytes += read_bytes() - b0
        out = toks
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llm.close()
    return {"times": times, "tokens_out": out, "passes": N, "io_bytes_per_token": io_bytes / (B * N * len(times)),
            "cold_load_s": median(loads), "tokens_per_s_incl_load": B * N / (median(times) + median(loads))}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["impl"] == "llama.cpp":  # no torch in this process: its base is llama.cpp's own
        import llama_cpp  # noqa: F401
        import numpy  # noqa: F401
    else:
        import torch

        torch.set_num_threads(spec["threads"])
        if spec["impl"] == "accelerate":
            import accelerate  # noqa: F401
            import transformers  # noqa: F401
        else:
            import semoe.inference.ring  # noqa: F401
    base = _status()["VmRSS"]
    confined = confine_after_imports(spec["cgroup"], spec["cgroup_extra"]) if spec.get("cgroup") else {}
    with MemorySampler() as mem:
        fn = {"accelerate": run_accelerate, "llama.cpp": run_llama}.get(spec["impl"], run_semoe)
        res = fn(spec)
    if confined:
        confined.update(cgroup_peaks(spec["cgroup"]))
    res.update(base_rss_mb=base, peak_rss_mb=_status()["VmHWM"], peak_anon_mb=mem.anon, peak_file_mb=mem.file,
               wall_s=median(res["times"]), **confined)
    return res


def run_worker(spec: dict[str, Any], isolated: bool, cgroup: MemoryCgroup | None = None) -> dict[str, Any]:
    """The row in a child process (``isolated``; in this process otherwise), inside ``cgroup`` when given (the child
    moves itself in before it starts; the group is removed afterwards)."""
    if not isolated:
        return worker(spec)
    argv = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cgroup.command(argv) if cgroup is not None else argv, capture_output=True, text=True,
                              timeout=1200)
    finally:
        if cgroup is not None:
            cgroup.remove()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['impl']} B={len(spec['prompts'][0])} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main
def pass_bytes(T: int, dense: int, experts: int, E: int, k: int, cached: float, whole: bool) -> float:
    """Bytes a pass over T tokens must read: everything (whole layers), or the dense part and the expected routed
    share f(T) = 1 - (1 - k/E)^T of the expert bytes not in the expert cache (``cached``: its share of experts)."""
    if whole:
        return dense + experts
    return dense + (1 - (1 - k / E) ** T) * experts * (1 - cached)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, B = 1 and 4, one repetition, one process")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "semoe-bench-expert-offload")
    ap.add_argument("--models", default="mixtral-e8k2,many-e32k4",
                    help=f"comma list of {list(MODELS)} (default: the two small ones)")
    ap.add_argument("--batches", default="1,4,16", help="decode batch sizes (default 1,4,16)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS + EXTRA_IMPLS)}")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the checkpoint's and the compute dtype of every row (bfloat16: a bf16 copy of the model, "
                    "semoe computes in bf16, llama.cpp gets a bf16 GGUF and an f16 KV cache)")
    ap.add_argument("--budget-frac", type=float, default=0.25, help="budget as a fraction of the weights' bytes")
    ap.add_argument("--prompt-len", type=int, default=4)
    ap.add_argument("--new", type=int, default=8, help="new tokens per sequence (default 8)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per row (default 2; smoke 1)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per process (default 1)")
    ap.add_argument("--llama-cpp-src", type=Path, default=Path(tempfile.gettempdir()) / "semoe-llama-src",
                    help="folder with llama.cpp's convert_hf_to_gguf.py and gguf-py")
    ap.add_argument("--prefetch-width", type=int, default=0,
                    help="semoe rows: predict the top (k + this) experts (RingEngine prefetch_width; default 0)")
    ap.add_argument("--no-confine", action="store_true",
                    help="run llama.cpp without the memory cgroup (its decode then runs from memory)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    import torch

    from semoe.inference.sections import open_model, plan_sections

    reps = args.reps or (1 if args.smoke else 2)
    batches = [1, 4] if args.smoke else [int(b) for b in args.batches.split(",")]
    impls = [i for i in args.impls.split(",") if i]
    notes: dict[str, str] = {}
    if "accelerate" in impls and importlib.util.find_spec("accelerate") is None:
        impls.remove("accelerate")
        notes["accelerate"] = "not installed"
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        cfg = (SMOKE if args.smoke else MODELS)[name]
        model = ensure_model(args.workdir, name, cfg)
        if args.dtype == "bfloat16":
            model = ensure_bf16(model)
        gguf, why = ensure_gguf(model, args.llama_cpp_src, args.dtype) if "llama.cpp" in impls else (None, None)
        if why:
            notes[f"llama.cpp/{name}"] = why
            log(f"llama.cpp skipped for {name}: {why}")
        source = open_model(model)
        dtype = getattr(torch, args.dtype)
        plan = plan_sections(source, 1, dtype)
        weights = source.param_bytes(dtype)
        budget = int(args.budget_frac * weights)
        files = sorted(model.glob("*.safetensors"))
        E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
        dense = sum(s.dense_bytes_read for s in plan.sections)
        experts = sum(x.disk_bytes * x.num_experts for s in plan.sections for x in s.experts)
        expert_ranges = [[(rd.path, rd.offset, rd.nbytes) for rd in x.reads[e]]
                         for s in plan.sections for x in s.experts for e in range(x.num_experts)]
        log(f"{name}: {weights / MiB:.1f} MiB weights ({experts / MiB:.1f} MiB experts), budget {budget / MiB:.1f} MiB")
        for B in batches:
            prompts = prompt_sets(B, args.prompt_len, reps, cfg["vocab_size"])
            common = dict(model=str(model), prompts=prompts, new=args.new, threads=args.threads, reps=reps,
                          workdir=str(args.workdir), prefetch_width=args.prefetch_width, dtype=args.dtype)
            # the read rates are measured in the same window as the rows, before and after them (this disk's rate
            # moves by up to 2x between minutes): the bound uses their mean, both are reported
            bw0, xbw0 = read_bandwidth(files, True, 2), expert_read_bandwidth(files, expert_ranges, IO_THREADS)
            res = run_worker({**common, "impl": "semoe-auto", "budget": None}, not args.smoke)
            compute_pass = res["wall_s"] / res["passes"]
            batch_rows: list[dict[str, Any]] = []
            for impl in impls:
                if impl == "llama.cpp" and gguf is None:
                    continue
                spec = {**common, "impl": impl, "budget": budget, "gguf": str(gguf)}
                cgroup = None
                if impl == "llama.cpp" and not args.smoke and not args.no_confine:
                    cgroup, why_not = MemoryCgroup.create(f"semoe-bench-llama-{os.getpid()}-{B}")
                    if cgroup is None:
                        notes["llama.cpp/confined"] = why_not or ""
                        log(f"llama.cpp runs unconfined: {why_not}")
                    else:
                        spec.update(cgroup=str(cgroup.path), cgroup_extra=budget + OVERHEAD_MIB * MiB)
                r = run_worker(spec, not args.smoke, cgroup)
                batch_rows.append({"impl": impl, **r})
            bw1, xbw1 = read_bandwidth(files, True, 2), expert_read_bandwidth(files, expert_ranges, IO_THREADS)
            # the bound's rate: the best this disk showed in the window: the sequential and the single-expert reads'
            # means, and what the whole-layer ring itself got (storage bytes over its wall time, compute included)
            seq, xbw = (bw0 + bw1) / 2, (xbw0 + xbw1) / 2
            layer_eff = max((r["io_bytes_per_token"] * B * args.new / r["wall_s"] for r in batch_rows
                             if r["impl"] == "semoe-layer"), default=0.0)
            bw = max(seq, xbw, layer_eff)
            for r in batch_rows:
                impl = r["impl"]
                c = r.get("cache_fraction", 0.0) if impl.startswith(("semoe-routed", "semoe-auto")) else 0.0
                whole = impl in ("semoe-layer", "accelerate")
                Ts = [B * args.prompt_len] + [B] * (args.new - 1)
                per_pass = [pass_bytes(T, dense, experts, E, k, c, whole) for T in Ts]
                bound_s = sum(max(b / bw, compute_pass) for b in per_pass)
                # the same bytes, the experts' at the single-expert read rate (what a routed read got in the window)
                per_pass_x = [(dense / bw + (b - dense) / xbw) if not whole else b / bw
                              for b in per_pass]
                bound_x_s = sum(max(t, compute_pass) for t in per_pass_x)
                new = B * args.new
                tps = new / r["wall_s"]
                row = {"impl": impl, "model": name, "batch": B, "cache": "cold", "tokens_per_s": tps,
                       "bound_tokens_per_s": new / bound_s, "x_of_bound": new / bound_s / tps,
                       "bound_expert_rate_tokens_per_s": new / bound_x_s,
                       "x_of_bound_expert_rate": new / bound_x_s / tps,
                       "bytes_read_per_token": r["io_bytes_per_token"], "peak_rss_mb": r["peak_rss_mb"],
                       "base_rss_mb": r["base_rss_mb"], "peak_anon_mb": r["peak_anon_mb"],
                       "peak_file_mb": r["peak_file_mb"], "budget_mb": budget / MiB, "model_mb": weights / MiB,
                       "experts": E, "top_k": k, "f_B": 1 - (1 - k / E) ** B, "read_gb_per_s": bw / 1e9,
                       "layer_ring_read_gb_per_s": layer_eff / 1e9,
                       "read_gb_per_s_before": bw0 / 1e9, "read_gb_per_s_after": bw1 / 1e9,
                       "expert_read_gb_per_s_before": xbw0 / 1e9, "expert_read_gb_per_s_after": xbw1 / 1e9,
                       "effective_read_gb_per_s": r["io_bytes_per_token"] * new / r["wall_s"] / 1e9,
                       "resident_compute_s_per_pass": compute_pass, "wall_s": r["wall_s"], "new_tokens": new,
                       "tokens_out": r["tokens_out"]}
                if impl == "llama.cpp":
                    row["confined"] = "cgroup_limit_mb" in r
                for key in ("semoe_bytes_per_token", "cache_hit_rate", "prefetch_hit_rate", "prediction_hit_rate_d1",
                            "prediction_hit_rate_d2", "routed_layer_loads", "experts_prefetched",
                            "prefetch_wasted", "predictions_skipped",
                            "full_layer_loads", "cache_mb", "cache_fraction", "load_s", "wait_s", "compute_s",
                            "cold_load_s", "tokens_per_s_incl_load", "cgroup_base_mb", "cgroup_limit_mb",
                            "cgroup_peak_mb", "cgroup_failcnt", "times"):
                    if key in r:
                        row[key] = r[key]
                rows.append(row)
                emit_json({k2: v for k2, v in row.items() if k2 != "tokens_out"})
                log(f"{name} B={B:2d} {impl:12s} {tps:8.2f} tok/s  bound {row['bound_tokens_per_s']:8.2f} "
                    f"(expert rate {row['bound_expert_rate_tokens_per_s']:8.2f})  "
                    f"{row['bytes_read_per_token'] / MiB:7.2f} MiB/token  peak RSS {row['peak_rss_mb']:.0f} MiB")
            log(f"{name} B={B}: read {bw0 / 1e9:.2f} / {bw1 / 1e9:.2f} GB/s before / after the rows, single experts "
                f"{xbw0 / 1e9:.2f} / {xbw1 / 1e9:.2f} GB/s, the whole-layer ring {layer_eff / 1e9:.2f} GB/s: bound at "
                f"{bw / 1e9:.2f} GB/s")

    def tps(impl: str, model: str, B: int) -> float | None:
        return next((r["tokens_per_s"] for r in rows if (r["impl"], r["model"], r["batch"]) == (impl, model, B)), None)

    models = sorted({r["model"] for r in rows})
    targets: dict[str, Any] = {}
    for m in models:
        layer1, routed1 = tps("semoe-layer", m, 1), tps("semoe-routed", m, 1)
        r0 = next(r for r in rows if r["model"] == m)
        f1 = r0["top_k"] / r0["experts"]  # f(1)
        if layer1 and routed1:
            targets[f"{m}/B1_routed_over_layer"] = {"ratio": routed1 / layer1, "target": 0.7 / f1,
                                                    "met": routed1 / layer1 >= 0.7 / f1}
        for B in (1, 16):
            best = max((tps(i, m, B) or 0) for i in ("semoe-routed", "semoe-auto", "semoe-layer"))
            ll = tps("llama.cpp", m, B)
            if ll and best:
                confined = next(r["confined"] for r in rows
                                if (r["impl"], r["model"], r["batch"]) == ("llama.cpp", m, B))
                targets[f"{m}/B{B}_semoe_over_llama.cpp"] = {"ratio": best / ll, "target": 1.3, "met": best / ll >= 1.3,
                                                             "llama_cpp_confined": confined}
    semoe_rows = [r for r in rows if r["impl"].startswith("semoe")]
    targets["semoe_within_1.3x_of_bound"] = all(r["x_of_bound"] <= 1.3 for r in semoe_rows)
    targets["semoe_peak_rss_le_base_budget_overhead"] = all(
        r["peak_rss_mb"] <= r["base_rss_mb"] + r["budget_mb"] + OVERHEAD_MIB for r in semoe_rows)
    agree = {}
    for m in models:
        for B in batches:
            outs = {r["impl"]: r["tokens_out"] for r in rows if r["model"] == m and r["batch"] == B}
            ref = outs.get("semoe-layer")
            agree[f"{m}/B{B}"] = {i: o == ref for i, o in outs.items()} if ref is not None else None
    emit_json({"summary": True, "smoke": args.smoke, "targets": targets, "greedy_tokens_equal_semoe_layer": agree,
               "notes": notes, "reps": reps, "threads": args.threads, "prompt_len": args.prompt_len,
               "new_tokens": args.new, "budget_frac": args.budget_frac, "prefetch_width": args.prefetch_width,
               "dtype": args.dtype})
    return 0


if __name__ == "__main__":
    sys.exit(main())
