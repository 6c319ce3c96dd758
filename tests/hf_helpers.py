"""Helpers shared by the tests that build tiny random HF MoE models."""

from __future__ import annotations

import torch


def randomize_hf(hf: torch.nn.Module) -> torch.nn.Module:
    """Break HF's symmetric init (norms at one, some routers at zero) and return the model in eval mode."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "gate" in name and "proj" not in name:
                p.normal_(std=0.3)
    return hf.eval()


# Greedy tokens of two float32 implementations agree only where the reference's top-2 logit margin exceeds
# their difference (<= 1.5e-7 observed on these tiny models, on AVX-512, AVX2 and no-SIMD kernels): each greedy
# reference step must clear this margin, or the prompt is a near-tie and the test is ill-posed.
GREEDY_MARGIN = 1e-5  # ~70x the largest difference seen between the float32 implementations


def assert_clear_margins(logits_nV: torch.Tensor, margin: float = GREEDY_MARGIN) -> None:
    """Every step's top-1 logit leads the runner-up by more than ``margin``."""
    top2 = logits_nV.float().topk(2, dim=-1).values
    gaps = top2[..., 0] - top2[..., 1]
    assert bool((gaps > margin).all()), (f"greedy reference has a near-tie (top-2 margins {gaps.tolist()}, need > "
                                         f"{margin}): tokens would depend on the CPU's rounding; use other prompts")


FT_WORDS = ("the king and queen of our land shall speak to thee my lord good night sweet prince what news from rome "
            "to be or not is question noble friends come hither answer one two three four five").split()


def write_hf_tokenizer(folder, vocab_size: int = 128, bos: bool = True) -> dict[str, int]:
    """A small SentencePiece-style BPE tokenizer (Metaspace, like Llama's and Mixtral's) in ``folder``:
    ``tokenizer.json`` with ``<unk>``, ``<s>``, ``</s>`` (ids 0, 1, 2), a post-processor that prepends ``<s>``
    when ``bos`` (Mixtral) or adds nothing (Qwen2), and ``tokenizer_config.json`` naming the special tokens.
    Trained offline on a fixed word list; returns the special ids."""
    import json
    import random
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(0)
    text = [" ".join(rng.choice(FT_WORDS) for _ in range(12)) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 64, "clean_up_tokenization_spaces": False}))
    assert tok.get_vocab_size() <= vocab_size
    return {"unk": 0, "bos": 1, "eos": 2}


# Tiny HF MoE models for the fine-tuning and export tests: 2 layers, 4 experts top-2, vocab 128.
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            pad_token_id=None)
TINY_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, router_aux_loss_coef=0.02)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                       router_aux_loss_coef=0.01)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, norm_topk_prob=True, router_aux_loss_coef=0.01)),
}


def build_tiny_hf(family: str, seed: int = 0, **overrides):
    """A tiny random HF model of ``family`` (float32, eval mode, non-trivial norms and routers)."""
    import transformers

    cfg_name, model_name, extra = TINY_FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**{**TINY, **extra, **overrides}, attn_implementation="sdpa")
    return randomize_hf(getattr(transformers, model_name)(cfg))


def save_tiny_hf(hf, folder, max_shard_size: str | None = None, bos: bool = True):
    """``save_pretrained`` (sharded with ``max_shard_size``) plus a tokenizer (``write_hf_tokenizer``); returns
    the folder."""
    from pathlib import Path

    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(folder, safe_serialization=True, **kwargs)
    write_hf_tokenizer(folder, bos=bos)
    return folder


def save_mixtral_36mib(folder):
    """A random HF Mixtral with 36 MiB of float32 experts (6 layers x 8 experts x 3 x 256 x 256, ~50 MB in
    all) and a tokenizer, saved to ``folder``: the model of the memory tests (held once, built into the store)."""
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                                     num_key_value_heads=4, intermediate_size=256, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    write_hf_tokenizer(folder)
    return folder
