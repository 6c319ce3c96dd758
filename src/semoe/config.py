"""Frozen dataclass configs of plain values.

Every knob of semoe is a field here; recipes (``semoe.models.recipes``) are plain
Python functions returning these. Validation happens in ``__post_init__`` and
raises ``ValueError`` naming the field and the fix, so a bad config fails at
construction, before anything is allocated or written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

RouterKind = Literal["topk", "expert_choice"]
AuxLossScope = Literal["layer", "model"]
ScoreFunc = Literal["softmax", "sigmoid"]
NoiseKind = Literal["none", "gaussian", "jitter"]
SecondExpertPolicy = Literal["topk", "random"]
DropPolicy = Literal["position", "score"]
Activation = Literal["swiglu", "gelu"]
ExpertImpl = Literal["grouped_mm", "loop", "padded"]


def _check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


def _check_positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        hint = " (or None for dropless)" if allow_none else ""
        raise ValueError(f"{name} must be > 0{hint}, got {value!r}")


@dataclass(frozen=True)
class RouterConfig:
    """How tokens pick experts.

    kind:            "topk" (each token picks ``top_k`` experts; k=1 Switch, k=2 GShard) or
                     "expert_choice" (each expert picks its top-C tokens; C from ``capacity_factor``).
    score_func:      "softmax" over experts, or independent "sigmoid" scores (DeepSeek-V3 style).
    normalize_topk:  renormalise the selected probabilities to sum to 1 (Mixtral style).
    noise:           training-only: "gaussian" = noisy top-k (Shazeer, learned noise scale),
                     "jitter" = multiplicative uniform noise on the router input (Switch).
    second_expert:   "random" = GShard random routing: the 2nd expert is kept with probability
                     min(1, 2 * g2 / (g1 + g2)); only for top_k == 2.
    capacity_factor: per-expert capacity = ceil(cf * top_k * tokens / num_experts) over the whole
                     expert-parallel batch, at least ``min_capacity``; ``None`` = dropless.
    eval_capacity_factor: the same in eval mode.
    drop_policy:     which assignments an over-full expert drops: "position" keeps first choices before
                     second choices, then earlier tokens (rank-major global order); "score" keeps the
                     highest router probabilities.
    aux_loss_coef / z_loss_coef: weights of the load-balancing loss and the router z-loss.
    aux_loss_scope:  "layer": each MoE layer's Switch/GShard loss (fraction of *assignments* per expert
                     times mean probability, times E), summed over layers. "model": transformers'
                     ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE, OLMoE): assignments per *token* and
                     probabilities pooled over the rows of every MoE layer, ``E * sum_e (C_e / N) (P_e / N)``,
                     one loss for the whole model (what the HF importer sets, so fine-tuning keeps HF's loss).
    bias_update_rate: > 0 enables auxiliary-loss-free balancing: a per-expert bias added to the
                     scores for selection only, moved by this rate towards equal load after every
                     training forward.
    seed:            seed of the layer's own noise generator (no global RNG is touched).
    """

    kind: RouterKind = "topk"
    top_k: int = 2
    score_func: ScoreFunc = "softmax"
    normalize_topk: bool = False
    noise: NoiseKind = "none"
    jitter_eps: float = 0.01
    second_expert: SecondExpertPolicy = "topk"
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    min_capacity: int = 4
    drop_policy: DropPolicy = "position"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    aux_loss_scope: AuxLossScope = "layer"
    bias_update_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("router.kind", self.kind, ("topk", "expert_choice"))
        _check_choice("router.score_func", self.score_func, ("softmax", "sigmoid"))
        _check_choice("router.noise", self.noise, ("none", "gaussian", "jitter"))
        _check_choice("router.second_expert", self.second_expert, ("topk", "random"))
        _check_choice("router.drop_policy", self.drop_policy, ("position", "score"))
        _check_choice("router.aux_loss_scope", self.aux_loss_scope, ("layer", "model"))
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"router.top_k must be an integer >= 1, got {self.top_k!r}")
        _check_positive("router.capacity_factor", self.capacity_factor, allow_none=True)
        _check_positive("router.eval_capacity_factor", self.eval_capacity_factor, allow_none=True)
        if self.kind == "expert_choice" and self.capacity_factor is None:
            raise ValueError("router.kind='expert_choice' needs a capacity_factor (each expert takes C tokens)")
        if self.second_expert == "random" and self.top_k != 2:
            raise ValueError("router.second_expert='random' (GShard) needs top_k=2")
        if self.min_capacity < 0:
            raise ValueError(f"router.min_capacity must be >= 0, got {self.min_capacity}")
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ValueError(f"router.jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0 or self.bias_update_rate < 0:
            raise ValueError("router.aux_loss_coef, z_loss_coef and bias_update_rate must be >= 0")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE feed-forward layer.

    d_ff is the hidden size of each routed expert; shared experts (Qwen/DeepSeek style) see every
    token and have ``shared_d_ff`` hidden units in total. ``shared_expert_gate`` multiplies the
    shared output by sigmoid(x @ g) (Qwen2-MoE). ``expert_impl``: "grouped_mm" (one grouped GEMM
    over the sorted tokens), "loop" (per-expert reference), "padded" (capacity-padded
    [E, C, D] batched GEMM: static shapes, capacity mode only).
    """

    d_model: int = 512
    d_ff: int = 2048
    num_experts: int = 8
    activation: Activation = "gelu"
    router: RouterConfig = field(default_factory=RouterConfig)
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    expert_impl: ExpertImpl = "grouped_mm"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"moe.{name} must be a positive integer, got {v!r}")
        _check_choice("moe.activation", self.activation, ("swiglu", "gelu"))
        _check_choice("moe.expert_impl", self.expert_impl, ("grouped_mm", "loop", "padded"))
        if self.router.kind == "topk" and self.router.top_k > self.num_experts:
            raise ValueError(
                f"router.top_k={self.router.top_k} exceeds moe.num_experts={self.num_experts}; "
                "lower top_k or add experts"
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"moe.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.expert_impl == "padded" and (
            self.router.capacity_factor is None or self.router.eval_capacity_factor is None
        ):
            raise ValueError("moe.expert_impl='padded' needs a capacity factor for train and eval; "
                             "use expert_impl='grouped_mm' for dropless routing")

    @property
    def shared_hidden(self) -> int:
        return self.shared_d_ff if self.shared_d_ff is not None else self.d_ff * self.num_shared_experts


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout and communication switches (each one on its own, so a benchmark can toggle it).

    ep_size:          ranks that share one copy of all experts; world/ep_size replicas of it.
                      0 means every rank of the world (the default: pure expert parallelism).
    ranks_per_node:   ranks on each node; None: torchrun's LOCAL_WORLD_SIZE (one node without torchrun).
                      Must divide the world size. Tests set it to emulate several nodes on one machine.
    grad_fusion:      gradients of each class (dense / router / expert) in preallocated flat buckets,
                      each all-reduced asynchronously during backward as soon as it is complete
                      (``semoe.parallel.fusion``; the default: equal to the plain path, tested);
                      False: one synchronous reduction per class after backward.
    bucket_mb:        size of a fusion bucket in MiB (> 0).
    hierarchical_grads: fusion buckets of every class whose group spans nodes are reduced in two levels
                      (reduce-scatter in the node, all-reduce across nodes per local rank, all-gather in the
                      node): each gradient crosses the node boundary once. Needs grad_fusion.
    hierarchical_a2a: two-hop all-to-all (inside the node, then across nodes on rails) with node-level
                      de-duplication of the dispatch; results bit-equal to the flat one.
    a2a_chunks:       split the dispatch in this many chunks and overlap each chunk's all-to-all with the
                      experts of the previous one, forward and backward (1: no overlap).
    a2a_wire_dtype:   "same" (rows travel in their own dtype) or "bfloat16": float32 tokens and their
                      gradients cross the all-to-all in bfloat16 (half the bytes; lossy, ~3 significant digits).
    fsdp:             shard the dense parameters, their gradients and AdamW moments over all ranks with FSDP2
                      (``semoe.parallel.fsdp.apply_fsdp``; the experts stay out of it, sharded over ``ep`` or in
                      the expert store). FSDP reduce-scatters the dense gradients itself, so ``grad_fusion`` then
                      covers nothing dense and is not used (the experts are reduced after backward). No-op in one
                      process. Checkpoints stay the one layout-free format (full dense tensors).
    """

    ep_size: int = 0
    ranks_per_node: int | None = None
    grad_fusion: bool = True
    bucket_mb: float = 25.0
    hierarchical_grads: bool = False
    hierarchical_a2a: bool = False
    a2a_chunks: int = 1
    a2a_wire_dtype: Literal["same", "bfloat16"] = "same"
    fsdp: bool = False

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.ep_size) or self.ep_size < 0:
            raise ValueError(f"parallel.ep_size must be an integer >= 1 (or 0 for the whole world), "
                             f"got {self.ep_size!r}")
        if self.ranks_per_node is not None and (not is_int(self.ranks_per_node) or self.ranks_per_node < 1):
            raise ValueError(f"parallel.ranks_per_node must be an integer >= 1 (or None for torchrun's "
                             f"LOCAL_WORLD_SIZE), got {self.ranks_per_node!r}")
        if isinstance(self.bucket_mb, bool) or not isinstance(self.bucket_mb, (int, float)) or not self.bucket_mb > 0:
            raise ValueError(f"parallel.bucket_mb must be > 0 (MiB per gradient bucket, e.g. 25), "
                             f"got {self.bucket_mb!r}")
        if self.hierarchical_grads and not self.grad_fusion:
            raise ValueError("parallel.hierarchical_grads reduces the fusion buckets: set parallel.grad_fusion=true "
                             "(or parallel.hierarchical_grads=false)")
        if self.hierarchical_grads and self.fsdp:
            raise ValueError("parallel.hierarchical_grads reduces the fusion buckets, but under parallel.fsdp FSDP "
                             "reduce-scatters the dense gradients itself: set one of them to false")
        _check_choice("parallel.a2a_wire_dtype", self.a2a_wire_dtype, ("same", "bfloat16"))
        if not is_int(self.a2a_chunks) or self.a2a_chunks < 1:
            raise ValueError(f"parallel.a2a_chunks must be an integer >= 1 (1 = no overlap), got {self.a2a_chunks!r}")

    def resolve_ep(self, world_size: int) -> int:
        return self.ep_size or world_size

    def wire_dtype(self) -> Any:
        """The torch dtype of ``a2a_wire_dtype`` (None for "same")."""
        import torch

        return None if self.a2a_wire_dtype == "same" else getattr(torch, self.a2a_wire_dtype)


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only MoE transformer. Layer i (0-based) has an MoE FFN when ``(i + 1) % moe_every == 0``
    (``moe_every=1``: every layer; HF's ``decoder_sparse_step``), else a dense SwiGLU of ``dense_d_ff``."""

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (grouped-query attention when smaller)
    head_dim: int | None = None  # None: d_model // n_heads
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    moe_every: int = 1
    dense_d_ff: int = 1024
    tie_embeddings: bool = False
    attn_bias: bool = False  # q/k/v projection bias (Qwen2-MoE)
    qk_norm: bool = False  # RMSNorm on the full q and k projections (OLMoE)
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(d_model=256, d_ff=512, num_experts=8))
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "moe_every", "dense_d_ff"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {v!r}")
        kv = self.kv_heads
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                             "set head_dim or change n_heads")
        if self.moe.d_model != self.d_model:
            raise ValueError(f"model.moe.d_model={self.moe.d_model} must equal model.d_model={self.d_model}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return (i + 1) % self.moe_every == 0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. ``batch_size`` is the *global* batch in sequences per optimizer
    step; each of the W data-parallel ranks runs ``grad_accum`` micro-batches of
    batch_size / (W * grad_accum) sequences. Keeping the global batch fixed is what lets a run resume
    on a different number of ranks with the same next-step loss.

    ``dtype`` is the compute precision. "bfloat16": mixed precision, the standard recipe: parameters,
    gradients and AdamW state stay float32 (the master weights), matmuls run in bfloat16 under autocast,
    the router, norms, softmax and the loss in float32. "float32": everything float32. "auto" (default):
    bfloat16 on CUDA and on CPUs whose bfloat16 matmul is fast (AMX / AVX-512 BF16, measured once, see
    ``semoe.precision``), float32 elsewhere. "float64": the whole model in float64, a reference precision
    for verifying that two layouts compute the same thing (slow; not for real training)."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    decay_norms_biases_router: bool = False  # False: no weight decay on norms, biases and router
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # <= 0 disables
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_last: int = 2
    log_every: int = 1
    seed: int = 1234
    val_fraction: float = 0.05
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = "auto"

    def __post_init__(self) -> None:
        _check_choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16", "float64"))
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "ckpt_every",
                     "keep_last", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {v!r}")
        if not (self.lr > 0 and self.min_lr >= 0):
            raise ValueError(f"train.lr must be > 0 and train.min_lr >= 0, got {self.lr}, {self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"train.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass(frozen=True)
class StorageConfig:
    """Hierarchical storage of the experts (``semoe.storage.expert_store`` / ``semoe.storage.offload``).

    budget_mb:     host memory (MiB) this rank's expert state (weights, gradients, AdamW moments) may occupy;
                   the rest lives on disk. 0 (default): no offload, everything in memory as usual.
    dir:           the store directory (one sub-folder per rank); None: ``<out>/expert_store``.
    prefetch_depth: the scheduler reads the experts of layers L+1..L+d (forward; L-1..L-d in backward; the next
                   d tensors in the optimizer) while layer L computes.
    io_threads:    reader/writer threads of the store.
    device_budget_mb: CUDA only: device memory for expert tensors in use (0: no limit besides the host budget).
    """

    budget_mb: float = 0.0
    dir: str | None = None
    prefetch_depth: int = 1
    io_threads: int = 2
    device_budget_mb: float = 0.0

    def __post_init__(self) -> None:
        for name in ("budget_mb", "device_budget_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"storage.{name} must be a number of MiB >= 0 (0 = off), got {v!r}")
        for name, lo in (("prefetch_depth", 0), ("io_threads", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"storage.{name} must be an integer >= {lo}, got {v!r}")

    @property
    def enabled(self) -> bool:
        return self.budget_mb > 0


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs. ``data``: a text file, folder or JSONL path; None = Shakespeare."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: str | None = None
    storage: StorageConfig = field(default_factory=StorageConfig)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that re-runs validation (it does: __post_init__ runs again)."""
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a (nested) config."""
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a JSON or command-line value to a field's annotated type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _coerce(value, options[0], where)
    if value is None:
        raise ValueError(f"{where} may not be None")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}={value!r} is not supported; choose one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build a (nested) config dataclass from a plain dict; unknown keys are an error."""
    types = _field_types(cls)
    unknown = set(data) - set(types)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}; "
                         f"known: {sorted(types)}")
    kwargs = {k: _coerce(v, types[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    import json

    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``section.field=value`` overrides (e.g. ``train.lr=1e-3``, ``model.moe.router.top_k=1``).
    An unknown key or a value of the wrong type raises ValueError naming it."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value, e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"unknown override key {key!r} (at {part!r}); known here: {known}")
            if i == len(parts) - 1:
                if isinstance(node[part], dict):
                    raise ValueError(f"override {key!r} names a section; set one of its fields: {sorted(node[part])}")
                node[part] = _parse_scalar(raw)
            else:
                node = node[part]
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    if "model.d_model" in keys and "model.moe.d_model" not in keys and data["model"].get("moe"):  # one knob
        data["model"]["moe"]["d_model"] = data["model"]["d_model"]
    try:
        return from_dict(type(cfg), data)
    except TypeError as e:  # e.g. a list where a number belongs
        raise ValueError(f"ill-typed override in {overrides}: {e}") from e


# ----------------------------------------------------------------------------- multi-task (elastic) training
@dataclass(frozen=True)
class MultiTaskModelConfig:
    """The multi-task MoE model (``semoe.models.multitask``): a per-task input stem (samples are short
    sequences of feature vectors), ``n_blocks`` residual MLP blocks, a task-routed MoE layer (UFO style: a
    shared expert plus one expert per task, mixed by a learned per-task policy) after every
    ``task_moe_every``-th block, an optional token-gated MoE layer (``token_moe``, the standard MoELayer)
    after the last block, mean pooling and a per-task head. The shared expert is ``shared_expert_d_ff`` wide
    (default: as wide as the task experts, ``task_expert_d_ff``)."""

    d_model: int = 64
    n_blocks: int = 2
    d_ff: int = 128
    task_moe_every: int = 1
    task_expert_d_ff: int = 128
    token_moe: MoEConfig | None = None
    init_std: float = 0.02
    shared_expert_d_ff: int | None = None  # the task-routed layers' shared expert; None: task_expert_d_ff

    def __post_init__(self) -> None:
        for name in ("d_model", "n_blocks", "d_ff", "task_moe_every", "task_expert_d_ff", "shared_expert_d_ff"):
            v = getattr(self, name)
            if name == "shared_expert_d_ff" and v is None:
                continue
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {v!r}")
        if self.token_moe is not None and self.token_moe.d_model != self.d_model:
            raise ValueError(f"model.token_moe.d_model={self.token_moe.d_model} must equal model.d_model="
                             f"{self.d_model}")


@dataclass(frozen=True)
class ElasticConfig:
    """Elastic placement of a multi-task run (``semoe.elastic``).

    tasks:         ``name=global_batch`` pairs, comma separated, e.g. ``synth=64,digits=32,cancer=16,wine=8``
                   (names from ``semoe.elastic.data.TASKS``).
    share_ranks:   small tasks may share a rank (False: every task needs ranks of its own).
    replan_every:  re-plan from the measured per-task step times every N steps (0: only at start and when the
                   world size changes).
    replan_gain:   re-plan only if the new plan's predicted busiest rank is this much lighter (fraction).
    max_restarts:  torchrun restarts of the whole job after a lost rank (``semoe train --max-restarts``).
    """

    tasks: str = "synth=64,digits=32,cancer=16,wine=8"
    share_ranks: bool = True
    replan_every: int = 0
    replan_gain: float = 0.1
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.replan_every, int) or self.replan_every < 0:
            raise ValueError(f"elastic.replan_every must be an integer >= 0 (0: never), got {self.replan_every!r}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0 (restarts of the job after a lost rank), got "
                             f"{self.max_restarts!r}")
        if not 0 <= self.replan_gain < 1:
            raise ValueError(f"elastic.replan_gain must be in [0, 1), got {self.replan_gain!r}")

    def task_batches(self) -> dict[str, int]:
        """{task: global batch} from ``tasks``; a malformed entry or a batch below 1 raises ValueError."""
        out: dict[str, int] = {}
        for item in (s.strip() for s in self.tasks.split(",")):
            name, sep, raw = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"elastic.tasks entry {item!r} must look like name=batch, e.g. digits=32")
            try:
                batch = int(raw)
            except ValueError:
                raise ValueError(f"elastic.tasks: the batch of {name!r} must be an integer, got {raw!r}") from None
            if batch < 1:
                raise ValueError(f"elastic.tasks: task {name!r} has global batch {batch}; every task needs a batch "
                                 ">= 1 (drop the task from elastic.tasks instead)")
            if name.strip() in out:
                raise ValueError(f"elastic.tasks names task {name!r} twice")
            out[name.strip()] = batch
        return out


@dataclass(frozen=True)
class MultiTaskRunConfig:
    """A multi-task run: model, optimisation (``train``: steps, lr, ... ; batch_size and seq_len are unused,
    the per-task batches are in ``elastic.tasks``) and the elastic placement."""

    model: MultiTaskModelConfig = field(default_factory=MultiTaskModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
