"""``bench_expert_offload.MemoryCgroup``: a child confined by a cgroup v1 memory limit keeps the page cache of a
memory-mapped file it reads within the limit (the kernel evicts mapped pages at the limit, as it must for a
confined llama.cpp), and the group is removed afterwards. Skipped where no writable memory cgroup exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_expert_offload import MemoryCgroup, MiB, evict_plain  # noqa: E402

CHILD = """
import json, mmap, sys
sys.path.insert(0, sys.argv[1])
from bench_expert_offload import cgroup_peaks, confine_after_imports
info = confine_after_imports(sys.argv[2], int(sys.argv[3]))
with open(sys.argv[4], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    total = sum(m[i] for i in range(0, len(m), 4096))  # fault in every page of the file
    m.close()
info.update(cgroup_peaks(sys.argv[2]), total=total)
print(json.dumps(info))
"""


def test_memory_cgroup_confines_a_mapped_file(tmp_path) -> None:
    cg, why = MemoryCgroup.create(f"semoe-test-{tmp_path.name}")
    if cg is None:
        pytest.skip(why)
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        for i in range(128):  # 128 MiB, each MiB filled with its index
            f.write(bytes([i + 1]) * MiB)
        f.flush()
        os.fsync(f.fileno())
    evict_plain([path])  # cached pages stay charged to the group that read (here: wrote) them first
    extra = 32 * MiB
    try:
        assert cg.path.is_dir()
        proc = subprocess.run(cg.command([sys.executable, "-c", CHILD, str(ROOT / "benchmarks"), str(cg.path),
                                          str(extra), str(path)]), capture_output=True, text=True, timeout=300)
    finally:
        cg.remove()
    assert not cg.path.exists()  # moved out and removed
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["total"] == sum(range(1, 129)) * (MiB // 4096)  # every page was read
    assert info["cgroup_limit_mb"] == pytest.approx(info["cgroup_base_mb"] + 32, abs=0.01)
    assert info["cgroup_peak_mb"] <= info["cgroup_limit_mb"] + 0.01  # 128 MiB mapped, never more than the limit
    assert info["cgroup_failcnt"] > 0, info  # the limit was reached: mapped pages were evicted


def test_memory_cgroup_reports_why_not(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(MemoryCgroup, "ROOT", tmp_path / "no-such-controller")
    cg, why = MemoryCgroup.create("x")
    assert cg is None and "no cgroup v1 memory controller" in why
