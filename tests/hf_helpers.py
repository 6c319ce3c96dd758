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
