"""The single-process stand-in for an expert-parallel group.

``MoELayer`` talks to its group only through these methods; ``semoe.parallel.expert_parallel``
swaps in a torch.distributed implementation with the same interface (and later ones can add
hierarchical or chunked all-to-alls) without touching the layer.
"""

from __future__ import annotations

import torch


class LocalComm:
    """ep_size 1: every collective is the identity."""

    ep_size: int = 1
    ep_rank: int = 0

    def token_offset(self, num_tokens: int) -> tuple[int, int]:
        """(first global token index of this rank, tokens in the whole group)."""
        return 0, num_tokens

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of every rank, concatenated in rank order (no autograd)."""
        return x

    def exchange_stats(self, vec_N: torch.Tensor) -> torch.Tensor:
        """[ep_size, N]: the small float64 statistics vector of every rank (counts, loss sums)."""
        return vec_N.unsqueeze(0)

    def all_to_all(self, x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Variable-split all-to-all with autograd: rows for rank r are block r of ``x_ND``."""
        return x_ND
