"""Decoder-only MoE transformer (nanoGPT / gpt-fast style): pre-norm blocks of grouped-query attention
with RoPE and an MoE (or dense SwiGLU) feed-forward, plus a preallocated KV cache for generation.

Legend: B batch, S new positions in this call, L key positions (cached + new), D d_model,
H query heads, G kv heads (grouped-query attention), K head dim, V vocab, F dense hidden.

Packed sequences: ``forward(tokens, doc_ids=...)`` gives every position the id of its document; attention
is then causal *within* a document only (a block-diagonal causal mask for SDPA), so documents packed into
one row do not see each other. RoPE needs no restart per document: its scores depend on the distance
between positions only.

Parameter names are a contract (checkpoints and the HF importer use them):
``tok_emb.weight``, ``layers.{i}.attn_norm.weight``, ``layers.{i}.attn.wq/wk/wv/wo.weight``
(+ ``.bias`` on wq/wk/wv with ``attn_bias``), ``layers.{i}.attn.q_norm/k_norm.weight`` (``qk_norm``),
``layers.{i}.ffn_norm.weight``, ``layers.{i}.moe.*`` (MoE layers) or ``layers.{i}.mlp.w1/w2/w3.weight``
(dense layers), ``norm.weight``, ``lm_head.weight`` (absent with ``tie_embeddings``).

RoPE uses the HF "rotate_half" convention (Llama / Mixtral / Qwen2 / OLMoE in transformers), so HF
q/k projection weights load unpermuted. The model holds no buffers of its own: cos/sin are computed
per call from the positions (cheap, and nothing to re-create after building on the meta device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from semoe.config import ModelConfig
from semoe.layers import MoELayer, MoEOutput, MoEStats
from semoe.layers.losses import pooled_load_balancing_loss
from semoe.precision import autocast_dtype, upcast


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, computed in at least float32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions_S: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, K] (float32) for the given integer positions, HF layout (frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                              device=positions_S.device) / head_dim))
    freqs_SK2 = positions_S.float()[:, None] * inv_freq[None, :]
    emb_SK = torch.cat((freqs_SK2, freqs_SK2), dim=-1)
    return emb_SK.cos(), emb_SK.sin()


def apply_rope(x_BHSK: torch.Tensor, cos_SK: torch.Tensor, sin_SK: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in at least float32, back in the input dtype."""
    xf = upcast(x_BHSK)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos_SK + rotated * sin_SK).to(x_BHSK.dtype)


SMALL_HEAD = 64  # below this head size a 16-bit CPU training pass runs attention in float32 (see _attention)


def _attention(q_BHSK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, **kw) -> torch.Tensor:
    """``scaled_dot_product_attention``; a CPU training pass (grad on) in bfloat16/float16 with heads smaller than
    ``SMALL_HEAD`` computes it in float32 and returns the 16-bit dtype. Why: torch's CPU flash-attention backward is
    slow in 16 bits at small heads (2-vCPU Xeon with AMX, torch 2.13, one causal ``[48, 4, 128, 32]`` layer:
    forward / backward 3.1 / 37.5 ms in bf16, 3.5 / 8.9 ms in float32), while at heads of 64 and 128 bf16 is the
    faster (``[8, 8, 512, 64]``: 9.2 / 51.0 ms against 25.2 / 66.4 upcast). Inference keeps the 16-bit kernels."""
    dt = autocast_dtype("cpu") if q_BHSK.device.type == "cpu" else None
    dt = dt or q_BHSK.dtype
    if (q_BHSK.device.type == "cpu" and dt in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and q_BHSK.shape[-1] < SMALL_HEAD):
        with torch.autocast("cpu", enabled=False):
            # the inputs as autocast would give them (16-bit), computed in float32
            q, k, v = (t.to(dt).float() for t in (q_BHSK, k_BHLK, v_BHLK))
            y = F.scaled_dot_product_attention(q, k, v, **kw)
        return y.to(dt)
    return F.scaled_dot_product_attention(q_BHSK, k_BHLK, v_BHLK, **kw)


