"""Helpers shared by the tests that build tiny random HF MoE models."""

from __future__ import annotations

import torch


def randomize_hf(hf: torch.nn.Module) -> torch.nn.Module:
    """Break HF's symmetric init (norms at one, some routers at zero) and return the model in eval mode."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "gate" in name and "proj" not in name:
                p.normal_(std=0.3)
    return hf.eval()


# Greedy tokens of two float32 implementations agree only where the reference's top-2 logit margin exceeds
# their difference (<= 1.5e-7 observed on these tiny models, on AVX-512, AVX2 and no-SIMD kernels): each greedy
# reference step must clear this margin, or the prompt is a near-tie and the test is ill-posed.
GREEDY_MARGIN = 1e-5  # ~70x the largest difference seen between the float32 implementations


def assert_clear_margins(logits_nV: torch.Tensor, margin: float = GREEDY_MARGIN) -> None:
    """Every step's top-1 logit leads the runner-up by more than ``margin``."""
    top2 = logits_nV.float().topk(2, dim=-1).values
    gaps = top2[..., 0] - top2[..., 1]
    assert bool((gaps > margin).all()), (f"greedy reference has a near-tie (top-2 margins {gaps.tolist()}, need > "
                                         f"{margin}): tokens would depend on the CPU's rounding; use other prompts")
