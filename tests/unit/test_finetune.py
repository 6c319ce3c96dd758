"""Fine-tuning HF MoE checkpoints (``semoe train --init-from``) against transformers on tiny random Mixtral,
Qwen2-MoE and OLMoE models built offline.

* Step 0: the trainer's cross-entropy, transformers' load-balancing loss (``output_router_logits=True``, its
  ``router_aux_loss_coef``) and every parameter's gradient equal transformers' on the same batch.
* A short fine-tune at EP 2 (two gloo ranks, each reading only its experts) lowers the loss on a repeated batch.
* End to end: ``semoe train --init-from --nproc 2``, a resume on 1 process, ``semoe convert --to-hf``, and
  transformers' greedy tokens of the export equal ``semoe generate``'s.

Tolerances (float32 on both sides; float64 would not be a float64 computation on transformers' side: its RMSNorm
and router softmax compute in float32 whatever the model's dtype). The two sides sum in different orders
(transformers runs the experts as one grouped GEMM over its own sort, semoe sorts stably and groups per expert;
attention and norms are the same ops). One float32 rounding is 6e-8 relative; through the two layers' backward
the differences measured here are <= 8.5e-7 of each gradient tensor's largest entry (2026-12-01, Intel Xeon with
AVX-512/AMX, and the same under AVX2 kernels). The gradient check allows 5e-5 of that magnitude (60x margin): a
routing flip would move an expert's gradient by O(1) of its magnitude, and the batch asserts that no token is within
1e-4 of a routing tie (``assert_clear_routing``), so no flip can happen. Losses: 2e-6 absolute on values ~5.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from semoe.config import replace
from semoe.inference.ring import ring_generate
from semoe.models.hf import convert_tensor, hf_key_to_semoe, semoe_param_slot
from semoe.models.recipes import finetune
from semoe.training.data import IGNORE_INDEX, Batch
from semoe.training.init import PretrainedInit
from semoe.training.trainer import Trainer
from tests.dist.launcher import run_ranks
from tests.hf_helpers import FT_WORDS, TINY_FAMILIES, assert_clear_margins, build_tiny_hf, save_tiny_hf

transformers = pytest.importorskip("transformers")

ROUTING_MARGIN = 1e-4


def write_sft(path: Path, n: int = 120, seed: int = 0) -> Path:
    """prompt/completion JSONL: "question w1 w2 ..." -> " answer w1" (learnable: copy the first word)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(FT_WORDS) for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"prompt": f"question {q}", "completion": f" answer {q.split()[0]}"}) + "\n")
    return path


def finetune_run(init: PretrainedInit, data: Path, **train):
    run = finetune()
    tc = {"steps": 4, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0,
          "dtype": "float32", "val_fraction": 0.2, "eval_every": 100, "eval_batches": 1, "ckpt_every": 100, **train}
    return replace(run, model=init.model_config, data=str(data), train=replace(run.train, **tc))


def assert_clear_routing(router_logits: tuple[torch.Tensor, ...], top_k: int, margin: float = ROUTING_MARGIN) -> None:
    """No token of any layer is within ``margin`` of a tie between its k-th and (k+1)-th expert probability:
    the two implementations' float32 differences (~1e-7) cannot change which experts a token uses."""
    for layer, logits in enumerate(router_logits):
        p = logits.detach().float().softmax(-1).sort(-1, descending=True).values
        gap = float((p[:, top_k - 1] - p[:, top_k]).min())
        assert gap > margin, f"layer {layer}: a token is {gap:.2e} from a routing tie; use another seed"


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    hf = build_tiny_hf(name)
    folder = save_tiny_hf(hf, tmp_path_factory.mktemp(name) / "hf", max_shard_size="150KB", bos=name == "mixtral")
    assert (folder / "model.safetensors.index.json").is_file()
    return name, hf, folder


@pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)
def test_step0_loss_and_every_gradient_match_transformers(family, tmp_path) -> None:
    name, hf, folder = family
    init = PretrainedInit.from_hf(folder)
    rc = init.model_config.moe.router
    assert rc.aux_loss_scope == "model" and rc.capacity_factor is None and rc.z_loss_coef == 0
    coef = TINY_FAMILIES[name][2]["router_aux_loss_coef"]
    assert init.model_config.moe.router.aux_loss_coef == coef
    trainer = Trainer(finetune_run(init, write_sft(tmp_path / "d.jsonl")), tmp_path / "run", tmp_path / "cache",
                      resume=None, init=init)
    torch.manual_seed(3)
    x = torch.randint(3, 128, (2, 24))
    y = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)  # transformers' labels=x, shifted inside

    hf.train()
    hf.zero_grad(set_to_none=True)
    ref = hf(input_ids=x, labels=x, output_router_logits=True)
    assert_clear_routing(ref.router_logits, hf.config.num_experts_per_tok)
    ref.loss.backward()
    ref_ce = float(ref.loss.detach() - coef * ref.aux_loss.detach())

    trainer.model.train()
    ce, out = trainer._forward_loss(Batch(x, y))
    (ce + out.router_loss).backward()
    assert float(ce.detach()) == pytest.approx(ref_ce, abs=2e-6)
    assert float(out.aux_loss.detach()) == pytest.approx(float(ref.aux_loss.detach()), abs=2e-6)
    assert float((ce + out.router_loss).detach()) == pytest.approx(float(ref.loss.detach()), abs=2e-6)

    ours = dict(trainer.model.named_parameters())
    checked = set()
    for key, p in hf.named_parameters():  # transformers' in-memory names (experts fused)
        assert p.grad is not None, key
        for tmap in hf_key_to_semoe(name, key):
            for sname, g_ref in convert_tensor(tmap, p.grad):  # the mapping is linear: gradients map alike
                target, e = semoe_param_slot(sname)
                g = ours[target].grad if e is None else ours[target].grad[e]
                scale = float(g_ref.abs().max())
                assert scale > 0, sname
                torch.testing.assert_close(g, g_ref, atol=5e-5 * scale, rtol=0, msg=lambda m, s=sname: f"{s}: {m}")
                checked.add(target)
    assert checked == set(ours)  # every parameter of the semoe model


