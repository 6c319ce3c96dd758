"""Fine-tuning data: a model's own tokenizer and its BOS/EOS settings, prompt/completion loss masks, packing of
whole examples into windows, and the batches the trainer gets (ignored targets, document ids)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from semoe.training.data import (
    IGNORE_INDEX,
    Document,
    DocumentEncoder,
    GlobalBatchLoader,
    pack_documents,
    prepare_corpus,
    tokenizer_spec_from_hf,
)
from tests.hf_helpers import write_hf_tokenizer

BOS, EOS = 1, 2


@pytest.fixture(params=[True, False], ids=["bos", "no-bos"])
def tok_dir(request, tmp_path: Path) -> tuple[Path, bool]:
    write_hf_tokenizer(tmp_path, bos=request.param)
    return tmp_path, request.param


def encoder(folder: Path) -> tuple[DocumentEncoder, Tokenizer]:
    spec = tokenizer_spec_from_hf(folder)
    tok = spec.load()
    return DocumentEncoder(tok, spec.eos_id, spec.bos_id, spec.add_bos), tok


def test_text_and_pair_follow_the_tokenizer(tok_dir) -> None:
    folder, bos = tok_dir
    enc, tok = encoder(folder)
    text, prompt, completion = "the king and queen", "question good night", " answer good"
    toks, mask, start = enc.encode([Document(text), Document(completion, prompt)])
    n_text = len(tok.encode(text).ids)  # with the tokenizer's own special tokens (BOS or not)
    doc1 = toks[: n_text + 1].tolist()
    assert doc1 == [*tok.encode(text).ids, EOS] and (doc1[0] == BOS) == bos
    assert mask[: n_text + 1].tolist() == [0] + [1] * n_text  # everything but the first token is a target
    doc2, m2 = toks[n_text + 1:].tolist(), mask[n_text + 1:]
    assert doc2 == [*tok.encode(prompt + completion).ids, EOS]
    n_prompt = len(tok.encode(prompt).ids)
    assert m2.tolist() == [0] * n_prompt + [1] * (len(doc2) - n_prompt)  # loss on the completion and EOS only
    assert tok.decode([t for t, m in zip(doc2, m2) if m]) == completion.strip()
    assert np.flatnonzero(start).tolist() == [0, n_text + 1]


def test_boundary_merge_counts_as_completion(tmp_path: Path) -> None:
    """A prompt ending mid-word: the tokens the pair shares with the prompt tokenized alone are the prompt; the
    token that merges across the boundary belongs to the completion (it carries completion text)."""
    write_hf_tokenizer(tmp_path)
    enc, tok = encoder(tmp_path)
    prompt, completion = "question goo", "d night"
    toks, mask, _ = enc.encode([Document(completion, prompt)])
    p, full = tok.encode(prompt).ids, tok.encode(prompt + completion).ids
    assert full[: len(p)] != p  # the boundary merges
    shared = next(i for i, (a, b) in enumerate(zip(p, full)) if a != b)
    assert mask.tolist() == [0] * shared + [1] * (len(full) + 1 - shared)
    assert "good night" in tok.decode([t for t, m in zip(toks.tolist(), mask) if m])


def test_add_bos_token_setting_wins(tmp_path: Path) -> None:
    write_hf_tokenizer(tmp_path, bos=True)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    enc, tok = encoder(tmp_path)
    toks, _, _ = enc.encode([Document("the king")])
    assert toks.tolist() == [*tok.encode("the king", add_special_tokens=False).ids, EOS]
    other = tmp_path / "other"
    other.mkdir()
    write_hf_tokenizer(other, bos=False)
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    enc, tok = encoder(other)
    assert enc.encode([Document("the king")])[0].tolist() == [BOS, *tok.encode("the king").ids, EOS]


def test_tokenizer_spec_sources_and_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no tokenizer\.json.*save_pretrained"):
        tokenizer_spec_from_hf(tmp_path)
    write_hf_tokenizer(tmp_path)
    spec = tokenizer_spec_from_hf(tmp_path)
    assert (spec.eos_id, spec.bos_id, spec.add_bos) == (EOS, BOS, None)
    # no tokenizer_config.json: the EOS id of generation_config.json, else config.json
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert tokenizer_spec_from_hf(tmp_path).eos_id == 2
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert tokenizer_spec_from_hf(tmp_path).eos_id == 0
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match=r"eos_token='<nope>'"):
        tokenizer_spec_from_hf(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot be read"):
        tokenizer_spec_from_hf(tmp_path)


def test_pack_documents_whole_examples_first_fit() -> None:
    # five documents of lengths 6, 3, 5, 2, 4 (window 8): first fit -> [6, 2], [3, 5], [4 + pad]
    lengths = [6, 3, 5, 2, 4]
    tokens = np.concatenate([np.full(n, 10 + i, dtype=np.int32) for i, n in enumerate(lengths)])
    mask = np.concatenate([np.r_[0, np.ones(n - 1)] for n in lengths]).astype(np.uint8)
    start = np.zeros(len(tokens), dtype=np.uint8)
    start[np.cumsum([0, *lengths[:-1]])] = 1
    t, m, s = pack_documents(tokens, mask, start, 8, pad_id=EOS)
    rows = t.reshape(-1, 8).tolist()
    assert rows == [[10] * 6 + [13] * 2, [11] * 3 + [12] * 5, [14] * 4 + [EOS] * 4]
    assert m.reshape(-1, 8).tolist()[2] == [0, 1, 1, 1, 0, 0, 0, 0]  # padding: no loss
    assert np.flatnonzero(s).tolist() == [0, 6, 8, 11, 16, 20]  # each example and the padding run
    # too long: truncated to the window; a document whose kept part has no target is dropped
    long = np.arange(12, dtype=np.int32)
    t, m, s = pack_documents(long, np.r_[np.zeros(9), np.ones(3)].astype(np.uint8), np.r_[1, np.zeros(11)].astype(
        np.uint8), 8, 0)
    assert len(t) == 0
    first = np.r_[1, np.zeros(11)].astype(np.uint8)
    t, _, _ = pack_documents(long, np.r_[0, np.ones(11)].astype(np.uint8), first, 8, 0)
    assert t.tolist() == list(range(8))


def test_prompt_completion_corpus_batches(tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    write_hf_tokenizer(tmp_path / "tok", bos=True)
    spec = tokenizer_spec_from_hf(tmp_path / "tok")
    data = tmp_path / "d.jsonl"
    words = ("good", "night", "sweet", "prince")
    pairs = [{"prompt": f"question {w}", "completion": f" answer {w}"} for w in words * 10]
    data.write_text("\n".join(json.dumps(p) for p in pairs))
    corpus = prepare_corpus(data, tmp_path / "cache", 128, spec)
    assert corpus.packed and corpus.eos_id == EOS and corpus.tokenizer_path == spec.path
    win = corpus.windows(15, 0.2)
    tok = spec.load()
    rows, masks, starts = (a.astype(np.int64).reshape(-1, 16) for a in (win.tokens, win.loss_mask, win.doc_start))
    seen = 0
    for row, mask, start in zip(rows, masks, starts):
        bounds = [*np.flatnonzero(start).tolist(), 16]
        for a, b in itertools.pairwise(bounds):
            if row[a] != BOS:  # the padding run: EOS tokens, no loss
                assert set(row[a:b].tolist()) == {EOS} and not mask[a:b].any()
                continue
            w = tok.decode(row[a:b].tolist()).split()[1]  # a whole example: "question W answer W" + EOS
            assert tok.decode(row[a:b].tolist()) == f"question {w} answer {w}" and row[b - 1] == EOS
            assert tok.decode(row[a:b][mask[a:b] == 1].tolist()) == f"answer {w}"
            seen += 1
    assert seen == 40 and len(win.val_starts) == int(len(rows) * 0.2)
    loader = GlobalBatchLoader(win.tokens, win.train_starts, 15, 2, 0, loss_mask=win.loss_mask, doc_start=win.doc_start)
    for b in loader.get(0):
        for x, y, doc in zip(b.x, b.y, b.doc):
            i = int(np.flatnonzero((rows[:, :15] == x.numpy()).all(1))[0])
            want = np.where(masks[i, 1:] == 1, rows[i, 1:], IGNORE_INDEX)
            assert y.tolist() == want.tolist() and doc.tolist() == np.cumsum(starts[i, :15]).tolist()
    # a different tokenizer is a different cache entry
    other = tmp_path / "tok2"
    other.mkdir()
    write_hf_tokenizer(other, bos=False)
    again = prepare_corpus(data, tmp_path / "cache", 128, tokenizer_spec_from_hf(other))
    assert again.fingerprint != corpus.fingerprint


def test_plain_text_with_hf_tokenizer_is_a_stream(tmp_path: Path) -> None:
    write_hf_tokenizer(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ("the king and queen", "good night sweet prince")))
    corpus = prepare_corpus(data, tmp_path / "cache", 128, tokenizer_spec_from_hf(tmp_path))
    assert not corpus.packed
    toks = corpus.tokens.tolist()
    assert toks.count(BOS) == 2 and toks.count(EOS) == 2 and toks[0] == BOS and toks[-1] == EOS
    loader = GlobalBatchLoader(corpus.tokens, np.array([0]), len(toks) - 1, 1, 0, loss_mask=corpus.loss_mask,
                               doc_start=corpus.doc_start)
    b = loader.get(0)[0]
    second = toks.index(BOS, 1)
    assert b.y[0, second - 1] == IGNORE_INDEX  # the next document's BOS is not predicted from the last EOS
    assert torch.equal(b.doc[0], torch.tensor([1] * second + [2] * (len(toks) - 1 - second)))
