"""Gradient rules under expert parallelism.

Objective: the mean over all ranks of each rank's loss. Dense (replicated) parameters: gradients
averaged over the whole world. Expert parameters: each rank's expert gradient already holds the
contributions of every rank of its ep group (through the all-to-all's backward), so it is summed
over the expert's replicas (``dp`` axis) and divided by the world size. Each class is flattened into
one buffer and reduced with one collective (``semoe.parallel.fusion`` does it bucketed and overlapped).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from semoe.parallel.mesh import dp_group


def is_expert_param(name: str) -> bool:
    """Expert parameters are the stacked weights under an MoE layer's ``experts`` module."""
    return ".experts." in f".{name}"


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) parameters that require grad, in registration order."""
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if is_expert_param(name) else dense).append(p)
    return dense, expert


def _reduce_(params: list[nn.Parameter], group: dist.ProcessGroup | None, scale: float, communicate: bool) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if communicate:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[off:off + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[off:off + n].view_as(p))
        off += n


def sync_gradients(model: nn.Module, mesh: DeviceMesh | None) -> None:
    """Average gradients across ranks following the rules above. No-op without a mesh. Parameters sharded by
    FSDP (``semoe.parallel.fsdp``, DTensors) are skipped: FSDP reduce-scattered (and averaged) them in backward."""
    if mesh is None or not dist.is_initialized():
        return
    world = dist.get_world_size()
    dense, expert = split_params(model)
    dense = [p for p in dense if not isinstance(p, DTensor)]
    _reduce_(dense, None, 1.0 / world, communicate=True)  # None: the whole world
    _reduce_(expert, dp_group(mesh), 1.0 / world, communicate=mesh.size(0) > 1)


def expert_grad_sq(grad: torch.Tensor) -> torch.Tensor:
    """Sum of the squared norms of the experts of a stacked expert gradient ``[L, ...]``, in float64.

    The unit is one expert: each ``grad[l]`` is the same tensor (shape, values, memory layout) in every
    expert-parallel layout, so its norm, taken in the gradient's dtype by the same kernel, is the same number at
    EP 1 and EP 8; the squares are summed in float64, where the order of the sum over experts and ranks only
    moves the result by float64 rounding. (A norm of the whole stacked tensor in float32 would change with the
    number of experts a rank holds, by float32 rounding.) ``semoe.storage.offload`` takes its experts' part of
    the norm with this function too."""
    grad = grad.detach()
    if grad.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64, device=grad.device)
    norms = torch._foreach_norm(list(grad.unbind(0)))  # one float32 norm per expert (torch's clip uses it too)
    return torch.stack(norms).double().square().sum()


def grad_norm(model: nn.Module, mesh: DeviceMesh | None, expert_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Global L2 norm of the (synchronised) gradients, each expert shard counted exactly once:
    dense gradients are identical on every rank and counted once; expert norms are summed over the ep
    group (each rank holds different experts; dp replicas are identical).

    Layout-independent: the norm is combined from units that are the same tensors in every layout, a dense
    tensor (identical on every rank after the sync) or one expert (:func:`expert_grad_sq`). Each unit's norm is
    taken in its gradient's dtype (``torch._foreach_norm``, as torch's clip_grad_norm_ does: no float64 copy of
    any gradient) and the squares are summed in float64, so layouts differ only by the float64 rounding of that
    sum (a float64 run is float64 throughout). ``expert_sq``: the experts' part computed elsewhere (already
    summed over the ep group; ``semoe.storage.offload`` keeps the experts out of the model).
    Dense gradients sharded by FSDP (DTensors): each rank's shards' squares, summed over the shards' mesh (the
    unit there is the shard, which depends on the dense world size)."""
    dense, expert = split_params(model)

    def sq(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack(torch._foreach_norm(grads)).double().square().sum()
    sharded = [p for p in dense if isinstance(p.grad, DTensor)]
    dense_sq = sq([p.grad.detach() for p in dense if p.grad is not None and not isinstance(p.grad, DTensor)])
    if sharded:
        shard_sq = sq([p.grad.to_local().detach() for p in sharded])
        dist.all_reduce(shard_sq, group=sharded[0].grad.device_mesh.get_group())
        dense_sq = dense_sq + shard_sq
    if expert_sq is None:
        vals = [expert_grad_sq(p.grad) for p in expert if p.grad is not None]
        expert_sq = torch.stack(vals).sum() if vals else torch.zeros((), dtype=torch.float64)
        if mesh is not None and mesh.size(1) > 1:
            dist.all_reduce(expert_sq, group=mesh.get_group("ep"))
    return (dense_sq + expert_sq).sqrt()


def clip_grad_norm_(model: nn.Module, max_norm: float, mesh: DeviceMesh | None,
                    expert_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Scale all gradients so the global norm is at most ``max_norm``; returns the norm before.
    ``expert_sq``: see :func:`grad_norm` (the caller then scales those gradients itself)."""
    total = grad_norm(model, mesh, expert_sq)
    if max_norm > 0 and math.isfinite(float(total)):
        coef = (max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
    return total


@torch.no_grad()
def sync_router_bias(model: nn.Module, mesh: DeviceMesh | None) -> None:
    """Average the auxiliary-loss-free expert biases over the expert replicas (``dp`` axis).

    Each expert-parallel group moves its routers' biases from its own tokens' load, so without this
    the replicas' biases (and their routing) drift apart. Inside an ep group they are already equal.
    """
    from semoe.layers.router import Router

    if mesh is None or mesh.size(0) == 1:
        return
    biases = [m.expert_bias for m in model.modules() if isinstance(m, Router) and m.cfg.bias_update_rate > 0]
    if not biases:
        return
    flat = torch.cat([b.reshape(-1) for b in biases])
    dist.all_reduce(flat, group=dp_group(mesh))
    flat /= mesh.size(0)
    off = 0
    for b in biases:
        b.copy_(flat[off:off + b.numel()].view_as(b))
        off += b.numel()
