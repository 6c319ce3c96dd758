"""Routers: which experts each token goes to, and with what weight.

Legend: T local tokens, G tokens of the whole expert-parallel batch, E experts, K choices per token,
A assignments (token, expert) pairs, D hidden.

A router returns a :class:`Routing`: flat assignments in *priority order* (all first choices, then
all second choices, ...; tokens in order inside each), plus the differentiable sums the layer needs
for its auxiliary losses. Capacity (dropping) is applied by the layer, because it needs the token
counts of every rank. Randomness (noise, jitter, GShard random routing) comes from the layer's own
generator, seeded from ``RouterConfig.seed`` and a call counter, and is drawn for the whole
expert-parallel batch and sliced, so it does not depend on how tokens are split over ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from semoe.config import RouterConfig
from semoe.precision import upcast


class RouterComm(Protocol):
    """What a router needs from the expert-parallel group (``semoe.layers.comm.LocalComm`` alone)."""

    def token_offset(self, num_tokens: int) -> tuple[int, int]: ...

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Routing:
    """Local routing decisions. Assignment a is token ``token_A[a]`` -> expert ``expert_A[a]``."""

    token_A: torch.Tensor  # int64
    expert_A: torch.Tensor  # int64, global expert id
    choice_A: torch.Tensor  # int64, 0 = first choice
    weight_A: torch.Tensor  # combine weight, differentiable
    score_A: torch.Tensor  # detached priority for drop_policy="score"
    num_choices: int  # K
    prob_sum_E: torch.Tensor  # sum over local tokens of the (normalised) router probabilities, differentiable
    lse_sq_sum: torch.Tensor  # sum over local tokens of logsumexp(logits)^2, differentiable (z-loss)


class Router(nn.Module):
    """Shared part: the gate projection, the score function, training-time noise and a bias."""

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        if cfg.noise == "gaussian":
            self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))
        # expert bias for auxiliary-loss-free balancing (selection only), and the noise call counter
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=True)
        self.compute_losses = True  # False: skip the loss sums (inference; set through MoELayer)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def _generator(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed((self.cfg.seed * 1_000_003 + int(self.calls)) % (2**63))
        return g

    def _global_rand(self, kind: str, shape_rest: tuple[int, ...], comm: RouterComm, num_tokens: int,
                     g: torch.Generator, device: torch.device) -> torch.Tensor:
        """Random numbers for the whole expert-parallel batch, then this rank's rows."""
        offset, total = comm.token_offset(num_tokens)
        fn = torch.randn if kind == "normal" else torch.rand
        full = fn((total, *shape_rest), generator=g, device=device)
        return full[offset:offset + num_tokens]

    def logits(self, x_TD: torch.Tensor, comm: RouterComm) -> tuple[torch.Tensor, torch.Generator | None]:
        """Router logits [T, E] in float32 (float64 for a float64 model; never in 16 bits, autocast or
        not: routing decisions and the losses need the precision), with training-time noise when
        configured, and the generator of this call (None when the call draws no random numbers)."""
        cfg = self.cfg
        noisy = self.training and cfg.noise != "none"
        g = self._generator(x_TD.device) if noisy or (self.training and cfg.second_expert == "random") else None
        x = x_TD
        if noisy and cfg.noise == "jitter" and cfg.jitter_eps > 0:
            u = self._global_rand("uniform", (x.shape[1],), comm, x.shape[0], g, x.device)
            x = x * (1.0 - cfg.jitter_eps + 2.0 * cfg.jitter_eps * u).to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            logits_TE = F.linear(upcast(x), upcast(self.weight))
            if noisy and cfg.noise == "gaussian":
                scale = F.softplus(F.linear(upcast(x), upcast(self.noise_weight)))
        if noisy and cfg.noise == "gaussian":
            eps = self._global_rand("normal", (self.num_experts,), comm, x.shape[0], g, x.device)
            logits_TE = logits_TE + eps * scale
        return logits_TE, g

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.cfg.score_func == "softmax":
            return logits_TE.softmax(dim=-1)
        return logits_TE.sigmoid()

    def finish_call(self) -> None:
        if self.training:
            self.calls += 1

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: push under-loaded experts up, over-loaded ones down."""
        if self.training and self.cfg.bias_update_rate > 0:
            load = load_E.to(self.expert_bias.dtype)
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)


def _aux_sums(logits_TE: torch.Tensor, scores_TE: torch.Tensor, score_func: str,
              wanted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if not wanted:  # zeros of the same shapes: the losses are not computed
        return scores_TE.new_zeros(scores_TE.shape[1]), scores_TE.new_zeros(())
    probs = scores_TE if score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-9)
    return probs.sum(0), torch.logsumexp(logits_TE, dim=-1).square().sum()


class TopKRouter(Router):
    """Token choice: each token takes its ``top_k`` best experts (Switch k=1, GShard k=2, Mixtral...)."""

    def forward(self, x_TD: torch.Tensor, comm: RouterComm) -> Routing:
        cfg, T, K = self.cfg, x_TD.shape[0], self.cfg.top_k
        logits_TE, g = self.logits(x_TD, comm)
        scores_TE = self.scores(logits_TE)
        select_TE = scores_TE.detach() + self.expert_bias if cfg.bias_update_rate > 0 else scores_TE.detach()
        _, expert_TK = torch.topk(select_TE, K, dim=-1, sorted=True)
        weight_TK = scores_TE.gather(1, expert_TK)
        if cfg.normalize_topk:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-9)
        keep = None  # every (token, choice) is kept unless GShard's random second expert drops some
        if self.training and cfg.second_expert == "random":
            keep_TK = torch.ones_like(expert_TK, dtype=torch.bool)
            g12 = weight_TK.detach()
            p2 = (2.0 * g12[:, 1] / g12.sum(-1).clamp_min(1e-9)).clamp(max=1.0)
            u = self._global_rand("uniform", (), comm, T, g, x_TD.device)
            keep_TK[:, 1] = u < p2
            keep = keep_TK.t().reshape(-1)
        # priority order: choice-major (all first choices, then all second choices)
        token_A = torch.arange(T, device=x_TD.device).repeat(K)
        choice_A = torch.arange(K, device=x_TD.device).repeat_interleave(T)
        expert_A = expert_TK.t().reshape(-1)
        weight_A = weight_TK.t().reshape(-1)
        prob_sum_E, lse_sq = _aux_sums(logits_TE, scores_TE, cfg.score_func, self.compute_losses)
        self.finish_call()
        if keep is not None:  # boolean indexing (and its backward's index_put) only when something is dropped
            token_A, expert_A, choice_A, weight_A = token_A[keep], expert_A[keep], choice_A[keep], weight_A[keep]
        return Routing(
            token_A=token_A,
            expert_A=expert_A,
            choice_A=choice_A,
            weight_A=weight_A,
            score_A=weight_A.detach(),
            num_choices=K,
            prob_sum_E=prob_sum_E,
            lse_sq_sum=lse_sq,
        )


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its C highest-scoring tokens of the whole
    expert-parallel batch, C = ceil(capacity_factor * top_k * G / E). A token may get 0..E experts.
    Note: in a causal LM a token's routing depends on later tokens of the batch."""

    def capacity(self, total_tokens: int) -> int:
        cf = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        cf = cf if cf is not None else 1.0
        c = math.ceil(cf * self.cfg.top_k * total_tokens / self.num_experts)
        return min(total_tokens, max(c, self.cfg.min_capacity))

    def forward(self, x_TD: torch.Tensor, comm: RouterComm) -> Routing:
        T = x_TD.shape[0]
        logits_TE, _ = self.logits(x_TD, comm)
        scores_TE = self.scores(logits_TE)
        offset, total = comm.token_offset(T)
        all_GE = comm.all_gather_rows(scores_TE.detach())  # [G, E], identical on every rank
        C = self.capacity(total)
        # stable descending sort: ties go to the earlier token, on every rank alike
        top_CE = torch.sort(all_GE, dim=0, descending=True, stable=True).indices[:C]
        local = (top_CE >= offset) & (top_CE < offset + T)
        expert_CE = torch.arange(self.num_experts, device=x_TD.device).expand_as(top_CE)
        # order by token so that the assignment order does not depend on the rank split
        tok = top_CE[local] - offset
        exp = expert_CE[local]
        order = torch.argsort(tok * self.num_experts + exp, stable=True)
        tok, exp = tok[order], exp[order]
        weight_A = scores_TE[tok, exp]
        prob_sum_E, lse_sq = _aux_sums(logits_TE, scores_TE, self.cfg.score_func, self.compute_losses)
        self.finish_call()
        return Routing(
            token_A=tok, expert_A=exp, choice_A=torch.zeros_like(tok), weight_A=weight_A,
            score_A=weight_A.detach(), num_choices=1, prob_sum_E=prob_sum_E, lse_sq_sum=lse_sq,
        )


def build_router(cfg: RouterConfig, d_model: int, num_experts: int) -> Router:
    """The router class for ``cfg.kind``."""
    if cfg.kind == "expert_choice":
        return ExpertChoiceRouter(cfg, d_model, num_experts)
    return TopKRouter(cfg, d_model, num_experts)
