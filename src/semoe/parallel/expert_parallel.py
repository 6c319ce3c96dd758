"""Expert parallelism: shard every MoE layer's experts over the ``ep`` mesh axis and give the layer
a torch.distributed comm. The layer's math is untouched (``semoe.layers.moe``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from semoe.layers.moe import MoELayer
from semoe.parallel.all_to_all import all_to_all
from semoe.parallel.mesh import ep_group


class EPComm:
    """The expert-parallel group of one rank (same interface as ``semoe.layers.comm.LocalComm``)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)

    def _gather_sizes(self, n: int) -> list[int]:
        t = torch.tensor([n], dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.ep_size)]
        dist.all_gather(out, t, group=self.group)
        return [int(v) for v in out]

    def token_offset(self, num_tokens: int) -> tuple[int, int]:
        sizes = self._gather_sizes(num_tokens)
        return sum(sizes[: self.ep_rank]), sum(sizes)

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self._gather_sizes(x.shape[0])
        pad = max(sizes)
        buf = x.new_zeros((pad, *x.shape[1:]))
        buf[: x.shape[0]] = x
        out = [torch.empty_like(buf) for _ in range(self.ep_size)]
        dist.all_gather(out, buf.contiguous(), group=self.group)
        return torch.cat([o[:n] for o, n in zip(out, sizes)])

    def exchange_stats(self, vec_N: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(vec_N) for _ in range(self.ep_size)]
        dist.all_gather(out, vec_N.contiguous(), group=self.group)
        return torch.stack(out)

    def all_to_all(self, x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        return all_to_all(x_ND, send_splits, recv_splits, self.group)


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh | None) -> nn.Module:
    """Shard the experts of every ``MoELayer`` in ``model`` over the mesh's ``ep`` axis, in place.

    Call it on a model whose every rank was built from the same seed (or before loading a
    checkpoint): rank r of the ep group keeps experts [r*L, (r+1)*L). With ``mesh=None`` it is a no-op.
    """
    group = ep_group(mesh)
    if group is None:
        return model
    comm = EPComm(group)
    for module in model.modules():
        if isinstance(module, MoELayer):
            if module.cfg.num_experts % comm.ep_size:
                raise ValueError(f"num_experts={module.cfg.num_experts} is not divisible by ep_size={comm.ep_size}; "
                                 "choose an ep_size (or --nproc) that divides the number of experts")
            module.experts.shard_(comm.ep_rank, comm.ep_size)
            module.comm = comm
    return model
