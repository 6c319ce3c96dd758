"""Convert between HF checkpoint folders (Mixtral, Qwen2-MoE, OLMoE) and semoe checkpoints, one tensor at a time.

HF -> semoe (:func:`convert_hf_checkpoint`):

The output is a semoe checkpoint folder (``storage/checkpoint.py`` format): ``model-dense.safetensors``
with every non-expert parameter and the model's persistent buffers, ``model-experts-LLLLL.safetensors``
with one tensor per global expert id of MoE layer L (``layers.L.moe.experts.E.w1`` ``[D, F]``, ``w3``,
``w2`` ``[F, D]``), ``manifest.json`` (format, version, the run config holding the model config, the
EOS ids, the byte size and sha256 of every file) and ``tokenizer.json`` when the source has one.

Memory stays bounded by one HF tensor (plus its converted copy): every output file's header is
computed up front from the source headers (:func:`semoe.models.hf.converted_shapes`), then each source
tensor is read with positional reads (no memory map), converted by the one HF mapping
(:func:`semoe.models.hf.convert_tensor`) and written at its place. The folder is written under a
temporary name, fsynced and renamed, so a failed conversion leaves nothing that looks like a checkpoint.
The HF side files (config.json, generation_config.json, tokenizer_config.json, special_tokens_map.json) travel
along as ``hf_*.json`` and ``manifest["hf_source"]`` records the source, for the way back.

semoe -> HF (:func:`convert_to_hf`): a semoe checkpoint (of ``semoe train``, ``--init-from`` fine-tunes
included, or of ``convert --from-hf``) becomes an HF folder: ``config.json`` (the original one when the model
still has its config, else written from the model config: :func:`semoe.models.hf.hf_config_from_semoe`),
safetensors shards of at most ``max_shard_size`` with ``model.safetensors.index.json`` (a single
``model.safetensors`` when one shard holds everything, as ``save_pretrained`` does), ``generation_config.json``,
``tokenizer.json`` and ``tokenizer_config.json`` (+ ``special_tokens_map.json`` when the source had one). Tensors
use the per-expert keys (``...experts.{e}.w1.weight``; see ``semoe.models.hf``), each a transpose or copy of
the semoe tensor, so HF -> semoe -> HF without training gives back the original tensors bit for bit. A model
trained with semoe alone is exported as the HF architecture that computes the same function, or refused with
the reasons (GELU experts, a router HF does not have, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from semoe.config import RunConfig, from_dict, to_dict
from semoe.inference.load import resolve_checkpoint
from semoe.inference.ring import parse_size
from semoe.inference.sections import build_meta_model, inspect_hf_folder
from semoe.models.hf import (
    HF_SIDE_FILES,
    convert_tensor,
    converted_shapes,
    export_tensor,
    hf_config_from_semoe,
    hf_export_plan,
    hf_key_to_semoe,
    hf_source_record,
    semoe_param_slot,
)
from semoe.storage import checkpoint as ckpt
from semoe.storage.safetensors_io import SafetensorsReader, SafetensorsWriter, TensorInfo, read_header

log = logging.getLogger(__name__)

__all__ = ["convert_hf_checkpoint", "convert_to_hf"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def _staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder next to ``out``; on success publish it as ``out`` in one rename (``out``
    is absent or empty: the callers check), on any error remove it, so ``out`` is never half-written."""
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        ckpt._fsync_dir(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        ckpt._fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _file_for(name: str) -> str:
    stacked, e = semoe_param_slot(name)
    if e is None:
        return "model-dense.safetensors"
    return f"model-experts-{int(stacked.split('.')[1]):05d}.safetensors"


def convert_hf_checkpoint(src: str | Path, out: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """Write the semoe checkpoint of the HF checkpoint folder ``src`` to the new folder ``out``; returns it.
    ``dtype``: cast the weights ("float32", "bfloat16", "float16"; default: as stored)."""
    src, out = Path(src), Path(out)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if not src.is_dir():
        raise FileNotFoundError(f"HF checkpoint folder {src} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not empty; choose a new folder")
    hf, cfg, tied, files = inspect_hf_folder(src)
    mt = hf["model_type"]

    # 1. every output tensor's dtype and shape, from the headers alone
    plan = []
    specs: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
    for f, keys in files:
        header = read_header(f)
        items = []
        for key in keys:
            if key not in header:
                raise ValueError(f"tensor {key!r} is listed for {f.name} but that file does not contain it")
            maps = hf_key_to_semoe(mt, key)
            if not maps or (tied and key == "lm_head.weight"):
                continue
            info = header[key]
            if not info.dtype.is_floating_point:
                raise ValueError(f"tensor {key!r} in {f} has dtype {info.dtype}; only floating-point weights are "
                                 "converted (quantized checkpoints are not supported)")
            for tmap in maps:
                for name, shape in converted_shapes(tmap, info.shape):
                    specs.setdefault(_file_for(name), {})[name] = (dtype or info.dtype, shape)
            items.append((key, maps))
        plan.append((f, header, items))
    meta = build_meta_model(cfg)
    params = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    got: dict[str, int] = {}
    for file_specs in specs.values():
        for name in file_specs:
            stacked, _ = semoe_param_slot(name)
            got[stacked] = got.get(stacked, 0) + 1
    missing = [n for n in params if n not in got]
    wrong = [n for n, c in got.items() if n not in params or (".moe.experts.w" in n and c != params[n][0])]
    if missing or wrong:
        raise ValueError(f"{src}: the weights do not match config.json (missing {missing[:5]}, unexpected or "
                         f"incomplete {wrong[:5]}); is the checkpoint complete?")
    for name, b in meta.state_dict().items():  # persistent buffers (router expert_bias, call counter): zero
        if name not in params:
            specs["model-dense.safetensors"][name] = (b.dtype, tuple(b.shape))

    # 2. stream: one source tensor in memory at a time
    with _staged_dir(out) as tmp:
        writers = {fname: SafetensorsWriter(tmp / fname, s, metadata={"format": "pt"}) for fname, s in specs.items()}
        try:
            for f, header, items in plan:
                with SafetensorsReader(f, header) as reader:
                    for key, maps in items:
                        t = reader.read(key)
                        if dtype is not None:
                            t = t.to(dtype)
                        for tmap in maps:
                            for name, x in convert_tensor(tmap, t):
                                writers[_file_for(name)].write(name, x)
                        del t
            for name, b in meta.state_dict().items():
                if name not in params:
                    writers["model-dense.safetensors"].write(name, torch.zeros(b.shape, dtype=b.dtype))
        finally:
            for w in writers.values():
                w.close()
        for name, dst in [("tokenizer.json", "tokenizer.json"), *HF_SIDE_FILES.items()]:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / dst)
                ckpt._fsync_file(tmp / dst)
        eos = hf.get("eos_token_id")
        gen = src / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        files_meta = {p.name: {"bytes": p.stat().st_size, "sha256": ckpt._sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 0, "config": to_dict(RunConfig(model=cfg)),
                    "hf_source": hf_source_record(src), "eos_token_ids": eos_ids,
                    "files": files_meta}
        ckpt._write_json_atomic(tmp / ckpt.MANIFEST, manifest)
    log.info("converted %s checkpoint %s -> %s (%d files)", mt, src, out, len(files_meta))
    return out


# ------------------------------------------------------------------------------------- semoe -> HF


def _dtype_arg(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    ckpt._fsync_file(path)


def convert_to_hf(src: str | Path, out: str | Path, dtype: str | torch.dtype | None = None,
                  max_shard_size: str | int = "5GB") -> Path:
    """Write the HF checkpoint folder of the semoe checkpoint ``src`` (a step folder, a run's checkpoints folder
    or its run folder) to the new folder ``out``; returns it. ``dtype``: of the written weights (default: the
    dtype of the HF checkpoint the model came from, else as stored). One tensor in memory at a time."""
    src, out = Path(src), Path(out)
    dtype = _dtype_arg(dtype)
    max_bytes = parse_size(max_shard_size)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not empty; choose a new folder")
    step = resolve_checkpoint(src)
    manifest = ckpt.read_manifest(step, verify=True)
    try:
        cfg = from_dict(RunConfig, manifest["config"]).model
    except KeyError as e:
        raise ValueError(f"{step / ckpt.MANIFEST} has no model config; it was not written by semoe") from e
    origin = manifest.get("hf_source") or {}
    base = _json(step / HF_SIDE_FILES["config.json"])

    # where every semoe tensor lies (headers only)
    where: dict[str, tuple[Path, TensorInfo]] = {}
    for f in sorted(step.glob("model-*.safetensors")):
        for name, info in read_header(f).tensors.items():
            where[name] = (f, info)
    if dtype is None:  # the source's dtype, else the stored one (of the embedding: buffers are integers)
        stored = where["tok_emb.weight"][1].dtype if "tok_emb.weight" in where else torch.float32
        dtype = _DTYPES.get(origin.get("dtype", ""), stored)
    hf_cfg = hf_config_from_semoe(cfg, origin.get("model_type"), base, dtype)
    mt = hf_cfg["model_type"]
    for name, (f, _info) in where.items():  # the aux-loss-free bias changes routing: HF has no such bias
        if name.endswith(".router.expert_bias"):
            with SafetensorsReader(f) as r:
                if bool(r.read(name).ne(0).any()):
                    raise ValueError(f"{name} is not zero (aux-loss-free balancing was trained); HF routers have "
                                     "no selection bias, so the exported model would route differently")
    plan = hf_export_plan(mt, cfg)
    missing = [t.name for _, t in plan if t.name not in where]
    if missing:
        raise ValueError(f"checkpoint {step} lacks tensors for {missing[:5]}; it is incomplete or of another model")

    # shards of at most max_bytes, in the plan's (layer) order
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for key, tmap in plan:
        n = where[tmap.name][1].numel * dtype.itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, tmap.name))
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    maps = dict(plan)

    with _staged_dir(out) as tmp:
        readers: dict[Path, SafetensorsReader] = {}
        weight_map: dict[str, str] = {}
        total = 0
        try:
            for fname, items in zip(names, shards):
                specs = {}
                for key, name in items:
                    info = where[name][1]
                    shape = info.shape[::-1] if maps[key].op == "t" else info.shape
                    specs[key] = (dtype, shape)
                with SafetensorsWriter(tmp / fname, specs, metadata={"format": "pt"}) as w:
                    for key, name in items:
                        f, info = where[name]
                        reader = readers.get(f) or readers.setdefault(f, SafetensorsReader(f))
                        t = export_tensor(maps[key], reader.read(name)).to(dtype)
                        w.write(key, t)
                        weight_map[key] = fname
                        total += t.numel() * t.element_size()
                        del t
        finally:
            for r in readers.values():
                r.close()
        if len(shards) > 1:
            _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                               "weight_map": weight_map})
        _write_side_files(step, tmp, hf_cfg, manifest, cfg.max_seq_len)
    log.info("exported %s -> %s (%s, %d shard(s), %.1f MiB)", step, out, mt, len(shards), total / 2**20)
    return out