@dataclass
class KVCache:
    """Preallocated keys and values of every layer, ``[B, G, max_len, K]`` each, and how many
    positions are filled. Build it with :meth:`MoETransformer.new_cache`."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def reset(self) -> None:
        """Forget the cached positions (the storage is reused)."""
        self.length = 0


@dataclass
class ModelOutput:
    """``logits`` [B, S, V] float32 (float64 for a float64 model); ``router_loss``: sum over MoE layers of
    their weighted router losses (add it to the LM loss); ``aux_loss`` / ``z_loss``: unweighted sums, for logging;
    ``moe_stats``: one entry per MoE layer, in layer order."""

    logits: torch.Tensor
    router_loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    moe_stats: list[MoEStats] = field(default_factory=list)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE, optional q/k bias and OLMoE-style q/k norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        self.n_heads, self.n_kv_heads, self.head_dim = H, G, K
        self.wq = nn.Linear(D, H * K, bias=cfg.attn_bias)
        self.wk = nn.Linear(D, G * K, bias=cfg.attn_bias)
        self.wv = nn.Linear(D, G * K, bias=cfg.attn_bias)
        self.wo = nn.Linear(H * K, D, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H * K, cfg.norm_eps)
            self.k_norm = RMSNorm(G * K, cfg.norm_eps)

    def forward(self, x_BSD: torch.Tensor, cos_SK: torch.Tensor, sin_SK: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0,
                mask_BSS: torch.Tensor | None = None) -> torch.Tensor:
        """``kv``: this layer's cache tensors; the new positions are written at ``start``..start+S-1.
        ``mask_BSS``: which keys each query sees (True: attend), for packed documents without a cache."""
        B, S, _ = x_BSD.shape
        H, G, K = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHSK = apply_rope(q.view(B, S, H, K).transpose(1, 2), cos_SK, sin_SK)
        k_BGLK = apply_rope(k.view(B, S, G, K).transpose(1, 2), cos_SK, sin_SK)
        v_BGLK = v.view(B, S, G, K).transpose(1, 2)
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:, :, start:start + S] = k_BGLK
            v_cache[:, :, start:start + S] = v_BGLK
            k_BGLK, v_BGLK = k_cache[:, :, :start + S], v_cache[:, :, :start + S]
        if G != H:
            k_BGLK = k_BGLK.repeat_interleave(H // G, dim=1)  # -> [B, H, L, K]
            v_BGLK = v_BGLK.repeat_interleave(H // G, dim=1)
        if mask_BSS is not None:  # packed documents: causal inside each document
            y_BHSK = _attention(q_BHSK, k_BGLK, v_BGLK, attn_mask=mask_BSS[:, None])
        elif start == 0:  # L == S: plain causal
            y_BHSK = _attention(q_BHSK, k_BGLK, v_BGLK, is_causal=True)
        elif S == 1:  # one new token sees everything cached
            y_BHSK = _attention(q_BHSK, k_BGLK, v_BGLK)
        else:  # chunk after a prefix: query i (position start+i) sees keys 0..start+i
            L = start + S
            pos_S = torch.arange(start, L, device=x_BSD.device)
            mask_SL = torch.arange(L, device=x_BSD.device)[None, :] <= pos_S[:, None]
            y_BHSK = _attention(q_BHSK, k_BGLK, v_BGLK, attn_mask=mask_SL)
        return self.wo(y_BHSK.transpose(1, 2).reshape(B, S, H * K))


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``+ ffn(norm(.))`` with an MoE or dense FFN."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        if self.is_moe:
            self.moe = MoELayer(cfg.moe)
        else:
            self.mlp = MLP(cfg.d_model, cfg.dense_d_ff)

    def forward(self, x_BSD: torch.Tensor, cos_SK: torch.Tensor, sin_SK: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0, mask_BSS: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEOutput | None]:
        h_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SK, sin_SK, kv, start, mask_BSS)
        if self.is_moe:
            mo = self.moe(self.ffn_norm(h_BSD))
            return h_BSD + mo.out, mo
        return h_BSD + self.mlp(self.ffn_norm(h_BSD)), None


class MoETransformer(nn.Module):
    """Decoder-only MoE language model. ``forward(tokens [B, S], cache=None) -> ModelOutput``.

    MoE layers with a capacity factor drop tokens depending on the whole batch, so exact causality
    and cache/no-cache equality hold for dropless routing (``capacity_factor=None``) only.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.dim_per_head % 2:
            raise ValueError(f"head dim {cfg.dim_per_head} must be even for RoPE; change head_dim or n_heads")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(init_std) for linear and embedding weights, output projections (attn.wo, mlp.w2)
        scaled by 1/sqrt(2 n_layers), zero biases, norms at one. MoE layers keep their own init."""
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, m in self.named_modules():
            if ".moe" in name:
                continue
            if isinstance(m, nn.Linear):
                std = out_std if name.endswith(("attn.wo", "mlp.w2")) else cfg.init_std
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=cfg.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def new_cache(self, batch: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions (default device and
        dtype: those of the embedding)."""
        cfg = self.cfg
        if batch < 1 or max_len < 1:
            raise ValueError(f"new_cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        device = device if device is not None else self.tok_emb.weight.device
        dtype = dtype if dtype is not None else self.tok_emb.weight.dtype
        shape = (batch, cfg.kv_heads, max_len, cfg.dim_per_head)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        return KVCache(k=k, v=v, length=0)

    def _check_tokens(self, tokens: torch.Tensor, cache: KVCache | None) -> None:
        cfg = self.cfg
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer token ids (int64), got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape [batch, seq] with seq >= 1, got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got min {int(tokens.min())}, "
                             f"max {int(tokens.max())}")
        start = cache.length if cache is not None else 0
        end = start + tokens.shape[1]
        if end > cfg.max_seq_len:
            raise ValueError(f"sequence of {end} positions exceeds max_seq_len={cfg.max_seq_len}; "
                             "shorten the input or raise max_seq_len")
        if cache is not None:
            if cache.batch != tokens.shape[0]:
                raise ValueError(f"cache batch {cache.batch} != tokens batch {tokens.shape[0]}")
            if end > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} positions, {end} needed; make a larger cache")

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                doc_ids: torch.Tensor | None = None) -> ModelOutput:
        """``tokens`` [B, S] int64. With ``cache``, the new positions follow the cached ones (RoPE at
        their offsets), attend to everything cached, and are appended to the cache. ``doc_ids`` [B, S]
        (integers, no cache): packed documents, each position attends to earlier ones of its document only."""
        self._check_tokens(tokens, cache)
        mask_BSS = document_mask(doc_ids, tokens, cache)
        cfg = self.cfg
        S = tokens.shape[1]
        start = cache.length if cache is not None else 0
        pos_S = torch.arange(start, start + S, device=tokens.device)
        cos_SK, sin_SK = rope_cos_sin(pos_S, cfg.dim_per_head, cfg.rope_theta)

        x_BSD = self.tok_emb(tokens)
        moe_outs: list[MoEOutput] = []
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x_BSD, mo = layer(x_BSD, cos_SK, sin_SK, kv, start, mask_BSS)
            if mo is not None:
                moe_outs.append(mo)
        if cache is not None:
            cache.length = start + S

        h_BSD = self.norm(x_BSD)
        if self.lm_head is None:
            logits_BSV = F.linear(h_BSD, self.tok_emb.weight)
        else:
            logits_BSV = self.lm_head(h_BSD)

        zero = torch.zeros((), device=tokens.device, dtype=torch.float32)
        router_loss = sum((m.router_loss for m in moe_outs), zero)
        aux_loss = sum((m.aux_loss for m in moe_outs), zero)
        parts = [m.balance for m in moe_outs if m.balance is not None]
        if parts:  # router.aux_loss_scope == "model": one load-balancing loss pooled over the layers (HF's)
            aux_loss = pooled_load_balancing_loss([p.prob_sum_E for p in parts], [p.group_prob_sum_E for p in parts],
                                                  [p.routed_E for p in parts], [p.tokens for p in parts],
                                                  parts[0].ep_size)
            router_loss = router_loss + cfg.moe.router.aux_loss_coef * aux_loss
        return ModelOutput(
            logits=upcast(logits_BSV),
            router_loss=router_loss,
            aux_loss=aux_loss,
            z_loss=sum((m.z_loss for m in moe_outs), zero),
            moe_stats=[m.stats for m in moe_outs],
        )


