"""Native precision of the ring engine: bf16/fp16 checkpoints computed in their own dtype agree with transformers in
that dtype (logits within the dtype's measured noise, greedy tokens equal where the top-2 margin exceeds it), "auto"
follows the CPU probe, a file in another dtype is cast while it is read (in pieces, read once), bad dtypes."""

from __future__ import annotations

import logging

import pytest
import torch

from semoe.cli.main import main
from semoe.inference import sections
from semoe.inference.ring import MiB, RingEngine
from semoe.inference.sections import open_model
from semoe.precision import cpu_matmul_probe
from tests.unit.test_ring import PROMPTS, build_hf, one_thread, write_word_tokenizer  # noqa: F401

transformers = pytest.importorskip("transformers")

CANDIDATES = [*PROMPTS, [30, 31, 32, 33], [40, 41, 42, 43, 44, 45], [50, 51], [60, 61, 62, 63, 64], [70, 71, 72],
              [80, 81, 82, 83], [90, 91], [100, 101, 102, 103, 104], [110, 111, 112], [120, 121, 122, 123],
              [7, 17, 27, 37], [9, 19, 29]]
NEW = 5


def _reference(hf_lo, hf32, prompt: list[int]) -> tuple[list[int], torch.Tensor, float]:
    """transformers' greedy continuation in the low dtype, its logits [NEW, V], and the dtype's noise on it: the
    largest difference to the float32 model's logits (same weights) along the same tokens."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_lo.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW,
                             min_new_tokens=NEW, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(prompt):].tolist()
        logits = torch.stack(out.logits)[:, 0].float()
        l32 = hf32(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:len(prompt) - 1 + NEW].float()
    return tokens, logits, float((logits - l32).abs().max())


@pytest.mark.numerics
@pytest.mark.parametrize("family,dtype", [("mixtral", torch.bfloat16), ("qwen2_moe", torch.bfloat16),
                                          ("olmoe", torch.bfloat16), ("mixtral", torch.float16)])
def test_native_dtype_matches_transformers_in_that_dtype(tmp_path, family: str, dtype: torch.dtype) -> None:
    hf = build_hf(family, seed=7, num_hidden_layers=4)
    hf.to(dtype).save_pretrained(tmp_path, safe_serialization=True)
    hf_lo = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    refs = [_reference(hf_lo, hf32, p) for p in CANDIDATES]
    assert all(0 < r[2] < 0.05 for r in refs)  # the dtype's noise on each prompt: transformers-in-dtype vs float32
    # greedy tokens are comparable only where every step's top-2 margin exceeds what either side's rounding can
    # move a logit (each is within ~noise of the float32 values): margin > 2 * that prompt's noise
    clear = [i for i, (_, logits, noise) in enumerate(refs)
             if bool(((t := logits.topk(2, -1).values)[:, 0] - t[:, 1] > 2 * noise).all())]
    assert len(clear) >= 2, f"only prompts {clear} have clear margins over the {dtype} noise"
    budget = 2 * sections.plan_sections(open_model(tmp_path), 1, dtype).slot_bytes + MiB // 2  # a ring of 2 slots
    with RingEngine(tmp_path, max_memory=budget, dtype=str(dtype).removeprefix("torch."), batch_size=2,
                    strategy="layer") as e:
        assert e.dtype == dtype and not e.resident and e.plan.staging_bytes == 0  # read as stored, no cast
        result = e.generate([CANDIDATES[i] for i in clear], NEW, return_logits=True)
    for i, tokens, ours in zip(clear, result.tokens, result.logits):
        want, ref, noise = refs[i]
        assert tokens == want, (family, dtype, i)
        assert float((ours - ref).abs().max()) <= 3 * noise, (i, float((ours - ref).abs().max()), noise)
    # every slot byte was read once, as stored: a pass reads the model's bytes in the file dtype
    disk = sum(r.nbytes for s in e.plan.sections for r in s.reads)
    assert result.stats.bytes_read == NEW * disk == NEW * open_model(tmp_path).param_bytes(dtype)


def test_auto_follows_the_cpu_probe_and_is_logged(tmp_path, caplog) -> None:
    hf = build_hf("mixtral", seed=8, num_hidden_layers=2)
    hf.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    with caplog.at_level(logging.INFO, logger="semoe"):
        engine = RingEngine(tmp_path, dtype="auto")
    want = torch.bfloat16 if cpu_matmul_probe().fast_bf16 else torch.float32  # AVX2-only CPU: float32
    assert engine.dtype == want
    name = str(want).removeprefix("torch.")
    assert any(f"ring engine computes in {name} (dtype=auto on cpu; the checkpoint is stored in bfloat16" in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    engine.close()


def test_auto_on_cuda_is_the_checkpoint_dtype(monkeypatch) -> None:
    """dtype="auto" on CUDA computes in the checkpoint's own dtype (float32 stays float32, no probe is run); on a
    CPU it is the probe's choice whatever the checkpoint. Checked without a GPU: the device is passed in and the
    run check is replaced by a recorder."""
    from semoe.inference import ring
    ran = []
    monkeypatch.setattr(ring, "check_dtype_runs", lambda dtype, device: ran.append((dtype, device.type)))
    monkeypatch.setattr(ring, "cpu_matmul_probe", lambda: pytest.fail("the CPU probe ran for a CUDA device"))
    cuda = torch.device("cuda")
    for stored in (torch.float32, torch.bfloat16, torch.float16):
        assert ring.compute_dtype("auto", cuda, stored) == stored
    assert ring.compute_dtype("auto", cuda, torch.float64) == torch.float32
    assert ring.compute_dtype("bfloat16", cuda, torch.float32) == torch.bfloat16  # an explicit dtype wins
    assert ran == [(torch.float32, "cuda"), (torch.bfloat16, "cuda"), (torch.float16, "cuda"),
                   (torch.float32, "cuda"), (torch.bfloat16, "cuda")]
    monkeypatch.undo()
    want = torch.bfloat16 if cpu_matmul_probe().fast_bf16 else torch.float32
    for stored in (torch.float32, torch.bfloat16):
        assert ring.compute_dtype("auto", torch.device("cpu"), stored) == want


@pytest.mark.numerics
def test_cast_while_reading_in_pieces(tmp_path, monkeypatch) -> None:
    """A bf16 file computed in float32 is cast piece by piece through a staging area far smaller than one tensor:
    the weights equal transformers' upcast ones (tokens and logits), the file is read once per pass."""
    hf = build_hf("olmoe", seed=9, num_hidden_layers=3)
    hf.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    monkeypatch.setattr(sections, "CAST_CHUNK", 1000)
    budget = 2 * sections.plan_sections(open_model(tmp_path), 1, torch.float32).slot_bytes + MiB // 2 + 1000
    with RingEngine(tmp_path, max_memory=budget, dtype="float32", strategy="layer") as e:
        assert e.plan.staging_bytes == 1000 and not e.resident
        largest = max(r.nbytes for s in e.plan.sections for r in s.reads)
        assert largest > 10 * 1000
        result = e.generate(PROMPTS, NEW, return_logits=True)
    for p, tokens, ours in zip(PROMPTS, result.tokens, result.logits):
        x = torch.tensor([p])
        with torch.no_grad():
            out = hf32.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW,
                                min_new_tokens=NEW, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        ref = torch.stack(out.logits)[:, 0].float()
        top2 = ref.topk(2, -1).values
        assert bool((top2[:, 0] - top2[:, 1] > 1e-5).all())
        assert tokens == out.sequences[0, len(p):].tolist()
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)  # float32 vs float32: other op orders only
    disk = sum(r.nbytes for s in e.plan.sections for r in s.reads)
    assert result.stats.bytes_read == NEW * disk == NEW * open_model(tmp_path).param_bytes(torch.bfloat16)


