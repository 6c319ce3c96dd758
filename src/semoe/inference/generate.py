"""Autoregressive generation with the KV cache: prefill the prompt, then one token per step.

Legend: B sequences in a batch, P prompt length, V vocab.

Prompts of equal length run together as one batch; prompts of different lengths run in separate
batches (one per length), which is exact without padding masks. A finished sequence (eos or its
limit) stays in its batch until the whole batch is done, but nothing more is recorded for it.
"""

from __future__ import annotations

import logging

import torch

from semoe.models.transformer import MoETransformer

log = logging.getLogger(__name__)


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits: argmax when ``temperature == 0``, else
    nucleus (top-p) sampling from ``softmax(logits / temperature)``."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_BV, idx_BV = torch.sort(probs_BV, dim=-1, descending=True)
        before_BV = torch.cumsum(sorted_BV, dim=-1) - sorted_BV  # mass of strictly better tokens
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)  # the best token is always kept
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, idx_BV, sorted_BV)
    gen_device = generator.device if generator is not None else probs_BV.device
    choice_B1 = torch.multinomial(probs_BV.to(gen_device), 1, generator=generator)
    return choice_B1.squeeze(1).to(logits_BV.device)


def _as_lists(prompt_ids: list[list[int]] | torch.Tensor) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2 or prompt_ids.is_floating_point():
            raise ValueError(f"prompt_ids tensor must be integer [batch, seq], got {prompt_ids.dtype} "
                             f"{tuple(prompt_ids.shape)}")
        return [[int(t) for t in row] for row in prompt_ids.tolist()]
    if not isinstance(prompt_ids, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in prompt_ids):
        raise TypeError("prompt_ids must be a list of token-id lists or a [batch, seq] tensor")
    return [[int(t) for t in p] for p in prompt_ids]


@torch.inference_mode()
def generate(model: MoETransformer, prompt_ids: list[list[int]] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new tokens per prompt
    (including ``eos_id`` when it is produced, after which that sequence stops).

    ``temperature == 0``: greedy. ``top_p < 1``: nucleus sampling. ``generator``: the random source
    for sampling (its device is used for the draw). The model runs in eval mode; its previous mode
    is restored on return.
    """
    prompts = _as_lists(prompt_ids)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.cfg
    longest = max((len(p) for p in prompts), default=0)
    if prompts and longest + max_new_tokens - 1 > cfg.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds max_seq_len="
                         f"{cfg.max_seq_len}; shorten the prompt or ask for fewer tokens")
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return results
    was_training = model.training
    model.eval()
    try:
        _generate_groups(model, prompts, results, max_new_tokens, temperature, top_p, eos_id, generator)
    finally:
        model.train(was_training)
    return results


def _generate_groups(model: MoETransformer, prompts: list[list[int]], results: list[list[int]], max_new_tokens: int,
                     temperature: float, top_p: float, eos_id: int | None, generator: torch.Generator | None) -> None:
    """Run each group of equal-length prompts as one batch; append the new tokens to ``results``."""
    device = model.tok_emb.weight.device
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for P, members in by_len.items():
        B = len(members)
        tokens_BP = torch.tensor([prompts[i] for i in members], dtype=torch.long, device=device)
        cache = model.new_cache(B, P + max_new_tokens - 1)  # the last new token is never fed back
        logits_BV = model(tokens_BP, cache=cache).logits[:, -1]
        done = [False] * B
        for step in range(max_new_tokens):
            next_B = sample_next(logits_BV, temperature, top_p, generator)
            for b, tok in enumerate(next_B.tolist()):
                if not done[b]:
                    results[members[b]].append(tok)
                    done[b] = eos_id is not None and tok == eos_id
            if all(done) or step == max_new_tokens - 1:
                break
            logits_BV = model(next_B[:, None], cache=cache).logits[:, -1]
        log.debug("generated %d sequences of prompt length %d", B, P)


__all__ = ["generate", "sample_next"]
