"""Autograd ops, one per file: row permutation, weighted un-permutation, row padding, grouped matmul."""

from semoe.ops.expert_ffn import FFNWorkspace, expert_ffn
from semoe.ops.grouped_mm import grouped_mm, grouped_mm_loop
from semoe.ops.pad_rows import pad_rows
from semoe.ops.permute import permute
from semoe.ops.unpermute import unpermute

__all__ = ["FFNWorkspace", "expert_ffn", "grouped_mm", "grouped_mm_loop", "pad_rows", "permute", "unpermute"]
