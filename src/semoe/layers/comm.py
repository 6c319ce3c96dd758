"""The single-process stand-in for an expert-parallel group, and what the layer hands its comm.

``MoELayer`` talks to its group only through these methods; ``semoe.parallel.expert_parallel``
swaps in torch.distributed implementations with the same interface (flat, hierarchical, chunked)
without touching the layer's math.

Legend: T local tokens, D hidden, N dispatched rows of this rank, M rows this rank receives,
R ranks of the group, E experts (global), L local experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from semoe.ops import permute

# ``expert_fn(x_MD, counts_SL, rows_M) -> y_MD``: rows received from the group, source-major (all rows of
# rank 0, then rank 1, ...; by local expert inside a source), ``counts_SL[s, l]`` of them from source s
# for local expert l; ``rows_M`` are their positions in the whole (unchunked) receive buffer, or None
# when the call covers all of it. Returns one output row per input row, in the same order.
ExpertFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Route:
    """Where this rank's dispatched rows go. ``counts_CREK`` is the same on every rank of the group.

    token_N:    token index (into this rank's ``x_TD``) of each dispatched row; rows sorted by
                (expert, choice, token), so the rows for rank d form one block, ranks in order.
    counts_CREK: [C, R, E, K] int64 on the CPU: rows rank s sends to global expert e as choice k, from
                its chunk c of tokens (chunk c = local tokens ``[c*T//C, (c+1)*T//C)``; C = the comm's
                ``chunks``), after dropping.
    rank:       this rank's index in the group.
    """

    token_N: torch.Tensor
    counts_CREK: torch.Tensor
    rank: int

    @property
    def num_chunks(self) -> int:
        return self.counts_CREK.shape[0]

    @property
    def num_ranks(self) -> int:
        return self.counts_CREK.shape[1]

    @property
    def num_local_experts(self) -> int:
        return self.counts_CREK.shape[2] // self.num_ranks

    @property
    def counts_RE(self) -> torch.Tensor:
        """[R, E]: rows rank s sends to expert e, all chunks."""
        return self.counts_CREK.sum((0, 3))

    @property
    def counts_SL(self) -> torch.Tensor:
        """[R, L]: rows this rank receives per (source rank, local expert)."""
        L = self.num_local_experts
        return self.counts_RE[:, self.rank * L:(self.rank + 1) * L]

    @property
    def send_splits(self) -> list[int]:
        return self.counts_RE[self.rank].view(self.num_ranks, -1).sum(-1).tolist()

    @property
    def recv_splits(self) -> list[int]:
        return self.counts_SL.sum(-1).tolist()


class LocalComm:
    """ep_size 1: every collective is the identity."""

    ep_size: int = 1
    ep_rank: int = 0
    chunks: int = 1  # the layer counts its tokens per chunk (token ranges) of the comm's dispatch

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

    def exchange_rows(self, t_N: torch.Tensor, route: Route) -> torch.Tensor:
        """Per-row data (e.g. router scores) to the experts' owners along ``route``; no autograd.
        Returns the owner's rows source-major, like the rows ``expert_fn`` gets."""
        return t_N.detach()

    def run_experts(self, x_TD: torch.Tensor, route: Route, expert_fn: ExpertFn,
                    params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
        """Dispatch ``x_TD[route.token_N]`` to the experts' owners, apply ``expert_fn`` there and bring the
        results back: ``y_ND``, one row per dispatched row, differentiable in ``x_TD`` and in ``params``
        (every parameter ``expert_fn`` uses; implementations that run it inside their own autograd
        function differentiate exactly these)."""
        return expert_fn(permute(x_TD, route.token_N), route.counts_SL, None)
