"""Decoder-only MoE transformer and the HF checkpoint importer."""

from semoe.models.hf import iter_semoe_tensors, load_hf_checkpoint, model_config_from_hf
from semoe.models.transformer import KVCache, ModelOutput, MoETransformer, moe_layers, num_params

__all__ = ["KVCache", "MoETransformer", "ModelOutput", "iter_semoe_tensors", "load_hf_checkpoint",
           "model_config_from_hf", "moe_layers", "num_params"]
