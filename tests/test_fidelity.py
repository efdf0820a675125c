"""Our model against transformers' GPT2LMHeadModel on the same checkpoints: logits and greedy ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402  (the test extra: a hard requirement, never a silent skip)

from gpt2cli import load
from gpt2cli.config import GenerationConfig


def reference(path: Path):
    model = transformers.GPT2LMHeadModel.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("gemm", ["blas", "onednn"])  # kernels.fp32_gemm_path: prefill's GEMM
def test_logits_match_transformers(ckpt: Path, gemm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT2_GEMM", gemm)
    lm = load(str(ckpt), device="cpu")
    ref = reference(ckpt)
    ids = torch.tensor([lm.encode("Hello world, this is a test of GPT-2 fidelity! ünïcödé 🎉")])
    with torch.no_grad():
        ours = lm.model(ids)
        theirs = ref(ids).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_cached_decoding_matches_full_forward(ckpt: Path) -> None:
    lm = load(str(ckpt), device="cpu")
    ids = torch.tensor([lm.encode("The quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        full = lm.model(ids)
        cache = lm.model.new_cache(1, 64)
        first = lm.model(ids[:, :5], None, cache)  # positions 0..4
        rest = [lm.model(ids[:, t : t + 1], torch.tensor([[t]]), cache) for t in range(5, ids.shape[1])]
    stepped = torch.cat([first, *rest], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=0)


def test_chunked_prefill_after_cache_matches(ckpt: Path) -> None:
    lm = load(str(ckpt), device="cpu")
    ids = torch.tensor([lm.encode("one two three four five six seven eight nine ten")])
    with torch.no_grad():
        full = lm.model(ids)
        cache = lm.model.new_cache(1, 16)
        a = lm.model(ids[:, :4], None, cache)
        b = lm.model(ids[:, 4:], torch.arange(4, ids.shape[1]), cache)  # a chunk after a cached prefix
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt", ["Once upon a time", "def fib(n):\n    return", "<|endoftext|>"])
def test_greedy_ids_match_transformers(ckpt: Path, prompt: str) -> None:
    lm = load(str(ckpt), device="cpu")
    ref = reference(ckpt)
    ids = lm.encode(prompt)
    result = lm.complete(prompt, max_new_tokens=30, temperature=0, ignore_eos=True)
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]),
            max_new_tokens=30,
            do_sample=False,
            min_new_tokens=30,
            pad_token_id=50256,
        )
    assert result.samples[0].token_ids == out[0, len(ids) :].tolist()
    assert result.samples[0].finish_reason == "length"


def test_greedy_batched_samples_equal_single(ckpt_h: Path) -> None:
    lm = load(str(ckpt_h), device="cpu")
    single = lm.complete("Hi there", max_new_tokens=12, temperature=0, ignore_eos=True)
    many = lm.complete("Hi there", max_new_tokens=12, temperature=0, ignore_eos=True, num_samples=3)
    assert [s.token_ids for s in many.samples] == [single.samples[0].token_ids] * 3


def test_window_slide_keeps_generating(tmp_path: Path) -> None:
    from checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path / "small", n_positions=16)
    lm = load(str(path), device="cpu")
    cfg = GenerationConfig(max_new_tokens=40, temperature=0, ignore_eos=True)
    result = None
    for event in lm.stream("a b c d e f g h i j k l m n o p q r s t", cfg):
        result = event
    assert result is not None and result.prompt_truncated > 0
    assert result.samples[0].tokens == 40
    assert result.stats.window_slides >= 1


@pytest.mark.parametrize(
    "variant",
    [
        {"n_inner": 48},
        {"config_extra": {"scale_attn_by_inverse_layer_idx": True}},
        {"config_extra": {"activation_function": "relu"}},
        {"config_extra": {"activation_function": "gelu"}},
        {"config_extra": {"activation_function": "silu"}},
        {"config_extra": {"scale_attn_weights": False}},
    ],
    ids=["n_inner", "inverse_layer_idx", "relu", "gelu", "silu", "unscaled"],
)
def test_config_variants_match_transformers(tmp_path: Path, variant: dict) -> None:
    from checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path / "variant", seed=5, std=0.05, **variant)
    lm = load(str(path), device="cpu")
    ids = torch.tensor([lm.encode("Variants of GPT-2 load and run as transformers runs them.")])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), reference(path)(ids).logits, atol=1e-4, rtol=0)


def test_an_unsupported_activation_is_refused_clearly(tmp_path: Path) -> None:
    from checkpoints import make_checkpoint

    from gpt2cli.errors import NotGPT2Error

    path = make_checkpoint(tmp_path / "odd", config_extra={"activation_function": "quick_gelu"})
    with pytest.raises(NotGPT2Error, match="activation 'quick_gelu' is not supported"):
        load(str(path), device="cpu")


@pytest.fixture(scope="module")
def ckpt_124m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt2's shape (124M parameters) with random weights of std 0.02, as GPT-2 is initialised."""
    from checkpoints import make_checkpoint

    dest = tmp_path_factory.mktemp("m124")
    return make_checkpoint(dest, n_layer=12, n_head=12, n_embd=768, n_positions=1024, std=0.02, seed=0)


def test_124m_shape_logits_greedy_ids_and_perplexity_match_transformers(
    ckpt_124m: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = load(str(ckpt_124m), device="cpu")
    ref = reference(ckpt_124m)
    text = "GPT-2 small has twelve layers, twelve heads and a 768-wide residual stream. " * 3
    ids = [lm.tokenizer.eot_id, *lm.encode(text)]
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = ref(x, labels=x)
        for gemm in ("blas", "onednn"):  # the float32 GEMM either way (kernels.fp32_gemm_path)
            monkeypatch.setenv("GPT2_GEMM", gemm)
            torch.testing.assert_close(
                lm.model(x), theirs.logits, atol=1e-4, rtol=0, msg=lambda m, g=gemm: f"GPT2_GEMM={g}: {m}"
            )
        monkeypatch.delenv("GPT2_GEMM")
        out = ref.generate(
            x[:, :8], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=50256
        )
    ours = lm.complete(ids[:8], max_new_tokens=16, temperature=0, ignore_eos=True)
    assert ours.samples[0].token_ids == out[0, 8:].tolist()
    scored = lm.score(text)
    assert scored.tokens == len(ids) - 1
    assert scored.perplexity == pytest.approx(float(torch.exp(theirs.loss)), rel=1e-4)