def _write_side_files(step: Path, tmp: Path, hf_cfg: dict, manifest: dict, max_seq_len: int) -> None:
    """config.json, generation_config.json and the tokenizer files: the source's where the checkpoint carries
    them, else written for semoe's own byte-level BPE (its ``<|endoftext|>`` as EOS)."""
    gen = _json(step / HF_SIDE_FILES["generation_config.json"])
    tcfg = _json(step / HF_SIDE_FILES["tokenizer_config.json"])
    tok_file = step / "tokenizer.json"
    eos_ids = [int(e) for e in manifest.get("eos_token_ids") or []]
    if tok_file.is_file():
        shutil.copyfile(tok_file, tmp / "tokenizer.json")
        ckpt._fsync_file(tmp / "tokenizer.json")
        if not eos_ids and tcfg is None:
            from tokenizers import Tokenizer

            eid = Tokenizer.from_file(str(tok_file)).token_to_id("<|endoftext|>")
            eos_ids = [eid] if eid is not None else []
            if eid is not None:
                tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                        "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}
    else:
        log.warning("%s has no tokenizer.json; the exported folder has none either", step)
    if "eos_token_id" not in hf_cfg and eos_ids:
        hf_cfg = {**hf_cfg, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    _write_json(tmp / "config.json", hf_cfg)
    if gen is None:
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None}
    _write_json(tmp / "generation_config.json", gen)
    if tcfg is not None:
        _write_json(tmp / "tokenizer_config.json", tcfg)
    stm = step / HF_SIDE_FILES["special_tokens_map.json"]
    if stm.is_file():
        shutil.copyfile(stm, tmp / "special_tokens_map.json")
