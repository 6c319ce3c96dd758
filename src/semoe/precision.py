"""Compute precision: which dtype a run computes in, decided once and logged.

``resolve_dtype("auto", device)`` is the one function training and inference both use:

* CUDA: bfloat16 (training: autocast over float32 master weights; inference may keep a checkpoint's own
  dtype instead, ``native``).
* CPU: bfloat16 when this CPU multiplies bfloat16 matrices fast (AMX or AVX-512 BF16 through oneDNN),
  float32 elsewhere. The decision takes two steps: oneDNN must report bfloat16 support (false on AVX2-only
  CPUs, where bfloat16 matmul runs at ~1 GFLOP/s, and under ``ONEDNN_MAX_CPU_ISA=AVX2``), then a measured
  probe (a 512^3 matmul in both dtypes, ~10 ms) must show bfloat16 at least 1.5x float32: on a 2-core Xeon
  with AMX it measured 3-6x, on an AVX-512 CPU without bf16 units oneDNN emulates and gains nothing.

The probe runs once per process (cached) and its result is logged with the rates it measured.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16, "float64": torch.float64}
FAST_RATIO = 1.5  # bf16 must beat float32 by this much for "auto" to pick it on a CPU


@dataclass(frozen=True)
class MatmulProbe:
    """Measured CPU matmul rates (GFLOP/s) and what "auto" concluded from them."""

    onednn_bf16: bool  # oneDNN reports bfloat16 support on this CPU (and ISA limit)
    fp32_gflops: float
    bf16_gflops: float  # 0.0 when not measured (no oneDNN bf16 support)

    @property
    def fast_bf16(self) -> bool:
        return self.onednn_bf16 and self.bf16_gflops >= FAST_RATIO * self.fp32_gflops


def matmul_gflops(dtype: torch.dtype, n: int = 512, reps: int = 3) -> float:
    """Best-of-``reps`` rate of an ``n x n x n`` matmul in ``dtype`` on the CPU, GFLOP/s."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: packing, thread pool
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


@functools.cache
def cpu_matmul_probe() -> MatmulProbe:
    """Probe this CPU once (cached for the process)."""
    onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    fp32 = matmul_gflops(torch.float32)
    bf16 = matmul_gflops(torch.bfloat16) if onednn else 0.0
    probe = MatmulProbe(onednn, fp32, bf16)
    log.info("CPU matmul probe: float32 %.0f GFLOP/s, bfloat16 %s -> fast bfloat16: %s", fp32,
             f"{bf16:.0f} GFLOP/s" if onednn else "not supported by oneDNN on this CPU", probe.fast_bf16)
    return probe


def parse_dtype(name: str, allowed: tuple[str, ...], what: str) -> str:
    """Check a dtype name (``auto`` or one of ``allowed``); the error lists the choices."""
    if name != "auto" and name not in allowed:
        raise ValueError(f"{what}={name!r} is not supported; choose one of {['auto', *allowed]}")
    return name


def resolve_dtype(name: str, device: torch.device | str = "cpu", native: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype for ``name`` ("auto", "float32", "bfloat16", "float16", "float64") on ``device``.

    ``native``: the checkpoint's own dtype; "auto" keeps it on CUDA when it is a 16-bit float (inference),
    otherwise CUDA computes in bfloat16. On a CPU "auto" is bfloat16 when :func:`cpu_matmul_probe` finds
    it fast, else float32."""
    device = torch.device(device)
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r} is not supported; choose one of {['auto', *DTYPES]}")
        return DTYPES[name]
    if device.type == "cuda":
        return native if native in (torch.bfloat16, torch.float16) else torch.bfloat16
    choice = torch.bfloat16 if cpu_matmul_probe().fast_bf16 else torch.float32
    log.info("dtype auto on %s -> %s", device, str(choice).removeprefix("torch."))
    return choice


def check_dtype_runs(dtype: torch.dtype, device: torch.device | str) -> None:
    """Run a tiny linear layer, softmax and attention in ``dtype`` on ``device``; a ``ValueError`` naming the dtype,
    the device and the fix when this build's kernels cannot (e.g. a GPU without bfloat16)."""
    device = torch.device(device)
    try:
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise RuntimeError("torch.cuda.is_bf16_supported() is False")
        x = torch.ones(2, 1, 3, 8, dtype=dtype, device=device)
        y = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        torch.nn.functional.linear(y, torch.ones(4, 8, dtype=dtype, device=device)).softmax(-1).sum().item()
    except RuntimeError as e:
        raise ValueError(f"dtype {dtype_name(dtype)} cannot run on {device} with this torch build ({e}); choose "
                         "another --dtype (float32 runs everywhere) or another --device") from e


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (float64 stays float64): for norms, RoPE, router and loss math that
    must not run in 16 bits, without rounding a float64 reference run down to float32."""
    return x if x.dtype == torch.float64 else x.float()


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` for 16-bit compute dtypes; a no-op context for float32/float64."""
    device = torch.device(device)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matmul inputs to on ``device_type`` right now (None when it is off)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
