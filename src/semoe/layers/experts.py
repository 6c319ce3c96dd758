"""Experts: the local experts' weights stacked, applied to tokens sorted by expert.

Legend: N rows sorted by local expert, L local experts, D d_model, F d_ff, C capacity.
Weights are stored ``[L, D, F]`` / ``[L, F, D]`` (x @ w), one slice per expert; checkpoints store one
tensor per global expert id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semoe.ops import grouped_mm, grouped_mm_loop, pad_rows, permute
from semoe.ops.expert_ffn import FFNWorkspace, expert_ffn
from semoe.ops.expert_ffn_views import expert_ffn_views
from semoe.precision import autocast_dtype


def _act(name: str, h1: torch.Tensor, h3: torch.Tensor | None) -> torch.Tensor:
    if name == "swiglu":
        assert h3 is not None
        return F.silu(h1) * h3
    return F.gelu(h1)


class Experts(nn.Module):
    """``num_local_experts`` FFNs (SwiGLU: w1, w3, w2; GELU: w1, w2) applied group-wise.

    ``impl``: "grouped_mm" (on CUDA one ``torch._grouped_mm`` per matrix; on a CPU the fused
    ``ops.expert_ffn`` op, whose activation buffers are reused across steps), "loop" (per-expert
    reference, plain autograd) or "padded" (rows scattered into an ``[L, C, D]`` buffer, then batched GEMMs).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu",
                 impl: str = "grouped_mm", init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts = num_experts  # global
        self.num_local_experts = num_experts
        self.expert_offset = 0  # global id of local expert 0
        self.activation, self.impl = activation, impl
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.init_std = init_std
        self.workspace = FFNWorkspace()
        # per-expert weight tensors lent for some calls in place of the stacked parameters ("w1"/"w3"/"w2" -> one
        # tensor per local expert; set by the ring's in-place routed passes, inference only), or None
        self.weight_views: dict[str, list[torch.Tensor]] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w3, self.w2):
            if w is not None:
                nn.init.normal_(w, std=self.init_std)

    def shard_(self, ep_rank: int, ep_size: int) -> None:
        """Keep only this rank's contiguous block of experts (global ids offset..offset+L-1)."""
        if self.num_experts % ep_size:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by ep_size={ep_size}; "
                             "choose an ep_size that divides the number of experts")
        L = self.num_experts // ep_size
        self.num_local_experts, self.expert_offset = L, ep_rank * L
        for name in ("w1", "w3", "w2"):
            w = getattr(self, name)
            if w is not None:
                setattr(self, name, nn.Parameter(w.detach()[ep_rank * L:(ep_rank + 1) * L].clone()))

    def _compute_operands(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                              torch.Tensor]:
        """x, w1, w3, w2 in the compute dtype: autocast's dtype when it is on (the casts are recorded, so
        the weight gradients arrive in the parameters' own dtype), else as they are. Done here for every
        impl, so that the fused CPU op and ``torch._grouped_mm``, which autocast does not handle, run
        in bfloat16 too."""
        dt = autocast_dtype(x_ND.device.type)
        ws = (self.w1, self.w3, self.w2)
        if dt is None:
            return x_ND, *ws
        return x_ND.to(dt), *(w.to(dt) if w is not None else None for w in ws)

    def forward(self, x_ND: torch.Tensor, counts_L: list[int], capacity: int | None = None) -> torch.Tensor:
        """Rows of ``x_ND`` sorted by local expert, ``counts_L[l]`` rows for expert l. Under autocast the
        experts compute in its dtype and return it."""
        if self.weight_views is not None:  # the same ops as the impl's, on the lent per-expert tensors
            v = self.weight_views
            return expert_ffn_views(x_ND, v["w1"], v["w2"], v.get("w3"), counts_L, self.impl)
        x_ND, w1, w3, w2 = self._compute_operands(x_ND)
        if self.impl == "padded":
            if capacity is None:
                raise ValueError("expert_impl='padded' needs a capacity (set router.capacity_factor)")
            return self._padded(x_ND, w1, w3, w2, counts_L, capacity)
        if self.impl == "grouped_mm" and x_ND.device.type == "cpu":
            return expert_ffn(x_ND, w1, w2, w3, counts_L, self.workspace)
        mm = grouped_mm_loop if self.impl == "loop" else grouped_mm
        offs = None
        if self.impl == "grouped_mm" and x_ND.shape[0] > 0:
            offs = torch.tensor(counts_L, device=x_ND.device).cumsum(0).to(torch.int32)
        if self.impl == "grouped_mm":
            h1 = grouped_mm(x_ND, w1, counts_L, offs)
            h3 = grouped_mm(x_ND, w3, counts_L, offs) if w3 is not None else None
            return grouped_mm(_act(self.activation, h1, h3), w2, counts_L, offs)
        h1 = mm(x_ND, w1, counts_L)
        h3 = mm(x_ND, w3, counts_L) if w3 is not None else None
        return mm(_act(self.activation, h1, h3), w2, counts_L)

    def _padded(self, x_ND: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor,
                counts_L: list[int], capacity: int) -> torch.Tensor:
        L, C = self.num_local_experts, capacity
        if max(counts_L, default=0) > C:
            raise RuntimeError(f"an expert got {max(counts_L)} rows with capacity {C}")  # invariant
        counts = torch.tensor(counts_L, device=x_ND.device)
        starts = torch.cumsum(counts, 0) - counts
        expert_N = torch.repeat_interleave(torch.arange(L, device=x_ND.device), counts)
        slot_N = expert_N * C + torch.arange(x_ND.shape[0], device=x_ND.device) - starts[expert_N]
        buf = pad_rows(x_ND, slot_N, L * C).view(L, C, -1)
        h1 = torch.bmm(buf, w1)
        h3 = torch.bmm(buf, w3) if w3 is not None else None
        y = torch.bmm(_act(self.activation, h1, h3), w2)
        return permute(y.reshape(L * C, -1), slot_N)


class SharedExpert(nn.Module):
    """Dense FFN every token goes through (Qwen2-MoE / DeepSeek shared experts), optionally gated
    by ``sigmoid(x @ gate)`` (Qwen2-MoE)."""

    def __init__(self, d_model: int, hidden: int, activation: str, gated: bool, init_std: float = 0.02) -> None:
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.randn(d_model, hidden) * init_std)
        self.w3 = nn.Parameter(torch.randn(d_model, hidden) * init_std) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.randn(hidden, d_model) * init_std)
        self.gate = nn.Parameter(torch.randn(1, d_model) * init_std) if gated else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h3 = x_TD @ self.w3 if self.w3 is not None else None
        y = _act(self.activation, x_TD @ self.w1, h3) @ self.w2
        if self.gate is not None:
            y = y * torch.sigmoid(F.linear(x_TD, self.gate))
        return y


def expert_flops(num_rows: int, d_model: int, d_ff: int, activation: str) -> float:
    """Forward FLOPs of ``num_rows`` rows through one expert FFN (2 per multiply-add)."""
    mats = 3 if activation == "swiglu" else 2
    return 2.0 * num_rows * d_model * d_ff * mats


__all__ = ["Experts", "SharedExpert", "expert_flops"]
