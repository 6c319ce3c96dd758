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
