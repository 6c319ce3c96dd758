"""Run pytest under a second set of CPU kernels: ``python -m tests.other_kernels [pytest args]``.

A tolerance that holds only with one instruction set's kernels (their sum orders and rounding) is a test
that fails on someone else's machine. This reruns the given tests with PyTorch's ATen kernels, MKL and
oneDNN limited to a lower instruction set than this CPU's best, so such a tolerance fails here:

* on a CPU with AVX-512 (e.g. Intel Xeon with AMX): AVX2 kernels, as on an AMD EPYC;
* on an AVX2 CPU: the non-vectorised ATen kernels, SSE4.2 MKL and SSE4.1 oneDNN.

These are the libraries' own switches (``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``,
``ONEDNN_MAX_CPU_ISA``); semoe's behaviour does not depend on them. ``make test`` runs the tests marked
``numerics`` (distributed and parity tests) this way after the normal run.
"""

from __future__ import annotations

import os
import sys

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
BASELINE = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def other_kernels() -> tuple[str, dict[str, str]]:
    """(this CPU's ATen capability, the environment that selects a different kernel set)."""
    import torch

    native = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return native, (AVX2 if native.startswith("AVX512") else BASELINE)


def main(argv: list[str]) -> None:
    native, env = other_kernels()
    print(f"# tests under other kernels: this CPU runs {native}; now {' '.join(f'{k}={v}' for k, v in env.items())}",
          flush=True)
    os.execvpe(sys.executable, [sys.executable, "-m", "pytest", *argv], {**os.environ, **env})


if __name__ == "__main__":
    main(sys.argv[1:])
