"""The MoE layer: route -> exchange counts -> drop over capacity -> permute -> all-to-all ->
experts -> all-to-all back -> weighted un-permute (+ shared experts).

Legend: T local tokens, D d_model, E experts (global), L local experts, K choices per token,
R ranks of the expert-parallel group, A local assignments, N dispatched rows, M received rows,
C chunks of the comm's dispatch (ranges of local tokens; 1 unless the comm overlaps).

The same code runs with one process (``LocalComm``) and with expert parallelism (a torch.distributed
comm swapped in by ``semoe.parallel.expert_parallel.apply_expert_parallel``); capacity is defined
over the whole expert-parallel batch, so results do not depend on the number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from semoe.config import MoEConfig
from semoe.layers.comm import LocalComm, Route
from semoe.layers.experts import Experts, SharedExpert
from semoe.layers.losses import load_balancing_loss, router_z_loss
from semoe.layers.router import Routing, build_router
from semoe.ops import pad_rows, permute, unpermute


@dataclass
class MoEStats:
    """Per-call statistics of the whole expert-parallel batch (detached, for logs and plots)."""

    tokens: int  # tokens in the expert-parallel batch
    assignments: int  # routed (token, expert) pairs before dropping
    dropped: int  # assignments dropped by capacity
    routed_per_expert: torch.Tensor  # [E] int64, before dropping
    tokens_per_expert: torch.Tensor  # [E] int64, after dropping
    capacity: int | None

    @property
    def drop_rate(self) -> float:
        return self.dropped / max(self.assignments, 1)


@dataclass
class BalanceSums:
    """What a model-level load-balancing loss needs from one layer (``router.aux_loss_scope="model"``):
    this rank's router-probability sums (differentiable), the expert-parallel group's (values), the group's
    routed assignments per expert and its token count."""

    prob_sum_E: torch.Tensor
    group_prob_sum_E: torch.Tensor
    routed_E: torch.Tensor
    tokens: int
    ep_size: int


@dataclass
class MoEOutput:
    out: torch.Tensor  # same shape as the input
    aux_loss: torch.Tensor  # unweighted load-balancing loss (value: the whole group's)
    z_loss: torch.Tensor  # unweighted router z-loss
    router_loss: torch.Tensor  # aux_loss_coef * aux_loss + z_loss_coef * z_loss, add it to the loss
    stats: MoEStats
    # the sums of the model-level loss when router.aux_loss_scope == "model" (then router_loss leaves the
    # aux term to the model); None otherwise or when the losses are switched off
    balance: BalanceSums | None = None


def capacity_for(capacity_factor: float, num_assignments: int, num_experts: int, min_capacity: int) -> int:
    """Slots per expert for the whole expert-parallel batch: ceil(cf * assignments / E), >= min."""
    return max(min_capacity, math.ceil(capacity_factor * num_assignments / num_experts))


def position_keep(counts_REK: torch.Tensor, capacity: int) -> torch.Tensor:
    """Kept assignments per (rank, expert, choice) under "position" priority: first choices before
    second choices, then ranks in order, then tokens in order. [R, E, K] int64."""
    R, E, K = counts_REK.shape
    by_choice = counts_REK.permute(2, 0, 1).reshape(K * R, E)  # priority order: (k, r)
    before = torch.cumsum(by_choice, 0) - by_choice
    keep = (capacity - before).clamp(min=0).minimum(by_choice)
    return keep.reshape(K, R, E).permute(1, 2, 0)


def _split_kept(counts_REKC: torch.Tensor, kept_REK: torch.Tensor) -> torch.Tensor:
    """Kept rows per chunk: a (rank, expert, choice) block keeps its first tokens, chunks are token ranges."""
    before = torch.cumsum(counts_REKC, -1) - counts_REKC
    return (kept_REK.unsqueeze(-1) - before).clamp(min=0).minimum(counts_REKC)


def regroup_index(counts_SL: torch.Tensor) -> torch.Tensor:
    """Row order that turns blocks laid out source-major [(s, l)] into expert-major [(l, s)]."""
    sizes_sm = counts_SL.reshape(-1)
    starts_sm = torch.cumsum(sizes_sm, 0) - sizes_sm
    sizes_em = counts_SL.t().reshape(-1)
    starts_em = starts_sm.view_as(counts_SL).t().reshape(-1)
    dst_start = torch.cumsum(sizes_em, 0) - sizes_em
    n = int(sizes_em.sum())
    return torch.repeat_interleave(starts_em - dst_start, sizes_em, output_size=n) + torch.arange(
        n, device=counts_SL.device)


class MoELayer(nn.Module):
    """Sparsely-gated MoE feed-forward layer. ``forward(x[..., D]) -> MoEOutput``."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg.router, cfg.d_model, cfg.num_experts)
        self.router.reset_parameters(cfg.init_std)
        self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.activation, cfg.expert_impl, cfg.init_std)
        self.shared = (SharedExpert(cfg.d_model, cfg.shared_hidden, cfg.activation, cfg.shared_expert_gate,
                                    cfg.init_std) if cfg.num_shared_experts > 0 else None)
        self.comm: LocalComm = LocalComm()

    @property
    def compute_losses(self) -> bool:
        """Whether forward computes the router losses (default True). Inference engines switch it off:
        ``aux_loss``, ``z_loss`` and ``router_loss`` are then zeros, not the losses."""
        return self.router.compute_losses

    @compute_losses.setter
    def compute_losses(self, value: bool) -> None:
        self.router.compute_losses = bool(value)

    def _check_input(self, x: torch.Tensor) -> None:
        if not torch.is_floating_point(x):
            raise ValueError(f"MoELayer input must be a floating-point tensor, got {x.dtype}; "
                             "embed token ids first or cast with .float()")
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"MoELayer input has hidden size {x.shape[-1]}, expected d_model={self.cfg.d_model}")

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> MoEOutput:
        """``routing``: this layer's router output for ``x`` computed by the caller (``self.router(x.reshape(-1, D),
        self.comm)``, e.g. by an inference engine that needed the expert ids first); None: computed here."""
        self._check_input(x)
        cfg, comm = self.cfg, self.comm
        E, R, r = cfg.num_experts, comm.ep_size, comm.ep_rank
        x_TD = x.reshape(-1, cfg.d_model)
        T = x_TD.shape[0]

        if routing is None:
            routing = self.router(x_TD, comm)
        K = routing.num_choices

        # one small collective: routed counts (per chunk of the comm's dispatch: a chunk is a range of
        # tokens) and loss sums of every rank
        C = comm.chunks
        key_A = routing.expert_A * K + routing.choice_A
        counts_EKC = torch.bincount(key_A * C + routing.token_A * C // max(T, 1), minlength=E * K * C)
        stats_local = torch.cat([
            counts_EKC.to(torch.float64),
            routing.prob_sum_E.detach().to(torch.float64),
            routing.lse_sq_sum.detach().to(torch.float64).reshape(1),
            torch.tensor([float(T)], dtype=torch.float64, device=x.device),
        ])
        stats_RN = comm.exchange_stats(stats_local)
        n_counts = E * K * C
        counts_REKC = stats_RN[:, :n_counts].round().long().view(R, E, K, C)
        counts_REK = counts_REKC.sum(-1)
        group_tokens = int(stats_RN[:, -1].sum().item())
        routed_E = counts_REK.sum((0, 2))
        num_assign = int(routed_E.sum().item())

        total = max(group_tokens, 1)
        balance = None
        if not self.compute_losses:
            aux = z = routing.prob_sum_E.new_zeros(())
        else:
            if cfg.router.kind == "topk":
                frac_E = routed_E.to(torch.float64) / max(num_assign, 1)
                group_prob_E = stats_RN[:, n_counts:n_counts + E].sum(0)
                aux = load_balancing_loss(routing.prob_sum_E, group_prob_E, frac_E, total, R)
                if cfg.router.aux_loss_scope == "model":
                    balance = BalanceSums(routing.prob_sum_E, group_prob_E, routed_E, group_tokens, R)
            else:  # expert choice is balanced by construction
                aux = routing.prob_sum_E.sum() * 0.0
            z = router_z_loss(routing.lse_sq_sum, stats_RN[:, n_counts + E].sum(), total, R)
        self.router.update_bias(routed_E)

        # capacity
        cf = cfg.router.capacity_factor if self.training else cfg.router.eval_capacity_factor
        capacity = None
        if cfg.router.kind == "topk" and cf is not None:
            capacity = capacity_for(cf, K * group_tokens, E, cfg.router.min_capacity)
        drop_at_sender = capacity is not None and cfg.router.drop_policy == "position"
        kept_REK = position_keep(counts_REK, capacity) if drop_at_sender else counts_REK

        # sort this rank's assignments by (expert, choice, token): stable, so rank-count independent
        order_A = torch.argsort(key_A, stable=True)
        if drop_at_sender:
            counts_flat = counts_REK[r].reshape(-1).to(x.device)
            keep_flat = kept_REK[r].reshape(-1).to(x.device)
            key_sorted = key_A[order_A]
            starts = torch.cumsum(counts_flat, 0) - counts_flat
            pos = torch.arange(order_A.numel(), device=x.device) - starts[key_sorted]
            order_A = order_A[pos < keep_flat[key_sorted]]
        token_N = routing.token_A[order_A]
        weight_N = routing.weight_A[order_A]

        # to the experts' owners and back (the comm may chunk, overlap and route hierarchically)
        kept_RE = kept_REK.sum(-1)
        kept_REKC = _split_kept(counts_REKC, kept_REK) if drop_at_sender else counts_REKC
        route = Route(token_N, kept_REKC.permute(3, 0, 1, 2).cpu(), r)
        keep_sm = None
        if capacity is not None and not drop_at_sender:  # score priority: the owner keeps the best C
            score_sm = comm.exchange_rows(routing.score_A[order_A].unsqueeze(1), route).squeeze(1)
            keep_sm = _score_keep_mask(score_sm, route.counts_SL, capacity)
            kept_E = counts_REK.sum((0, 2)).clamp(max=capacity)
        else:
            kept_E = kept_RE.sum(0)
        expert_fn = partial(self._experts_on_rows, capacity=capacity, keep_sm=keep_sm)
        y_ND = comm.run_experts(x_TD, route, expert_fn, list(self.experts.parameters()))
        out_TD = unpermute(y_ND, token_N, weight_N, T).to(x.dtype)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)

        stats = MoEStats(tokens=group_tokens, assignments=num_assign, dropped=num_assign - int(kept_E.sum()),
                         routed_per_expert=routed_E.cpu(), tokens_per_expert=kept_E.cpu(), capacity=capacity)
        rc = cfg.router
        aux_coef = rc.aux_loss_coef if rc.aux_loss_scope == "layer" else 0.0  # "model": the model adds it
        return MoEOutput(out=out_TD.view(x.shape), aux_loss=aux, z_loss=z,
                         router_loss=aux_coef * aux + rc.z_loss_coef * z, stats=stats, balance=balance)

    def _experts_on_rows(self, x_MD: torch.Tensor, counts_SL: torch.Tensor, rows_M: torch.Tensor | None,
                         capacity: int | None, keep_sm: torch.Tensor | None) -> torch.Tensor:
        """The experts on received rows (source-major, ``counts_SL`` per (source, local expert));
        ``keep_sm``: the score-priority keep mask of the whole receive buffer, ``rows_M`` these rows'
        positions in it (None: all of it). Returns the outputs in the input's row order."""
        regroup = regroup_index(counts_SL).to(x_MD.device) if counts_SL.shape[0] > 1 else None
        back = torch.argsort(regroup) if regroup is not None else None  # its inverse: the way back
        x_recv = permute(x_MD, regroup, back) if regroup is not None else x_MD  # expert-major
        counts_L = counts_SL.sum(0)
        if keep_sm is not None:
            keep = keep_sm if rows_M is None else keep_sm[rows_M]
            keep = keep[regroup] if regroup is not None else keep
            keep_idx = keep.nonzero().squeeze(1)
            expert_M = torch.repeat_interleave(torch.arange(counts_L.numel()), counts_L).to(x_MD.device)
            kept_L = torch.bincount(expert_M[keep_idx], minlength=counts_L.numel())
            y_kept = self.experts(permute(x_recv, keep_idx), kept_L.tolist(), capacity)
            y_recv = pad_rows(y_kept, keep_idx, x_recv.shape[0])
        else:
            y_recv = self.experts(x_recv, counts_L.tolist(), capacity)
        return permute(y_recv, back, regroup) if regroup is not None else y_recv


