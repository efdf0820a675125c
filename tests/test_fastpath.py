"""The fast paths against the reference path on the tiny model: the numba kernels, int8,
half-precision storage on CPU, the compiled decode step, speculative decoding, and their CLI options."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from cliutil import assert_one_line_error, run_inprocess

from gpt2cli import kernels, load
from gpt2cli.config import GenerationConfig
from gpt2cli.quantize import compare_next_token

PROMPT = "Once upon a time there was a small model that"


@pytest.fixture
def gen(capsys, monkeypatch):
    def call(args):
        return run_inprocess(["generate", *args], capsys, monkeypatch)

    return call


@pytest.fixture(scope="session")
def ckpt_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny model with GPT-2's vocabulary (different weights, one layer)."""
    return make_checkpoint(tmp_path_factory.mktemp("draft"), n_layer=1, seed=7)


def greedy(lm, n: int = 20, prompt: str = PROMPT, **kw) -> list[int]:
    return lm.complete(prompt, max_new_tokens=n, temperature=0, ignore_eos=True, **kw).samples[0].token_ids


def one_token_steps(lm, ids: torch.Tensor) -> torch.Tensor:
    """Logits (1, T, V) of ``ids`` (1, T) run one token a step through a cache: the decode path."""
    cache = lm.model.new_cache(1, 64)
    return torch.cat(
        [lm.model(ids[:, t : t + 1], torch.tensor([[t]]), cache) for t in range(ids.shape[1])], 1
    )


needs_numba = pytest.mark.skipif(not kernels.available(), reason="numba not installed")


@needs_numba
def test_fast_decode_equals_reference_path(ckpt_h: Path) -> None:
    lm = load(str(ckpt_h), device="cpu")
    ids = torch.tensor([lm.encode(PROMPT)])
    with torch.inference_mode():
        fast = one_token_steps(lm, ids)
        kernels.set_enabled(False)
        try:
            slow = one_token_steps(lm, ids)
            slow_ids = greedy(lm)
        finally:
            kernels.set_enabled(True)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
    assert greedy(lm) == slow_ids


@needs_numba
@pytest.mark.parametrize(("dtype", "quantize"), [("bfloat16", None), ("float16", None), ("float32", "int8")])
def test_kernels_on_and_off_agree_in_every_precision(ckpt_h: Path, dtype: str, quantize: str | None) -> None:
    """The numba decode kernels against the pure-torch path for the same stored weights."""
    lm = load(str(ckpt_h), device="cpu", dtype=dtype, quantize=quantize)
    ids = torch.tensor([lm.encode(PROMPT)])

    def steps() -> torch.Tensor:
        with torch.inference_mode():
            return one_token_steps(lm, ids)

    n = 20 if quantize else 8  # half: the rounding differences may flip a near-tie later on
    fast, fast_ids = steps(), greedy(lm, n=n)
    kernels.set_enabled(False)
    try:
        slow, slow_ids = steps(), greedy(lm, n=n)
    finally:
        kernels.set_enabled(True)
    # int8: the same int8 weights both ways (float32 activations), so float32 rounding only;
    # half: torch's one-row GEMV rounds x and the product to the half dtype, the kernel does
    # not (test_kernels checks the kernel to 1e-5 against the widened weights)
    atol = 1e-4 if quantize else 0.1
    torch.testing.assert_close(fast, slow, atol=atol, rtol=0)
    assert fast_ids == slow_ids