def document_mask(doc_ids: torch.Tensor | None, tokens: torch.Tensor, cache: KVCache | None) -> torch.Tensor | None:
    """The [B, S, S] attention mask of packed documents (query i sees key j <= i of the same document), or
    None when there is nothing to mask beyond plain causality (no ``doc_ids``, or one document per row)."""
    if doc_ids is None:
        return None
    if cache is not None:
        raise ValueError("doc_ids (packed documents) work without a KV cache only; generate one sequence per row")
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.shape != tokens.shape or doc_ids.is_floating_point():
        raise ValueError(f"doc_ids must be an integer tensor shaped like tokens {tuple(tokens.shape)}, got "
                         f"{getattr(doc_ids, 'dtype', type(doc_ids).__name__)} {tuple(getattr(doc_ids, 'shape', ()))}")
    if bool((doc_ids == doc_ids[:, :1]).all()):
        return None
    S = tokens.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=tokens.device).tril()
    doc = doc_ids.to(tokens.device)
    return (doc[:, :, None] == doc[:, None, :]) & causal_SS


def num_params(model: nn.Module) -> int:
    """Number of parameters (shared ones, like tied embeddings, counted once)."""
    return sum(p.numel() for p in model.parameters())


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers, in order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


__all__ = ["MLP", "Attention", "Block", "KVCache", "MoETransformer", "ModelOutput", "RMSNorm", "apply_rope",
           "document_mask", "moe_layers", "num_params", "rope_cos_sin"]
