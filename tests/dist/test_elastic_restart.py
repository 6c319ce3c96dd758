"""Surviving lost ranks, with real processes and real signals: ``semoe train --recipe multitask --nproc 2
--max-restarts 1`` under torchrun, one worker SIGKILLed mid-run, restarts by itself and ends with the same
losses as an uninterrupted run; a kill during a checkpoint write leaves the previous checkpoint and
``latest`` intact; a run saved on 4 ranks resumes on 3 and 2 (re-planned), experts bit-exact by global id,
losses equal to the uninterrupted 4-rank run (float64)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from semoe.config import replace
from semoe.training.elastic_trainer import ElasticTrainer, read_losses
from semoe.storage import checkpoint as ckpt
from tests.dist.launcher import run_ranks
from tests.dist.test_elastic import small_run

SMALL = ["--set", "model.d_model=16", "--set", "model.token_moe.d_model=16",
         "--set", "elastic.tasks=synth2=8,digits=4,cancer=2,wine=2", "--set", "train.eval_every=100",
         "--set", "train.dtype=float64"]


def _semoe(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "semoe", "train", "--recipe", "multitask", *args], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """torchrun's workers under ``proc``, by RANK: the agent's direct children (a worker's own children, should
    it have any, inherit its RANK and must not stand in for it)."""
    out = {}
    for agent in psutil.Process(proc.pid).children():
        for p in agent.children():
            try:
                env = p.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
                out[int(env["RANK"])] = p
    return out


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text()[-n:] if log.exists() else f"(no {log})"


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Poll ``cond`` until ``timeout``; fail at once, with the log, if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}" + (f":\n{_tail(log)}" if log else ""))
        time.sleep(0.05)


def _steps_logged(out: Path) -> int:
    f = out / "losses.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


# not `numerics`: the restarted run and the reference run the same ops in the same layout, so their losses are
# equal bit for bit on any CPU's kernels; a second run under other kernels would only double a slow test
@pytest.mark.slow
def test_kill_one_rank_restarts_and_matches_uninterrupted(tmp_path) -> None:
    steps, every = 80, 5
    common = ["--nproc", "2", "--steps", str(steps), "--set", f"train.ckpt_every={every}", *SMALL]
    log = tmp_path / "run.log"
    run = _semoe([*common, "--max-restarts", "1", "--out", str(tmp_path / "run")], log)
    try:
        _wait_for(lambda: _steps_logged(tmp_path / "run") >= 12, 240, "step 12 of the run", run, log)
        latest_before = ckpt.find_latest(tmp_path / "run" / "checkpoints")
        workers = _workers(run)
        assert sorted(workers) == [0, 1], f"torchrun's workers: {workers}"
        t_kill = time.monotonic()
        os.kill(workers[1].pid, signal.SIGKILL)
        assert _steps_logged(tmp_path / "run") < steps  # killed mid-run
        assert run.wait(timeout=300) == 0, _tail(log)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    restart_s = time.monotonic() - t_kill  # the rest of the run after the kill, restart included
    text = log.read_text()
    assert "resumed from" in text, _tail(log)  # torchrun restarted the workers and they resumed
    resumed_at = int(text.split("resumed from")[1].split(" at step ")[1].split()[0])
    assert latest_before is not None and resumed_at >= int(latest_before.name.split("_")[1])  # lost <= interval
    assert restart_s < 300
    ref = _semoe([*common, "--out", str(tmp_path / "ref")], tmp_path / "ref.log")
    assert ref.wait(timeout=300) == 0, _tail(tmp_path / "ref.log")
    want, got = read_losses(tmp_path / "ref"), read_losses(tmp_path / "run")
    assert sorted(got) == list(range(1, steps + 1)), (sorted(got), _tail(log))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=0, abs=1e-12)
    final = ckpt.find_latest(tmp_path / "run" / "checkpoints")
    ref_final = ckpt.find_latest(tmp_path / "ref" / "checkpoints")
    from safetensors.torch import load_file

    def tensors(p: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(p.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    a, b = tensors(final), tensors(ref_final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same final weights, bit for bit


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(tmp_path) -> None:
    """SIGKILL of the whole job while a ``.tmp-step_*`` folder exists (a write in progress): ``latest`` still
    names a complete checkpoint whose every file verifies, and a restart cleans up and continues from it."""
    out = tmp_path / "run"
    big = ["--set", "model.d_model=192", "--set", "model.token_moe.d_model=192", "--set", "model.d_ff=768",
           "--set", "model.task_expert_d_ff=768", "--set", "elastic.tasks=synth2=4,digits=2,cancer=2,wine=2",
           "--set", "train.ckpt_every=1", "--set", "train.eval_every=1000", "--set", "train.keep_last=2"]
    caught = False
    for attempt in range(5):
        proc = _semoe(["--steps", "40", "--out", str(out), *big], tmp_path / f"run{attempt}.log")
        root = out / "checkpoints"

        def writing() -> bool:
            return ckpt.find_latest(root) is not None and any(root.glob(".tmp-*"))
        try:
            _wait_for(writing, 120, "a checkpoint write after the first checkpoint", proc,
                      tmp_path / f"run{attempt}.log")
        except (TimeoutError, AssertionError):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = list(root.glob(".tmp-*"))
        latest = ckpt.find_latest(root)
        assert latest is not None and (root / "latest").read_text().strip() == latest.name
        ckpt.read_manifest(latest, verify=True)  # every file present, sizes and sha256 as recorded
        if partial and not (partial[0] / ckpt.MANIFEST).exists():
            caught = True
            break
    assert caught, "no kill landed during a write in 5 attempts"
    step = int(latest.name.split("_")[1])
    proc = _semoe(["--steps", str(step + 2), "--out", str(out), *big], tmp_path / "resume.log")
    assert proc.wait(timeout=300) == 0, _tail(tmp_path / "resume.log")
    assert f"at step {step}" in (tmp_path / "resume.log").read_text()
    assert not list(root.glob(".tmp-*"))
    assert ckpt.find_latest(root).name == f"step_{step + 2:08d}"


def _part(rank: int, world: int, run, out: str, steps: int, save: bool):
    t = ElasticTrainer(run, Path(out), resume="auto")
    start = t.start_step
    dense, expert = ckpt.model_tensors(t.model)
    snapshot = {k: v.clone() for k, v in {**dense, **expert}.items()}  # model_tensors aliases the parameters
    losses = [t.train_step(s)["loss"] for s in range(start, start + steps)]
    if save:
        t.save(start + steps, wait=True)
    return {"losses": losses, "start": start, "tensors": snapshot, "plan": t.plan.to_json()}


@pytest.mark.numerics
@pytest.mark.parametrize("second", [3, 2])
def test_resume_on_fewer_ranks_replans(tmp_path, second: int) -> None:
    run = small_run()
    rc = run.model.token_moe.router
    run = replace(run, model=replace(run.model, token_moe=replace(
        run.model.token_moe, router=replace(rc, aux_loss_coef=0.0, z_loss_coef=0.0))))  # per ep group otherwise
    ref = run_ranks(_part, 4, tmp_path, run, str(tmp_path / "ref"), 8, False)[0]["losses"]
    out = str(tmp_path / "run")
    first = run_ranks(_part, 4, tmp_path, run, out, 4, True)
    assert first[0]["losses"] == pytest.approx(ref[:4], rel=0, abs=1e-12)
    saved = ckpt.find_latest(Path(out) / "checkpoints")
    from safetensors.torch import load_file

    stored = {k: v for f in sorted(saved.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    after = run_ranks(_part, second, tmp_path, run, out, 4, False)
    assert after[0]["start"] == 4 and after[0]["plan"]["world"] == second
    assert after[0]["plan"]["ranks"] != first[0]["plan"]["ranks"]  # re-planned
    for r in after:  # every tensor a rank holds after the resume is the stored one, bit for bit, by global id
        for k, v in r["tensors"].items():
            assert torch.equal(v, stored[k]), k
    assert after[0]["losses"] == pytest.approx(ref[4:], rel=0, abs=1e-10)
