"""Shared fixtures: a small synthetic text corpus (no download) and offline HF settings."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the king and queen of our land shall speak to thee my lord good night sweet prince what news "
         "from rome to be or not is question noble friends come hither").split()


def write_corpus(path: Path, n_lines: int = 3000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        speaker = rng.choice(["ROMEO", "JULIET", "HAMLET", "KING"])
        lines.append(f"{speaker}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + f". {i % 7}")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "plays.txt")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
