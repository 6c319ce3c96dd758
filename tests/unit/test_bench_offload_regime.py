"""``bench_offload_train.regime_batch``: the batch the benchmark picks by default lands at the asked multiple of
T* = b F / (6 B) (issue #11's regime) with F measured at that batch's own tokens per expert (F is measured, so
only bounds are asserted: batch 1 where the disk is fast enough, more where it is not); T* and tokens per expert
follow their definitions."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_offload_train import SCHEDULE_BYTES_PER_PARAM, regime_batch, t_star, tokens_per_expert  # noqa: E402


def test_definitions() -> None:
    assert SCHEDULE_BYTES_PER_PARAM == 40  # reads W twice + W, G, m, v (24 B/param); writes G, W, m, v (16)
    assert tokens_per_expert(48, 128, 8) == 1536  # top-2, dropless, balanced
    assert t_star(40, 1.2e12, 1e9) == pytest.approx(40 * 1.2e12 / 6e9, rel=1e-12)


@pytest.mark.parametrize("bandwidth", [1e12, 2e8])  # a disk so fast that batch 1 is in the regime; a slow one
def test_regime_batch_lands_in_the_regime(bandwidth: float) -> None:
    args = argparse.Namespace(threads=1, seq=16, experts=4, d_model=32, d_ff=64, regime=1.5)
    batch, pick = regime_batch(args, "float32", bandwidth)
    assert pick["tokens_per_expert"] == tokens_per_expert(batch, 16, 4)
    assert pick["t_star"] == pytest.approx(t_star(SCHEDULE_BYTES_PER_PARAM, pick["flops"], bandwidth), rel=1e-12)
    assert pick["tokens_per_expert"] >= 1.5 * pick["t_star"]
    if bandwidth == 1e12:  # T* ~ 40 * F / 6e12 < 1 token for any CPU's F below 1e14
        assert batch == 1
    else:  # T* = 40 F / 1.2e9 is >= 33 tokens for F >= 1 GFLOP/s: more than batch 1's 8 tokens per expert
        assert batch > 1 and pick["tokens_per_expert"] >= 8 * math.ceil(1.5 * 40 * 1e9 / 1.2e9 / 8)
