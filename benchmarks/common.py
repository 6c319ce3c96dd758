"""Small helpers shared by the benchmark scripts: timing, medians, JSON lines, memory, matmul rate.

Conventions (DESIGN.md §4): human-readable text goes to stderr, results go to stdout as one JSON
object per line, so ``python benchmarks/x.py > results.jsonl`` keeps only the results.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU for the record, e.g. "AMD EPYC (family 25 model 17; avx512_bf16)": /proc/cpuinfo's model name
    (which on some VMs is only the vendor's line) with the family/model numbers and the matmul-relevant flags
    (amx_bf16 / avx512_bf16 / avx512f / avx2: the best one present)."""
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo").read().split("\n\n", 1)[0].splitlines():
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
    except OSError:
        return platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    isa = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags), "no avx2")
    name = fields.get("model name", platform.processor() or "unknown")
    return f"{name} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}; {isa})"


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def median(xs: Sequence[float]) -> float:
    """Median (``nan`` for an empty sequence)."""
    return statistics.median(xs) if xs else math.nan


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` takes (wall clock)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def log(*parts: object, enabled: bool = True) -> None:
    """Human-readable text: stderr, flushed (pass ``enabled=rank == 0`` under torchrun)."""
    if enabled:
        print(*parts, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout inside the block (Python prints and file descriptor 1, e.g. a
    compiler a library spawns) to stderr, so that stdout keeps only JSON lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def emit_json(record: dict[str, Any], enabled: bool = True) -> None:
    """One result as one JSON line on stdout (floats rounded to 4 significant decimals)."""
    if enabled:
        print(json.dumps(_round(record)), flush=True)


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return v if not math.isfinite(v) else float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_round(x) for x in v]
    return v


# ------------------------------------------------------------------------------------------ memory
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh pages the kernel had to map and zero)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def current_rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def release_free_memory() -> None:
    """Ask glibc to hand cached free heap memory back to the OS (no-op elsewhere), so that an RSS
    delta measured next reflects new allocations, not what earlier code left in malloc's free lists."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def keep_big_blocks_in_heap(threshold: int = 1 << 30) -> bool:
    """glibc only: serve allocations up to ``threshold`` bytes from the heap and never trim it, instead of
    giving every block above the (at most 32 MiB) mmap threshold fresh, zero-filled pages from the kernel.
    Affects the whole process from now on; returns whether glibc accepted it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


class RssPeakSampler:
    """Peak RSS above the starting RSS while the ``with`` block runs, sampled by a thread every
    ``interval_s`` (torch kernels release the GIL, so the sampler sees their allocations)."""

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssPeakSampler:
        release_free_memory()
        self.start_mb = self.peak_mb = current_rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Sequence[torch.Tensor] = ()) -> Iterator[list[int]]:
    """Bytes of the distinct storages autograd saves for backward inside the block (activation
    memory), leaving out the storages of ``exclude`` (parameters, the input). Yields a one-element
    list that holds the total when the block ends."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.data_ptr() != 0:
            seen[s.data_ptr()] = s.nbytes()
        return t

    total = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total[0] = sum(seen.values())


# ------------------------------------------------------------------------------------------ compute
def linear_gemm_shapes(rows: int, d_in: int, d_out: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the three GEMMs of a linear layer's forward and backward:
    y = x @ w, dx = dy @ w.T, dw = x.T @ dy; each costs 2 * rows * d_in * d_out FLOPs."""
    return [(rows, d_in, d_out), (rows, d_out, d_in), (d_in, rows, d_out)]


class MatmulProbe:
    """Measures this process's float32 ``torch.mm`` rate on a fixed list of (m, k, n) shapes, at the
    current thread count. ``run()`` times one pass over all shapes and returns seconds; the rate is
    ``flops / seconds``. Buffers are allocated once (no allocator noise in the timing)."""

    def __init__(self, shapes: Sequence[tuple[int, int, int]], dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ops = [(torch.randn(m, k, generator=g, dtype=dtype), torch.randn(k, n, generator=g, dtype=dtype),
                     torch.empty(m, n, dtype=dtype)) for m, k, n in shapes]
        self.flops = float(sum(2 * m * k * n for m, k, n in shapes))

    def run(self) -> float:
        t0 = time.perf_counter()
        for a, b, out in self.ops:
            torch.mm(a, b, out=out)
        return time.perf_counter() - t0

    def rate(self, reps: int = 3, warmup: int = 1) -> float:
        """FLOP/s from the median of ``reps`` passes."""
        for _ in range(warmup):
            self.run()
        return self.flops / median([self.run() for _ in range(reps)])


# ------------------------------------------------------------------------------------------ launching workers
RESULT_PREFIX = "RESULT "


def emit_result(record: dict[str, Any]) -> None:
    """A worker's result: one ``RESULT {json}`` line on stdout, read back by ``read_results``."""
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def read_results(stdout: str) -> list[dict[str, Any]]:
    """Every ``RESULT {json}`` record in a worker's stdout, in order (other lines are ignored)."""
    return [json.loads(ln[len(RESULT_PREFIX):]) for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]


def forward_args(args: Any, keys: Sequence[str]) -> list[str]:
    """``--key=value`` flags (underscores as dashes) that hand ``args``'s ``keys`` to a worker process."""
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys]


def random_mixtral_checkpoint(workdir: Any, prefix: str, cfg: dict[str, Any],
                              finish: Callable[[Any], None] | None = None) -> Any:
    """An HF Mixtral folder with random weights for ``cfg`` (transformers' ``MixtralConfig`` fields), made once
    under ``workdir`` as ``{prefix}-{hash of cfg}`` and reused; the routers are spread wide (std 0.3) so tokens go
    to many experts. ``finish(folder)`` adds files (e.g. a tokenizer) before the folder is moved into place."""
    import hashlib
    import shutil
    from pathlib import Path

    workdir = Path(workdir)
    path = workdir / f"{prefix}-{hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]}"
    if (path / "config.json").is_file():
        return path
    import transformers

    log(f"making the benchmark checkpoint {path} ...")
    torch.manual_seed(0)
    with stdout_to_stderr():
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "gate" in name and "proj" not in name:
                    p.normal_(std=0.3)  # routers: spread tokens over experts
        tmp = workdir / f".tmp-{path.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
    if finish is not None:
        finish(tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ DeepSpeed peers
def deepspeed_init_single_process() -> None:
    """``torch.distributed`` (gloo) for DeepSpeed in this one process, on a free local port (the env vars
    torchrun would set: rank 0 of 1). Idempotent."""
    import socket

    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="gloo")


def deepspeed_hf_moe_engine(model: torch.nn.Module, batch: int, zero: dict[str, Any],
                            optimizer: Any = None, config: dict[str, Any] | None = None) -> Any:
    """``deepspeed.initialize`` of an HF MoE causal LM in one process, the setup HF fine-tuning recipes use:
    at ZeRO stage 3 every ``*SparseMoeBlock`` class of ``model`` is made a leaf module
    (``deepspeed.utils.set_z3_leaf_modules``: the whole block's parameters are gathered at once, whatever the
    router picks). ``zero``: the ``zero_optimization`` section; ``optimizer``: a torch optimizer, or None to
    take ``config["optimizer"]`` (DeepSpeed's own, e.g. its CPU Adam under ``offload_optimizer``)."""
    import logging

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.ERROR)
    deepspeed_init_single_process()
    if zero.get("stage") == 3:
        leaves = sorted({type(m) for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")},
                        key=lambda c: c.__name__)
        if not leaves:
            raise ValueError(f"{type(model).__name__} has no *SparseMoeBlock module to make a ZeRO-3 leaf")
        deepspeed.utils.set_z3_leaf_modules(model, leaves)
    cfg = {"train_micro_batch_size_per_gpu": batch, "steps_per_print": 10**9, **(config or {}),
           "zero_optimization": zero}
    kwargs = {"optimizer": optimizer} if optimizer is not None else {"model_parameters": model.parameters()}
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, **kwargs)
    return engine


def process_io_bytes() -> tuple[int, int]:
    """(read_bytes, write_bytes) this process caused at the block layer so far (``/proc/self/io``; reads served
    from the page cache do not count, O_DIRECT reads do); (0, 0) where unavailable."""
    try:
        fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
        return int(fields["read_bytes"]), int(fields["write_bytes"])
    except (OSError, KeyError, ValueError):
        return 0, 0