@pytest.mark.parametrize(("dtype", "quantize"), [("float32", None), ("bfloat16", None), ("float32", "int8")])
def test_decode_logits_identical_across_thread_counts(ckpt_h: Path, dtype: str, quantize: str | None) -> None:
    """Bit-identical decode logits with 1 and 2 threads (each output row is one thread's sum)."""
    lm = load(str(ckpt_h), device="cpu", dtype=dtype, quantize=quantize)
    ids = torch.tensor([lm.encode(PROMPT)])
    before = torch.get_num_threads()
    logits, chosen = [], []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                logits.append(one_token_steps(lm, ids))
            chosen.append(greedy(lm, n=12, prompt=PROMPT * 6))  # a longer prompt: the GEMM prefill
    finally:
        torch.set_num_threads(before)
    assert torch.equal(logits[0], logits[1])
    assert chosen[0] == chosen[1]


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_int8_quantised_while_reading_equals_quantising_after(tmp_path: Path, weights: str) -> None:
    from gpt2cli.quantize import QEmbedding, quantize_model

    ckpt = make_checkpoint(tmp_path / weights, weights=weights, layout="transformer", seed=4)
    read = load(str(ckpt), device="cpu", quantize="int8", allow_pickle=True)
    after = quantize_model(load(str(ckpt), device="cpu", allow_pickle=True).model)
    assert isinstance(read.model.wte, QEmbedding)
    assert read.dtype == torch.float32  # what the activations run in
    floats = [t for t in read.model.state_dict().values() if t.is_floating_point() and t.ndim == 2]
    assert [tuple(t.shape) for t in floats] == [tuple(read.model.wpe.weight.shape)]  # no float wte copy
    for (name, a), (_, b) in zip(read.model.state_dict().items(), after.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    ids = torch.tensor([read.encode(PROMPT)])
    with torch.inference_mode():
        assert torch.equal(read.model(ids), after(ids))


def test_half_stored_while_reading_equals_converting_after(ckpt_t: Path) -> None:
    ref = load(str(ckpt_t), device="cpu")
    half = load(str(ckpt_t), device="cpu", dtype="bfloat16")
    for (name, a), (_, b) in zip(
        half.model.state_dict().items(), ref.model.state_dict().items(), strict=True
    ):
        want = torch.bfloat16 if a.ndim == 2 else torch.float32
        assert a.dtype == want and torch.equal(a, b.to(want)), name


def test_int8_close_to_fp32(ckpt_h: Path) -> None:
    ref = load(str(ckpt_h), device="cpu")
    q = load(str(ckpt_h), device="cpu", quantize="int8")
    assert q.model.h[0].attn.c_attn.qweight.dtype == torch.int8
    ids = torch.tensor([ref.encode(PROMPT * 2)])
    report = compare_next_token(ref.model, q.model, ids)
    # Stated tolerance: int8 per-row costs under 2% perplexity and a mean KL under 0.01 nats.
    assert abs(report["perplexity"] / report["perplexity_reference"] - 1) < 0.02, report
    assert report["mean_kl"] < 0.01, report
    assert greedy(q) == greedy(ref)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_storage_on_cpu_close_to_fp32(ckpt_h: Path, dtype: str) -> None:
    ref = load(str(ckpt_h), device="cpu")
    half = load(str(ckpt_h), device="cpu", dtype=dtype)
    assert half.model.h[0].mlp.c_fc.weight.dtype == getattr(torch, dtype)
    assert half.model.ln_f.weight.dtype == torch.float32  # activations stay float32
    ids = torch.tensor([ref.encode(PROMPT * 2)])
    report = compare_next_token(ref.model, half.model, ids)
    limit = 0.01 if dtype == "float16" else 0.05  # bfloat16 keeps 8 mantissa bits, float16 11
    assert report["mean_kl"] < limit, report
    assert greedy(half, n=8) == greedy(ref, n=8)  # rounding may flip a near-tie later on


def test_compiled_decode_equals_eager(ckpt_h: Path) -> None:
    eager = load(str(ckpt_h), device="cpu")
    compiled = load(str(ckpt_h), device="cpu", compile=True)
    ids = greedy(compiled, n=6)
    assert compiled.decoder is not None
    if compiled.decoder.failed:
        pytest.skip("torch.compile is unavailable here (no C++ toolchain?)")
    assert compiled.decoder.calls == 5  # every decode step after the prefill ran compiled
    assert ids == greedy(eager, n=6)


def test_speculative_greedy_equals_target_alone(ckpt_h: Path, ckpt_draft: Path) -> None:
    target = load(str(ckpt_h), device="cpu")
    plain = greedy(target, n=25)
    for draft, k in ((load(str(ckpt_draft), device="cpu"), 3), (load(str(ckpt_h), device="cpu"), 4)):
        cfg = GenerationConfig(max_new_tokens=25, temperature=0, ignore_eos=True)
        result = list(target.stream(PROMPT, cfg, draft=draft, draft_tokens=k))[-1]
        assert result.samples[0].token_ids == plain
        assert result.stats.draft_proposed > 0
    assert result.stats.acceptance_rate == 1.0  # the target as its own draft keeps every proposal


def test_speculative_sampling_with_identical_draft_accepts_all(ckpt_h: Path) -> None:
    target, draft = load(str(ckpt_h), device="cpu"), load(str(ckpt_h), device="cpu")
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=3, ignore_eos=True)
    result = list(target.stream(PROMPT, cfg, draft=draft))[-1]
    assert result.samples[0].tokens == 20
    assert result.stats.acceptance_rate == 1.0  # p == q: min(1, p/q) is always 1


def test_cli_quantize_and_dtype(ckpt_h: Path, gen) -> None:
    base = ["-m", str(ckpt_h), PROMPT, "-n", "8", "-t", "0", "--ignore-eos"]
    plain = gen(base)
    assert plain.code == 0, plain.err
    assert "weights: float32" in gen([*base, "--stats"]).err
    for extra, weights in (
        (["--quantize", "int8"], "int8"),
        (["--dtype", "float16"], "float16"),
        (["--dtype", "bfloat16"], "bfloat16"),
        (["--quantize", "none"], "float32"),
    ):
        result = gen([*base, *extra, "--stats"])
        assert result.code == 0, result.err
        assert result.out == plain.out
        assert f"weights: {weights}" in result.err  # the flag reached the loaded model


def test_cli_draft_model(ckpt_h: Path, ckpt_draft: Path, gen) -> None:
    base = ["-m", str(ckpt_h), PROMPT, "-n", "8", "-t", "0", "--ignore-eos"]
    result = gen([*base, "--draft-model", str(ckpt_draft), "--draft-tokens", "2", "--stats"])
    assert result.code == 0, result.err
    assert result.out == gen(base).out
    assert re.search(r"draft: \d+/\d+ accepted", result.err)  # the draft model really ran
    assert "draft:" not in gen([*base, "--stats"]).err


def test_cli_compile_takes_effect(ckpt_h: Path, gen) -> None:
    base = ["-m", str(ckpt_h), PROMPT, "-n", "6", "-t", "0", "--ignore-eos", "--stats"]
    compiled = gen([*base, "--compile"])
    assert compiled.code == 0, compiled.err
    if "--compile unavailable" in compiled.err:
        pytest.skip("torch.compile is unavailable here (no C++ toolchain?)")
    assert "compiled steps: 5" in compiled.err
    plain = gen(base)
    assert "compiled steps" not in plain.err and compiled.out == plain.out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--quantize", "int4"], "quantization"),
        (["--draft-model", "DRAFT", "--num-samples", "2"], "one sample"),
    ],
)
def test_cli_bad_fast_path_options(ckpt_h: Path, gen, args: list[str], needle: str) -> None:
    args = [str(ckpt_h) if a == "DRAFT" else a for a in args]
    assert_one_line_error(gen(["-m", str(ckpt_h), "Hi", "-n", "3", *args]), 2, needle)
