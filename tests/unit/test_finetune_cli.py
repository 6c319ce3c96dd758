"""``semoe train --init-from``: every bad input is refused with a message that names the problem and the fix
(exit 2), before anything is written; a checkpoint of another model in --out is never overwritten."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
import re
from pathlib import Path

import pytest

from semoe.cli.main import main
from tests.hf_helpers import build_tiny_hf, save_tiny_hf, write_hf_tokenizer
from tests.unit.test_finetune import write_sft

transformers = pytest.importorskip("transformers")

SETS = ["--set", "train.seq_len=32", "--set", "train.batch_size=4", "--set", "train.val_fraction=0.2",
        "--set", "train.dtype=float32", "--set", "train.eval_batches=1", "--sample", ""]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_tiny_hf(build_tiny_hf("mixtral", seed=7), tmp_path_factory.mktemp("cli") / "hf")


def train(*args: str) -> int:
    return main(["train", *args, *SETS])


def test_unsupported_architecture(tmp_path: Path, capsys) -> None:
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    write_hf_tokenizer(llama)
    assert train("--init-from", str(llama), "--out", str(tmp_path / "o")) == 2
    assert "'llama' is not supported; supported: ['mixtral', 'qwen2_moe', 'olmoe']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert train("--init-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train("--init-from", str(tmp_path), "--out", str(tmp_path / "o")) == 2  # a folder without config.json
    assert "has no config.json" in capsys.readouterr().err


def test_folder_without_tokenizer(hf_dir: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in hf_dir.iterdir():
        if not f.name.startswith("tokenizer"):
            (bare / f.name).write_bytes(f.read_bytes())
    assert train("--init-from", str(bare), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and "save_pretrained" in err and not (tmp_path / "o").exists()


def test_prompt_completion_line_missing_a_field(hf_dir: Path, tmp_path: Path, capsys) -> None:
    data = write_sft(tmp_path / "d.jsonl", n=5)
    lines = data.read_text().splitlines()
    lines.insert(3, json.dumps({"prompt": "question only"}))
    data.write_text("\n".join(lines) + "\n")
    assert train("--init-from", str(hf_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1",
                 "--cache-dir", str(tmp_path / "c")) == 2
    assert f'{data}:4: "completion" is missing' in capsys.readouterr().err


def test_out_with_a_checkpoint_of_another_model_is_refused(hf_dir: Path, tmp_path: Path, capsys) -> None:
    data = write_sft(tmp_path / "d.jsonl")
    common = ["--data", str(data), "--steps", "1", "--cache-dir", str(tmp_path / "c")]
    # (1) a fine-tune of a different checkpoint with the very same architecture and config
    other = save_tiny_hf(build_tiny_hf("mixtral", seed=8), tmp_path / "other")
    assert json.loads((other / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    out = tmp_path / "run"
    assert train("--init-from", str(other), "--out", str(out), *common) == 0
    before = tree_digest(out)
    assert train("--init-from", str(hf_dir), "--out", str(out), *common) == 2
    err = capsys.readouterr().err
    assert "cannot be resumed: it was trained from another HF checkpoint" in err and "another --out" in err
    assert tree_digest(out) == before  # nothing written
    # (2) a run of semoe's own (random init, its own tokenizer) in --out
    native = tmp_path / "native"
    assert main(["train", "--recipe", "tiny", "--set", "model.vocab_size=300", "--set", "train.seq_len=16",
                 "--set", "train.batch_size=2", "--set", "train.val_fraction=0.2", "--set", "train.eval_batches=1",
                 "--sample", "", "--data", str(data), "--steps", "1", "--out", str(native),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    before = tree_digest(native)
    assert train("--init-from", str(hf_dir), "--out", str(native), *common) == 2
    assert "cannot be resumed" in capsys.readouterr().err and tree_digest(native) == before
    # (3) and the fine-tune cannot be continued as a run of semoe's own
    assert main(["train", "--recipe", "tiny", "--out", str(out), *common, "--sample", ""]) == 2
    assert f"--init-from {other.resolve()}" in capsys.readouterr().err and tree_digest(out) != {}


def test_tokenizer_larger_than_the_vocabulary(hf_dir: Path, tmp_path: Path, capsys) -> None:
    big = tmp_path / "big"
    big.mkdir()
    for f in hf_dir.iterdir():
        (big / f.name).write_bytes(f.read_bytes())
    write_hf_tokenizer(big, vocab_size=200)
    assert train("--init-from", str(big), "--data", str(write_sft(tmp_path / "d.jsonl")), "--out", str(tmp_path / "o"),
                 "--steps", "1", "--cache-dir", str(tmp_path / "c")) == 2
    assert re.search(r"the tokenizer has 1[3-9]\d tokens but the model's vocabulary is 128", capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