def _keep_top_scores(score_N: torch.Tensor, counts_L: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (expert-major) each expert keeps: its ``capacity`` highest scores, ties to the earlier row."""
    n = score_N.shape[0]
    expert_N = torch.repeat_interleave(torch.arange(counts_L.numel(), device=score_N.device), counts_L, output_size=n)
    by_score = torch.argsort(score_N, descending=True, stable=True)
    order = by_score[torch.argsort(expert_N[by_score], stable=True)]  # expert-major, best first
    starts = torch.cumsum(counts_L, 0) - counts_L
    rank_in_expert = torch.empty_like(order)
    rank_in_expert[order] = torch.arange(n, device=score_N.device) - starts[expert_N[order]]
    keep = rank_in_expert < capacity
    return keep.nonzero().squeeze(1), counts_L.clamp(max=capacity)


def _score_keep_mask(score_M: torch.Tensor, counts_SL: torch.Tensor, capacity: int) -> torch.Tensor:
    """Score priority over the whole receive buffer (source-major): True for the rows each local expert
    keeps (its ``capacity`` best scores, ties to the earlier row in expert-major order)."""
    counts_L = counts_SL.sum(0).to(score_M.device)
    regroup = regroup_index(counts_SL).to(score_M.device) if counts_SL.shape[0] > 1 else None
    score_em = score_M[regroup] if regroup is not None else score_M
    keep_idx, _ = _keep_top_scores(score_em, counts_L, capacity)
    keep_em = torch.zeros(score_M.shape[0], dtype=torch.bool, device=score_M.device)
    keep_em[keep_idx] = True
    if regroup is None:
        return keep_em
    keep_sm = torch.empty_like(keep_em)
    keep_sm[regroup] = keep_em
    return keep_sm
