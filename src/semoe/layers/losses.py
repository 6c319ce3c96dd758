"""Router losses over the whole expert-parallel batch.

Each rank holds only its tokens' share of a loss. ``group_loss`` returns a tensor whose *value* is
the loss of the whole expert-parallel batch (what you log) and whose *gradient* is ``ep_size`` times
the gradient of this rank's share, so that averaging gradients over the group, as data parallelism
does, yields exactly the gradient of the group's loss. With ep_size 1 it is the plain loss.
"""

from __future__ import annotations

import torch


def group_loss(local: torch.Tensor, group_value: torch.Tensor, ep_size: int) -> torch.Tensor:
    scaled = local * ep_size
    return scaled + (group_value.to(scaled.dtype) - scaled).detach()


def load_balancing_loss(prob_sum_E: torch.Tensor, group_prob_sum_E: torch.Tensor, frac_E: torch.Tensor,
                        total_tokens: int, ep_size: int) -> torch.Tensor:
    """Switch/GShard loss ``E * sum_e f_e * P_e``: f_e the fraction of assignments routed to e
    (before dropping), P_e the mean router probability of e. Equals 1 when perfectly balanced."""
    E = prob_sum_E.shape[0]
    frac_E = frac_E.to(prob_sum_E.dtype)
    local = E * (frac_E * prob_sum_E).sum() / total_tokens
    value = E * (frac_E * group_prob_sum_E.to(prob_sum_E.dtype)).sum() / total_tokens
    return group_loss(local, value, ep_size)


def router_z_loss(lse_sq_sum: torch.Tensor, group_lse_sq_sum: torch.Tensor, total_tokens: int,
                  ep_size: int) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    return group_loss(lse_sq_sum / total_tokens, group_lse_sq_sum / total_tokens, ep_size)


def pooled_load_balancing_loss(prob_sums_E: list[torch.Tensor], group_prob_sums_E: list[torch.Tensor],
                               routed_E: list[torch.Tensor], tokens: list[int], ep_size: int) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (Mixtral / Qwen2-MoE / OLMoE) over several MoE layers:
    ``E * sum_e (C_e / N) * (P_e / N)`` with C_e the assignments to expert e summed over every layer's top-k
    choices, P_e the router probabilities of e summed over every layer's rows, and N the rows of all layers.
    One entry per layer: this rank's probability sums (differentiable), the group's (values), the group's
    routed counts and tokens. A sum of per-layer losses it is not: the layers are pooled before the product."""
    E = prob_sums_E[0].shape[0]
    n = sum(tokens)
    dtype = prob_sums_E[0].dtype
    counts_E = torch.stack([c.to(dtype) for c in routed_E]).sum(0)
    local = E * (counts_E * torch.stack(prob_sums_E).sum(0)).sum() / (n * n)
    value = E * (counts_E * torch.stack([g.to(dtype) for g in group_prob_sums_E]).sum(0)).sum() / (n * n)
    return group_loss(local, value, ep_size)