# ------------------------------------------------------------------------------------ EP 2


def _ep2_repeated_batch(rank: int, world: int, folder: str, data: str, out: str, cache: str) -> dict:
    init = PretrainedInit.from_hf(folder)
    trainer = Trainer(finetune_run(init, Path(data)), Path(out), Path(cache), resume=None, init=init)
    losses = [trainer.train_step(0)["loss"] for _ in range(6)]  # step 0 each time: the same global batch, same LR
    return {"losses": losses, "bytes_read": init.bytes_read, "experts": init.experts_read}


def test_ep2_finetune_lowers_loss_on_repeated_batch(tmp_path) -> None:
    hf = build_tiny_hf("qwen2_moe", seed=1)
    folder = save_tiny_hf(hf, tmp_path / "hf", bos=False)
    data = write_sft(tmp_path / "d.jsonl")
    res = run_ranks(_ep2_repeated_batch, 2, tmp_path, str(folder), str(data), str(tmp_path / "run"),
                    str(tmp_path / "cache"), timeout=240)
    losses = res[0]["losses"]
    assert res[1]["losses"] == losses  # logged losses are means over the ranks
    assert losses[-1] < losses[0] - 0.5 and all(b < a for a, b in itertools.pairwise(losses)), losses
    for r in range(2):  # each rank read its own two experts of every layer, nothing else
        assert {tuple(v) for v in res[r]["experts"].values()} == {(2 * r, 2 * r + 1)}
    assert res[0]["bytes_read"] == res[1]["bytes_read"]


# ------------------------------------------------------------------------------------ end to end


def semoe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "semoe", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"semoe {' '.join(args)} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def test_finetune_ep2_resume_export_generate(tmp_path) -> None:
    hf = build_tiny_hf("mixtral", seed=2)
    folder = save_tiny_hf(hf, tmp_path / "hf", max_shard_size="150KB")
    data = write_sft(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    common = ["--init-from", str(folder), "--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
              "--sample", "", "--set", "train.seq_len=32", "--set", "train.batch_size=4", "--set", "train.lr=3e-3",
              "--set", "train.dtype=float32", "--set", "train.val_fraction=0.2", "--set", "train.eval_every=4",
              "--set", "train.ckpt_every=4", "--set", "train.eval_batches=2"]
    semoe("train", *common, "--steps", "8", "--nproc", "2")
    first = (out / "checkpoints" / "latest").read_text().strip()
    assert first == "step_00000008"
    manifest = json.loads((out / "checkpoints" / first / "manifest.json").read_text())
    assert manifest["ep_size"] == 2 and manifest["hf_source"]["model_type"] == "mixtral"
    assert manifest["eos_token_ids"] == [2]
    semoe("train", *common, "--steps", "12")  # resumes at step 8 on one process
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    val = [float(r.split(",")[header.index("val_loss")]) for r in rows[1:] if r.split(",")[header.index("val_loss")]]
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == list(range(13)), steps  # the resumed run keeps rows 0..8 and appends 9..12
    assert len(val) == 4 and val[-1] < val[0] - 0.3, val  # steps 0, 4, 8, 12

    export = tmp_path / "export"
    semoe("convert", "--to-hf", str(out), "--out", str(export), "--max-shard-size", "150KB")
    assert (export / "model.safetensors.index.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    prompt = "question good night"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1  # the tokenizer's own BOS
    with torch.no_grad():  # 8 tokens, EOS not stopping them (the fine-tuned model answers, then ends with EOS)
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                           min_new_tokens=8, eos_token_id=None, output_logits=True, return_dict_in_generate=True,
                           pad_token_id=0)
    assert_clear_margins(torch.stack(g.logits))
    new = g.sequences[0, ids.shape[1]:].tolist()
    assert ring_generate(out, [ids[0].tolist()], 8).tokens == [new]  # semoe's engine, token by token
    # the CLI stops at the checkpoint's EOS (2), where transformers with its generation_config stops too
    stop = new.index(2) + 1 if 2 in new else len(new)
    assert stop >= 2, new  # at least one token before EOS (after it, the 8-token check above goes on)
    r = semoe("generate", "--checkpoint", str(out), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0",
              "--dtype", "float32")  # the reference is float32 (auto may pick bfloat16 on a CPU with fast bf16)
    fast = Tokenizer.from_file(str(export / "tokenizer.json"))
    assert r.stdout.splitlines()[0] == fast.decode(ids[0].tolist() + new[:stop])
    assert f"({stop} new tokens" in r.stdout
