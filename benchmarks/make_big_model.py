"""Write a random bf16 OLMoE-shaped HF checkpoint, tensor by tensor, without ever building the model in memory.

For issue #14 item 6 (a model larger than the machine's RAM, served within a few GiB). The folder gets a
``config.json`` (``OlmoeForCausalLM``), sharded ``model-0000i-of-0000N.safetensors`` files with HF's key names
(per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``, the layout of the released OLMoE checkpoints), their
``model.safetensors.index.json`` and a small byte-level BPE ``tokenizer.json`` trained offline (its vocabulary is
smaller than the model's: ids it does not know decode to nothing).

    python benchmarks/make_big_model.py --out /tmp/olmoe-big --layers 32        # ~25.4 GiB (OLMoE x 2 layers)
    python benchmarks/make_big_model.py --out /tmp/olmoe-tiny --smoke           # a few MiB, for the tests

Values: every weight matrix is a window of one random pool (``torch.randn * --std``, bf16, 2^27 values) at a random
offset, so no two tensors are equal and writing costs no random generation per tensor; norms are 1 + small noise.
Memory: the pool (256 MiB) and one tensor at a time; each shard is written with ``SafetensorsWriter`` (``pwrite``
per tensor). Shards hold whole layers (``--shard-gb`` each, default 2 GB).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from semoe.models.hf import hf_keys, model_config_from_hf
from semoe.storage.safetensors_io import SafetensorsWriter

OLMOE = dict(  # allenai/OLMoE-1B-7B-0924's shape; num_hidden_layers is --layers
    architectures=["OlmoeForCausalLM"], model_type="olmoe", vocab_size=50304, hidden_size=2048,
    intermediate_size=1024, num_experts=64, num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16,
    max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False, clip_qkv=None,
    attention_bias=False, tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02,
    router_aux_loss_coef=0.01, output_router_logits=False, pad_token_id=1, bos_token_id=None, eos_token_id=50279,
    torch_dtype="bfloat16", dtype="bfloat16", use_cache=True,
)
SMOKE = dict(vocab_size=384, hidden_size=64, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, eos_token_id=0, pad_token_id=0)
POOL = 1 << 27


def hf_config(layers: int, smoke: bool = False, **overrides: object) -> dict:
    """The ``config.json`` of the model: OLMoE's shape (tiny with ``smoke``) and ``layers`` decoder layers."""
    return {**OLMOE, **(SMOKE if smoke else {}), "num_hidden_layers": layers, **overrides}


def tensor_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """HF key -> shape for every tensor of the checkpoint (the keys of :func:`semoe.models.hf.hf_keys`)."""
    D, V, F = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]
    hd = D // hf["num_attention_heads"]
    kv = hf["num_key_value_heads"] * hd
    H = hf["num_attention_heads"] * hd
    out = {}
    for key in hf_keys("olmoe", model_config_from_hf(hf)):
        leaf = key.rsplit(".", 2)[-2] if key.endswith(".weight") else key
        shape = {"embed_tokens": (V, D), "lm_head": (V, D), "norm": (D,), "input_layernorm": (D,),
                 "post_attention_layernorm": (D,), "q_proj": (H, D), "k_proj": (kv, D), "v_proj": (kv, D),
                 "o_proj": (D, H), "q_norm": (H,), "k_norm": (kv,), "gate": (hf["num_experts"], D),
                 "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}[leaf]
        out[key] = shape
    return out


def shard_keys(keys: list[str], shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of whole layers (embedding with the first, norm + head with the last), each shard
    closed once it holds ``shard_bytes`` or more."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split(".")
        g = parts[2] if parts[1] == "layers" else ("first" if "embed" in k else "last")
        groups.setdefault(g, []).append(k)
    order = ["first", *[g for g in groups if g not in ("first", "last")], "last"]
    shards: list[list[str]] = [[]]
    size = 0
    for g in order:
        if size >= shard_bytes:
            shards.append([])
            size = 0
        shards[-1] += groups[g]
        size += sum(2 * math.prod(shapes[k]) for k in groups[g])
    return shards


def write_tokenizer(folder: Path, vocab: int = 320) -> None:
    """A byte-level BPE ``tokenizer.json`` trained offline on a few sentences (ids 0..vocab-1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog.", "A model larger than memory streams its experts.",
            "Once upon a time there was a ring of slots.", "ROMEO: But soft, what light through yonder window."]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))


def make_model(out: Path, layers: int, smoke: bool = False, std: float = 0.02, shard_bytes: int = 2 * 10**9,
               seed: int = 0, progress: bool = True) -> int:
    """Write the checkpoint into ``out`` (created); returns its tensor bytes."""
    out.mkdir(parents=True, exist_ok=True)
    hf = hf_config(layers, smoke)
    shapes = tensor_shapes(hf)
    keys = list(shapes)
    shards = shard_keys(keys, shapes, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    n_pool = min(POOL, 2 * max(math.prod(s) for s in shapes.values()))
    pool = (torch.randn(n_pool, generator=gen) * std).to(torch.bfloat16)
    weight_map, total, t0 = {}, 0, time.perf_counter()
    n = len(shards)
    for i, ks in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        with SafetensorsWriter(out / name, {k: (torch.bfloat16, shapes[k]) for k in ks},
                               metadata={"format": "pt"}) as w:
            for k in ks:
                numel = math.prod(shapes[k])
                if len(shapes[k]) == 1:  # a norm weight
                    t = 1 + 0.1 * torch.randn(numel, generator=gen)
                    t = t.to(torch.bfloat16)
                else:
                    off = int(torch.randint(0, n_pool - numel + 1, (1,), generator=gen))
                    t = pool[off:off + numel]
                w.write(k, t.view(shapes[k]))
                weight_map[k] = name
                total += 2 * numel
        if progress:
            print(f"{name}: {total / 2**30:.2f} GiB written, {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                  flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    write_tokenizer(out)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (OLMoE has 16; 32 -> ~25.4 GiB; --smoke: 2)")
    ap.add_argument("--smoke", action="store_true", help="a tiny OLMoE-layout model (a few MiB)")
    ap.add_argument("--std", type=float, default=0.02, help="std of the random weights")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GB (whole layers per shard)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    total = make_model(args.out, args.layers if not args.smoke or args.layers != 32 else 2, smoke=args.smoke,
                       std=args.std, shard_bytes=int(args.shard_gb * 1e9) if not args.smoke else 100_000,
                       seed=args.seed)
    print(json.dumps({"out": str(args.out), "bytes": total, "gib": round(total / 2**30, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
