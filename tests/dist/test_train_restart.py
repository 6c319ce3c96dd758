"""``semoe train --nproc 2 --max-restarts 1`` (the language-model trainer) survives a lost rank: one torchrun
worker SIGKILLed after the step-10 checkpoint, torchrun restarts both, they resume from the newest checkpoint
in --out, and the losses equal an uninterrupted 2-rank run's bit for bit (same layout, same ops)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist.test_elastic_restart import _workers

ROOT = Path(__file__).parents[2]


def _cmd(out: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "semoe", "train", "--recipe", "tiny", "--nproc", "2", "--data", str(corpus),
            "--out", str(out), "--cache-dir", str(cache), "--sample", "", "--set", "train.dtype=float32",
            "--set", "train.steps=30", "--set", "train.ckpt_every=10", "--set", "train.eval_every=100",
            "--set", "train.keep_last=10", *extra]


def _losses(out: Path) -> dict[int, str]:
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f) if r.get("loss")}


@pytest.mark.slow
def test_lm_training_restarts_after_a_lost_rank(tmp_path, corpus_file, cache_dir) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    out, log_file = tmp_path / "run", tmp_path / "run.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(_cmd(out, corpus_file, cache_dir, "--max-restarts", "1"), stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step_00000010" / "manifest.json").exists():
            assert proc.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "no step-10 checkpoint after 300 s"
            time.sleep(0.05)
        workers = _workers(proc)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1].pid, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log_file.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_file.read_text()
    assert "resumed from" in text, text[-3000:]  # torchrun restarted the workers and they resumed
    ref = subprocess.run(_cmd(tmp_path / "ref", corpus_file, cache_dir), capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, want = _losses(out), _losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, 31)) and got == want


def test_max_restarts_bad_input(tmp_path, corpus_file, cache_dir) -> None:
    """Refused before anything is written: a negative count, and restarts that could not resume."""
    for extra, msg in ((["--max-restarts", "-1"], "--max-restarts must be >= 0"),
                       (["--max-restarts", "2", "--resume", "none"], "use --resume auto")):
        out = tmp_path / "x"
        res = subprocess.run(_cmd(out, corpus_file, cache_dir, *extra), capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
        assert res.returncode != 0 and msg in res.stderr, res.stderr[-2000:]
        assert not out.exists()


@pytest.mark.slow
def test_one_rank_under_torchrun_prints_the_paths_once(tmp_path, corpus_file, cache_dir) -> None:
    """``--nproc 1 --max-restarts 1`` runs one torchrun worker; the worker leaves the closing lines (metrics,
    plots, checkpoint) to the launching process, which prints them once, naming the run's last checkpoint."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = _cmd(tmp_path / "run", corpus_file, cache_dir, "--max-restarts", "1", "--set", "train.steps=2")
    cmd[cmd.index("--nproc") + 1] = "1"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert [ln.split()[0] for ln in lines if ln.split()[:1] in (["metrics:"], ["plots:"], ["checkpoint:"])] == \
        ["metrics:", "plots:", "checkpoint:"], res.stdout
    assert lines[-1].endswith("step_00000002"), res.stdout
