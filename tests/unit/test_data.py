"""Data pipeline: documents, tokenizer, corpus cache, windows, global-batch loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semoe.training import data
from semoe.training.data import (
    Document,
    GlobalBatchLoader,
    encode_documents,
    fetch_shakespeare,
    load_documents,
    prepare_corpus,
    split_windows,
    train_or_load_tokenizer,
)

TEXT = """First Citizen:
Before we proceed any further, hear me speak.

All:
    Speak, speak.   Indented line with  double  spaces.
\tTabbed line; numbers 12345 and émigré naïve — unicode ✓.


You are all resolved rather to die than to famish?
"""


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT * 40, encoding="utf-8")
    return p


# ---------------------------------------------------------------- documents


def test_load_txt_folder_jsonl(tmp_path: Path, text_file: Path) -> None:
    assert load_documents(text_file) == [Document(TEXT * 40)]
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "sub" / "a.md").write_text("# ay")
    (folder / "ignored.py").write_text("print()")
    (folder / "empty.txt").write_text("")
    assert load_documents(folder) == [Document("bee"), Document("# ay")]  # sorted by path: b.txt < empty.txt < sub/a.md
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two\nlines"}) + "\n")
    assert load_documents(jl) == [Document("one"), Document("two\nlines")]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "", "contains no text"),
        ("blank.jsonl", json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n", "contains no text"),
        ("bad.jsonl", json.dumps({"text": "ok"}) + "\n{not json\n", r"bad\.jsonl:2: invalid JSON"),
        ("nofield.jsonl", json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}), r":2: .*string \"text\""),
        ("nocompletion.jsonl", json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + json.dumps({"prompt": "q"}),
         r"nocompletion\.jsonl:3: \"completion\" is missing"),
        ("noprompt.jsonl", json.dumps({"completion": "b"}), r":1: \"prompt\" is missing"),
        ("intprompt.jsonl", json.dumps({"prompt": 1, "completion": "b"}), r":1: \"prompt\" must be a string"),
        ("both.jsonl", json.dumps({"text": "t", "prompt": "p", "completion": "c"}), r":1: has both"),
        ("nonstr.jsonl", json.dumps({"text": 3}) + "\n", r":1: .*string \"text\""),
        ("list.jsonl", "[1, 2]\n", r":1: .*JSON object"),
    ],
)
def test_load_errors(tmp_path: Path, name: str, content: str | None, match: str) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_documents(p)


def test_load_errors_folder_and_encoding(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"no \.txt or \.md files"):
        load_documents(tmp_path / "d")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_documents(tmp_path / "latin1.txt")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_and_cache(tmp_path: Path, text_file: Path) -> None:
    cache = tmp_path / "tok.json"
    tok = train_or_load_tokenizer(load_documents(text_file), 300, cache)
    assert cache.is_file()
    assert tok.get_vocab_size() <= 300 and tok.token_to_id("<|endoftext|>") is not None
    for s in (TEXT, "unseen wörds 😀 and\r\n  spaces ", " leading space"):
        assert tok.decode(tok.encode(s).ids) == s
    assert len(tok.encode(TEXT).ids) < len(TEXT.encode()) * 0.8  # merges were learnt
    again = train_or_load_tokenizer(["totally different text"], 300, cache)  # cached: not retrained
    assert again.to_str() == tok.to_str()
    with pytest.raises(ValueError, match="too small"):
        train_or_load_tokenizer(["x"], 100, tmp_path / "t2.json")


def test_chunked_encoding_equals_whole(tmp_path: Path, text_file: Path) -> None:
    text = text_file.read_text()
    tok = train_or_load_tokenizer([text], 400, tmp_path / "tok.json")
    chunks = list(data._chunks(text, target=50))
    assert len(chunks) > 10 and "".join(chunks) == text
    whole = tok.encode(text).ids
    assert [i for c in chunks for i in tok.encode(c).ids] == whole
    stream = encode_documents(tok, [text, "second doc"])
    eos = tok.token_to_id("<|endoftext|>")
    assert stream.tolist() == [*whole, eos, *tok.encode("second doc").ids, eos]  # every document ends with EOS


# ---------------------------------------------------------------- corpus cache


def test_prepare_corpus_caches(tmp_path: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c1 = prepare_corpus(text_file, tmp_path / "cache", 300)
    assert c1.tokens.dtype == np.uint16 and isinstance(c1.tokens, np.memmap)
    assert c1.tokenizer_path == tmp_path / "cache" / "corpus" / c1.fingerprint / "tokenizer.json"
    assert c1.vocab_size == c1.load_tokenizer().get_vocab_size() <= 300
    tok = c1.load_tokenizer()
    assert c1.tokens[-1] == c1.eos_id and tok.decode(c1.tokens[:-1].tolist()) == text_file.read_text()
    assert c1.loss_mask.tolist() == [0] + [1] * (len(c1.tokens) - 1) and c1.doc_start.sum() == 1 and not c1.packed
    mtime = (c1.tokenizer_path.parent / "tokens.npy").stat().st_mtime_ns

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("retrained")

    monkeypatch.setattr(data, "train_or_load_tokenizer", boom)
    monkeypatch.setattr(data, "encode_documents", boom)
    c2 = prepare_corpus(text_file, tmp_path / "cache", 300)
    assert c2.fingerprint == c1.fingerprint and np.array_equal(c2.tokens, c1.tokens)
    assert (c1.tokenizer_path.parent / "tokens.npy").stat().st_mtime_ns == mtime
    monkeypatch.undo()
    # a different vocab size or an edited file is a different cache entry
    assert prepare_corpus(text_file, tmp_path / "cache", 320).fingerprint != c1.fingerprint
    text_file.write_text(TEXT * 41)
    assert prepare_corpus(text_file, tmp_path / "cache", 300).fingerprint != c1.fingerprint


def test_prepare_corpus_jsonl_eos_after_each_doc(tmp_path: Path) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ("alpha beta", "gamma", "delta epsilon")))
    c = prepare_corpus(jl, tmp_path / "cache", 280)
    toks = c.tokens.tolist()
    assert toks.count(c.eos_id) == 3 and toks[-1] == c.eos_id and toks[0] != c.eos_id
    tok = c.load_tokenizer()
    first = toks.index(c.eos_id)
    assert tok.decode(toks[:first]) == "alpha beta"
    starts = np.flatnonzero(c.doc_start).tolist()
    assert starts == [0, first + 1, toks.index(c.eos_id, first + 1) + 1]
    assert np.flatnonzero(c.loss_mask == 0).tolist() == starts  # no loss across a document boundary


# ---------------------------------------------------------------- windows


def test_split_windows() -> None:
    train, val = split_windows(1000, 9, 0.1)  # windows of 10 tokens, boundary at 900
    assert len(train) == 90 and len(val) == 10
    assert train.dtype == np.int64 and val[0] == 900 and val[-1] + 10 <= 1000
    assert train[-1] + 10 <= 900  # no straddling
    allw = np.concatenate([train, val])
    assert np.all(np.diff(allw) >= 10)  # non-overlapping
    train, val = split_windows(1005, 9, 0.1)  # boundary 1005 - 100 = 905: train windows end <= 905
    assert train[-1] + 10 <= val[0] == 905 and len(val) == 10


def test_split_windows_too_small() -> None:
    with pytest.raises(ValueError, match=r"needs at least (\d+)") as e:
        split_windows(100, 15, 0.1)
    need = int(str(e.value).split("needs at least ")[1].split()[0])
    assert need == 160
    split_windows(need, 15, 0.1)  # exactly enough works
    with pytest.raises(ValueError):
        split_windows(need - 1, 15, 0.1)


# ---------------------------------------------------------------- loader


def make_stream(n: int = 5000) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % 60000


def test_loader_shapes_and_shift() -> None:
    tokens = make_stream()
    train, _ = split_windows(len(tokens), 16, 0.1)
    ld = GlobalBatchLoader(tokens.astype(np.uint16), train, 16, global_batch=8, seed=0, grad_accum=2)
    mbs = ld.get(0)
    assert len(mbs) == 2
    for x, y, doc in mbs:
        assert doc is None
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
        assert set((x[:, 0] % 17).tolist()) == {0}  # every row starts at a window start


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_loader_ranks_union_equals_global(grad_accum: int) -> None:
    tokens = make_stream()
    train, _ = split_windows(len(tokens), 16, 0.1)
    B = 16
    for step in (0, 5, 17):
        ref = torch.cat([b.x for b in GlobalBatchLoader(tokens, train, 16, B, seed=3).get(step)])
        for dp in (1, 2, 4):
            if B % (dp * grad_accum):
                continue
            parts = [b.x for r in range(dp) for b in GlobalBatchLoader(tokens, train, 16, B, 3, r, dp, grad_accum)
                     .get(step)]
            assert all(p.shape[0] == B // (dp * grad_accum) for p in parts)
            assert torch.equal(torch.cat(parts), ref)  # same rows, same order


def test_loader_determinism_epochs_and_resume() -> None:
    tokens = make_stream()
    train, _ = split_windows(len(tokens), 16, 0.1)  # 264 windows
    a = GlobalBatchLoader(tokens, train, 16, 16, seed=7)
    b = GlobalBatchLoader(tokens, train, 16, 16, seed=7)
    c = GlobalBatchLoader(tokens, train, 16, 16, seed=8)
    bpe = a.batches_per_epoch
    assert bpe == len(train) // 16
    assert torch.equal(a.get(3)[0][0], b.get(3)[0][0])
    assert not torch.equal(a.get(3)[0][0], c.get(3)[0][0])
    # one epoch visits distinct windows; the next epoch is a different permutation of the same windows
    ep0 = np.concatenate([a.global_rows(s) for s in range(bpe)])
    ep1 = np.concatenate([a.global_rows(s) for s in range(bpe, 2 * bpe)])
    assert len(set(ep0.tolist())) == bpe * 16 and not np.array_equal(ep0, ep1)
    assert np.array_equal(ep1, np.random.default_rng([7, 1]).permutation(len(train))[: bpe * 16])
    # iterator + state_dict resume equals an uninterrupted run, also out of step order and across epochs
    run = [next(a)[0][0] for _ in range(bpe + 3)]
    restarted = GlobalBatchLoader(tokens, train, 16, 16, seed=7, dp_rank=1, dp_size=2)
    restarted.load_state_dict({"step": bpe - 1})
    assert restarted.state_dict() == {"step": bpe - 1}
    for s in range(bpe - 1, bpe + 3):
        assert torch.equal(next(restarted)[0][0], run[s][8:])
    assert torch.equal(b.get(bpe + 1)[0][0], run[bpe + 1])


def test_loader_errors() -> None:
    tokens = make_stream(2000)
    train, _ = split_windows(len(tokens), 16, 0.1)
    with pytest.raises(ValueError, match=r"12 is not divisible by dp_size \* grad_accum = 4 \* 2"):
        GlobalBatchLoader(tokens, train, 16, 12, 0, dp_rank=0, dp_size=4, grad_accum=2)
    with pytest.raises(ValueError, match="windows"):
        GlobalBatchLoader(tokens, train, 16, 4096, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchLoader(tokens, train, 16, 8, 0, dp_rank=2, dp_size=2)


def test_val_batches_fixed_and_sharded() -> None:
    tokens = make_stream()
    _, val = split_windows(len(tokens), 16, 0.25)  # 73 val windows
    full = list(GlobalBatchLoader(tokens, val, 16, 8, seed=0).val_batches(3, 8))
    again = list(GlobalBatchLoader(tokens, val, 16, 8, seed=99).val_batches(3, 8))
    assert len(full) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(full, again))
    starts = torch.cat([b.x[:, 0] for b in full])
    assert len(set(starts.tolist())) == 24 and starts.min() >= val[0] and starts.max() >= val[len(val) // 2]
    shards = [list(GlobalBatchLoader(tokens, val, 16, 8, 0, r, 4).val_batches(3, 8)) for r in range(4)]
    for i in range(3):
        assert torch.equal(torch.cat([shards[r][i][0] for r in range(4)]), full[i][0])
    with pytest.raises(ValueError, match="divisible by dp_size=4"):
        next(GlobalBatchLoader(tokens, val, 16, 8, 0, 0, 4).val_batches(2, 6))


# ---------------------------------------------------------------- real data


@pytest.mark.slow
def test_fetch_shakespeare(tmp_path: Path) -> None:
    path = fetch_shakespeare(tmp_path)
    assert path == tmp_path / "shakespeare" / "shakespeare.txt"
    assert path.stat().st_size > 4_500_000
    text = path.read_text(encoding="utf-8")
    assert "To be, or not to be" in text and "HAMLET" in text
    assert "CC-BY 2.5" in (path.parent / "SOURCE.txt").read_text()
    mtime = path.stat().st_mtime_ns
    assert fetch_shakespeare(tmp_path) == path and path.stat().st_mtime_ns == mtime  # cached