def test_bad_dtypes(tmp_path, monkeypatch, capsys) -> None:
    hf = build_hf("mixtral", seed=10, num_hidden_layers=2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    write_word_tokenizer(tmp_path)
    for bad in ("float64", "int8", torch.float64):
        with pytest.raises(ValueError, match=r"is not supported by the ring engine; choose one of \['auto', 'float32'"):
            RingEngine(tmp_path, dtype=bad)
    args = ["generate", "--model", str(tmp_path), "--prompt", "w1 w2", "--temperature", "0", "--max-new-tokens", "2"]
    assert main([*args, "--dtype", "float64"]) == 2
    assert "float64 is a training reference precision only" in capsys.readouterr().err
    # a dtype whose kernels this build cannot run (here: attention refused for float16): a clear error before
    # anything is loaded or printed
    real = torch.nn.functional.scaled_dot_product_attention

    def no_half(q, *a, **k):
        if q.dtype == torch.float16:
            raise RuntimeError('"scaled_dot_product_attention" not implemented for \'Half\'')
        return real(q, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_half)
    with pytest.raises(ValueError, match=r"dtype float16 cannot run on cpu with this torch build .*not implemented "
                                         r"for 'Half'.*float32 runs everywhere"):
        RingEngine(tmp_path, dtype="float16")
    assert main([*args, "--dtype", "float16"]) == 2
    cap = capsys.readouterr()
    assert "dtype float16 cannot run on cpu" in cap.err and cap.out == ""
    monkeypatch.undo()
    assert main([*args, "--dtype", "bfloat16", "--max-memory", "64MB"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("w1 w2 w") and "all sections resident, bfloat16" in out[1]
