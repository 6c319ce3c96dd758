"""Convert an HF checkpoint folder (Mixtral, Qwen2-MoE, OLMoE) into a semoe checkpoint, one tensor at a time.

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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from semoe.config import RunConfig, to_dict
from semoe.inference.sections import build_meta_model, inspect_hf_folder
from semoe.models.hf import (
    convert_tensor,
    converted_shapes,
    hf_key_to_semoe,
    semoe_param_slot,
)
from semoe.storage import checkpoint as ckpt
from semoe.storage.safetensors_io import SafetensorsReader, SafetensorsWriter, read_header

log = logging.getLogger(__name__)

__all__ = ["convert_hf_checkpoint"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
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
        if (src / "tokenizer.json").is_file():
            shutil.copyfile(src / "tokenizer.json", tmp / "tokenizer.json")
            ckpt._fsync_file(tmp / "tokenizer.json")
        eos = hf.get("eos_token_id")
        gen = src / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        files_meta = {p.name: {"bytes": p.stat().st_size, "sha256": ckpt._sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 0, "config": to_dict(RunConfig(model=cfg)),
                    "source": {"hf_folder": str(src.resolve()), "model_type": mt}, "eos_token_ids": eos_ids,
                    "files": files_meta}
        ckpt._write_json_atomic(tmp / ckpt.MANIFEST, manifest)
        ckpt._fsync_dir(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
        ckpt._fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s checkpoint %s -> %s (%d files)", mt, src, out, len(files_meta))
    return out
