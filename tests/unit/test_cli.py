"""The `semoe` command line: help, a 2-rank smoke run then generate, and every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from semoe.cli.main import main

SMALL = ["--recipe", "tiny", "--set", "model.vocab_size=320", "--sample", ""]


def semoe(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semoe", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("cmd", [[], ["train"], ["generate"]])
def test_help(cmd: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: semoe" in capsys.readouterr().out


def test_train_two_ranks_then_generate(tmp_path, corpus_file, cache_dir) -> None:
    out = tmp_path / "run"
    r = semoe("train", *SMALL, "--nproc", "2", "--steps", "3", "--data", str(corpus_file), "--out", str(out),
              "--cache-dir", str(cache_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint:" in r.stdout and (out / "checkpoints" / "step_00000003" / "manifest.json").exists()
    assert len(list((out / "checkpoints" / "step_00000003").glob("model-experts-*.safetensors"))) == 2
    g = semoe("generate", "--checkpoint", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "5",
              "--temperature", "0")
    assert g.returncode == 0, g.stderr[-3000:]
    assert g.stdout.startswith("ROMEO:") and len(g.stdout.strip()) > len("ROMEO:")


def _err(capsys) -> str:
    return capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--set", "train.nope=1"], "unknown override key 'train.nope'"),
    (["--set", "train.lr=fast"], "train.lr must be a number"),
    (["--set", "lr"], "section.field=value"),
    (["--nproc", "3"], "does not divide num_experts=4"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_flags(tmp_path, corpus_file, cache_dir, capsys, extra: list[str], match: str) -> None:
    args = ["train", *SMALL, "--data", str(corpus_file), "--out", str(tmp_path / "o"), "--cache-dir",
            str(cache_dir), *extra]
    assert main(args) == 2
    assert match in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_missing_and_empty_data(tmp_path, cache_dir, capsys) -> None:
    base = ["train", *SMALL, "--out", str(tmp_path / "o"), "--cache-dir", str(cache_dir)]
    assert main([*base, "--data", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in _err(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert main([*base, "--data", str(empty)]) == 2
    assert "empty" in _err(capsys)


def test_checkpoint_of_other_config_is_not_overwritten(tmp_path, corpus_file, cache_dir, capsys) -> None:
    out = tmp_path / "run"
    base = ["train", "--data", str(corpus_file), "--out", str(out), "--cache-dir", str(cache_dir), "--steps", "2"]
    assert main([*base, *SMALL]) == 0
    files = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert main([*base, *SMALL, "--set", "model.n_layers=3"]) == 2
    assert "different model config" in _err(capsys)
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == files
    assert main([*base, *SMALL, "--resume", "none"]) == 2
    assert "already holds checkpoint" in _err(capsys)


def test_generate_rejects_truncated_checkpoint(tmp_path, corpus_file, cache_dir, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--data", str(corpus_file), "--out", str(out), "--cache-dir", str(cache_dir),
                 "--steps", "1"]) == 0
    f = next((out / "checkpoints").glob("step_*/model-experts-00000.safetensors"))
    f.write_bytes(f.read_bytes()[:-50])
    assert main(["generate", "--checkpoint", str(out), "--prompt", "hi"]) == 2
    assert "truncated" in _err(capsys)
    assert main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "does not exist" in _err(capsys)
    assert main(["generate", "--checkpoint", str(corpus_file.parent), "--prompt", "hi"]) == 2
    assert "nor a semoe checkpoint" in _err(capsys)


def test_corrupt_manifest(tmp_path) -> None:
    from semoe.storage.checkpoint import CheckpointError, read_manifest

    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_manifest(d)
    assert Path(d / "manifest.json").exists()
