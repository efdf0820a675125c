"""The fused CPU decode step (decode_step.py, numba_kernels.block_step) against the unfused forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint

from gpt2cli import decode_step, kernels, load
from gpt2cli.config import GenerationConfig

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba not installed")

PROMPT = "Once upon a time there was a small model that"
PRECISIONS = [("float32", None), ("bfloat16", None), ("float16", None), ("float32", "int8")]


def decode_steps(lm, ids: torch.Tensor, steps: int, rows: slice | None = None, cache=None):
    """Prefill ids (B, T) (rows of different lengths: each row's padding is left out), then
    ``steps`` one-token steps feeding token 7 + r to row r. Returns the stacked step logits
    (steps, B, V) and the cache."""
    model, (B, T) = lm.model, ids.shape
    rows = rows or slice(0, B)
    cache = cache or model.new_cache(rows.stop, T + steps + 4)
    lengths = [T - r for r in range(B)]  # row r is r tokens shorter
    with torch.inference_mode():
        for r, n in enumerate(lengths):
            row = rows.start + r
            model(ids[r : r + 1, :n], torch.arange(n)[None], cache, rows=slice(row, row + 1))
        out = []
        for s in range(steps):
            pos = torch.tensor([[n + s] for n in lengths])
            feed = torch.tensor([[7 + r + s] for r in range(B)])
            out.append(model(feed, pos, cache, rows=rows, last_only=True))
    return torch.stack(out), cache


def fused_and_unfused(lm, ids: torch.Tensor, steps: int = 4, rows: slice | None = None):
    before = decode_step.calls
    fused, fused_cache = decode_steps(lm, ids, steps, rows)
    assert decode_step.calls == before + steps  # the fused path ran every step
    decode_step.set_enabled(False)
    try:
        plain, plain_cache = decode_steps(lm, ids, steps, rows)
        assert decode_step.calls == before + steps  # ... and was off here
    finally:
        decode_step.set_enabled(True)
    return fused, plain, fused_cache, plain_cache


@pytest.mark.parametrize(("dtype", "quantize"), PRECISIONS)
def test_fused_step_equals_unfused_in_every_precision(ckpt_h: Path, dtype: str, quantize: str | None) -> None:
    lm = load(str(ckpt_h), device="cpu", dtype=dtype, quantize=quantize)
    ids = torch.tensor([lm.encode(PROMPT)] * 3)
    fused, plain, fused_cache, plain_cache = fused_and_unfused(lm, ids, rows=slice(1, 4))
    # The matmuls are the same kernels both ways; LayerNorm, attention and GELU differ by rounding.
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))
    for a, b in zip((*fused_cache.k, *fused_cache.v), (*plain_cache.k, *plain_cache.v), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # keys/values written at each row's position
    assert not fused_cache.k[0][0].any()  # row 0 is not one of these rows: untouched


def test_fused_greedy_equals_reference(ckpt_h: Path) -> None:
    """Kernels and fusion on against every fast path off: greedy ids identical, logits to 1e-4."""
    lm = load(str(ckpt_h), device="cpu")
    ids = torch.tensor([lm.encode(PROMPT)] * 2)
    fused, _ = decode_steps(lm, ids, 6)
    out = lm.complete(PROMPT, max_new_tokens=16, temperature=0, ignore_eos=True).samples[0].token_ids
    kernels.set_enabled(False)
    try:
        before = decode_step.calls
        reference, _ = decode_steps(lm, ids, 6)
        ref_out = lm.complete(PROMPT, max_new_tokens=16, temperature=0, ignore_eos=True).samples[0].token_ids
        assert decode_step.calls == before
    finally:
        kernels.set_enabled(True)
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=0)
    assert out == ref_out


@pytest.mark.parametrize(
    "extra",
    [
        {"activation_function": "gelu"},
        {"activation_function": "relu"},
        {"activation_function": "silu"},
        {"scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": False},
    ],
    ids=["gelu", "relu", "silu", "attn-scales"],
)
def test_fused_step_follows_the_config(tmp_path: Path, extra: dict) -> None:
    ckpt = make_checkpoint(tmp_path, n_layer=2, config_extra=extra, seed=3)
    lm = load(str(ckpt), device="cpu")
    fused, plain, *_ = fused_and_unfused(lm, torch.tensor([lm.encode(PROMPT)] * 2))
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("dtype", "quantize"), [("float32", None), ("float32", "int8")])
def test_fused_step_with_widths_not_a_multiple_of_four(
    tmp_path: Path, dtype: str, quantize: str | None
) -> None:
    """n_embd 30 (q/k/v 90 rows, head_dim 10): the kernels' leftover rows."""
    ckpt = make_checkpoint(tmp_path, n_layer=2, n_head=3, n_embd=30, n_inner=70, seed=4)
    lm = load(str(ckpt), device="cpu", dtype=dtype, quantize=quantize)
    fused, plain, *_ = fused_and_unfused(lm, torch.tensor([lm.encode(PROMPT)] * 5))
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)


def test_block_step_serial_equals_parallel_bit_for_bit(ckpt_h: Path) -> None:
    lm = load(str(ckpt_h), device="cpu", quantize="int8")
    model, c = lm.model, lm.model.config
    operands, scale = decode_step._block_operands(model)[1]
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((6, c.n_embd), dtype=np.float32)
    pos = np.array([0, 3, 9, 1, 5, 2])
    k0 = rng.standard_normal((7, c.n_head, 12, c.head_dim), dtype=np.float32)
    results = []
    for parallel in (False, True):
        for layout in (kernels.BLOCKS, kernels.ROWS, kernels.PREFETCHED_ROWS):  # int8: the same bits
            x, k, v = x0.copy(), k0.copy(), k0.copy() * 2
            kernels.nk().block_step(x, pos, k, v, 1, *operands, 1e-5, scale, 0, parallel, layout)
            results.append((x, k, v))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert np.array_equal(a, b)
    assert not np.array_equal(results[0][0], x0)


@pytest.mark.parametrize(("dtype", "quantize"), PRECISIONS)
def test_one_call_for_all_blocks_is_the_blocks_one_by_one(
    ckpt_h: Path, dtype: str, quantize: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model_step`` (every block in one call, operands by address) gives the bits of one
    ``block_step`` call per block, serial and parallel, KV cache included; where blocks' weight
    types differ there is no table and the blocks go one by one, still right."""
    lm = load(str(ckpt_h), device="cpu", dtype=dtype, quantize=quantize)
    model, c = lm.model, lm.model.config
    assert decode_step._operand_table(model) is not None
    calls: list[str] = []
    nk = kernels.nk()
    for name in ("model_step", "block_step"):
        real = getattr(nk, name)
        monkeypatch.setattr(nk, name, lambda *a, real=real, name=name: (calls.append(name), real(*a))[1])
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, c.n_embd), dtype=np.float32)
    pos = np.array([0, 4, 2])
    table = decode_step._operand_table
    results = {}
    for parallel in (False, True):
        for one_call in (True, False):
            monkeypatch.setattr(decode_step, "_operand_table", table if one_call else lambda model: None)
            cache = model.new_cache(4, 8)
            x = x0.copy()
            calls.clear()
            decode_step._blocks(model, x, pos, cache, 1, parallel)
            assert calls == (["model_step"] if one_call else ["block_step"] * c.n_layer)
            results[parallel, one_call] = (x, torch.stack(cache.k), torch.stack(cache.v))
    first = results[False, True]
    assert not np.array_equal(first[0], x0) and first[1][:, 1:4].abs().sum() > 0
    for other in results.values():
        assert np.array_equal(other[0], first[0])
        assert torch.equal(other[1], first[1]) and torch.equal(other[2], first[2])


def test_a_step_keeps_its_cache_while_another_runs(ckpt_h: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads may decode one model into two caches (``model_step`` releases the GIL): a
    step started while another is between building its table and running it must still
    write into its own cache. The interleaving is made here by running the second step inside
    the first one's call."""
    lm = load(str(ckpt_h), device="cpu")
    model, c = lm.model, lm.model.config
    nk = kernels.nk()
    x0 = np.random.default_rng(2).standard_normal((1, c.n_embd), dtype=np.float32)
    expected = model.new_cache(1, 8)
    x_expected = x0.copy()
    decode_step._blocks(model, x_expected, np.array([3]), expected, 0, False)
    real, other = nk.model_step, model.new_cache(1, 8)

    def interleaved(*args: object) -> None:
        monkeypatch.setattr(nk, "model_step", real)
        decode_step._blocks(model, x0 * 2, np.array([5]), other, 0, False)  # the other thread's step
        real(*args)

    monkeypatch.setattr(nk, "model_step", interleaved)
    cache, x = model.new_cache(1, 8), x0.copy()
    decode_step._blocks(model, x, np.array([3]), cache, 0, False)
    assert np.array_equal(x, x_expected)
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, expected.k + expected.v, strict=True))
    assert other.k[0][0, :, 5].abs().sum() > 0 and other.k[0][0, :, 3].abs().sum() == 0


def test_mixed_weight_types_take_one_call_per_block(ckpt_h: Path) -> None:
    lm = load(str(ckpt_h), device="cpu")
    model = lm.model
    ids = torch.tensor([lm.encode(PROMPT)])
    reference, _ = decode_steps(lm, ids, 3)
    with torch.no_grad():  # block 1's c_fc in bfloat16, the rest float32: types differ
        fc = model.h[1].mlp.c_fc
        fc.weight = torch.nn.Parameter(fc.weight.detach().to(torch.bfloat16), requires_grad=False)
    assert decode_step._operand_table(model) is None
    mixed, _ = decode_steps(lm, ids, 3)
    # the weights moved by bf16 rounding only; the step still runs fused (one call per block)
    torch.testing.assert_close(mixed, reference, atol=5e-2, rtol=0)
    assert not torch.equal(mixed, reference)


def test_unfused_where_something_would_notice(ckpt_h: Path) -> None:
    """Hooks, autograd and a prompt of several tokens take the ordinary forward."""
    lm = load(str(ckpt_h), device="cpu")
    model = lm.model
    cache = model.new_cache(1, 16)
    before = decode_step.calls
    seen = []
    with model.hooked({"blocks.0.hook_resid_pre": seen.append}), torch.inference_mode():
        model(torch.tensor([[5]]), torch.tensor([[0]]), cache)
    model(torch.tensor([[5]]), torch.tensor([[1]]), cache)  # autograd on
    with torch.inference_mode():
        model(torch.tensor([[5, 6]]), torch.tensor([[2, 3]]), cache)
    assert decode_step.calls == before and len(seen) == 1
    with torch.inference_mode():
        model(torch.tensor([[5]]), torch.tensor([[4]]), cache)
    assert decode_step.calls == before + 1


def test_replaced_weights_are_read_afresh(ckpt_h: Path) -> None:
    """The per-model operands are rebuilt when a weight's storage changes (not served stale)."""
    lm = load(str(ckpt_h), device="cpu")
    ids = torch.tensor([lm.encode(PROMPT)])
    first, _ = decode_steps(lm, ids, 2)
    with torch.no_grad():
        for block in lm.model.h:
            block.mlp.c_fc.weight.data = block.mlp.c_fc.weight.data * 3  # new storage
    fused, plain, *_ = fused_and_unfused(lm, ids, steps=2)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(fused, first, atol=1e-3)


def test_fused_decode_in_the_engine_with_rows_joining(ckpt_h: Path) -> None:
    """generate_many (continuous batching, rows at different positions) equals each prompt alone."""
    lm = load(str(ckpt_h), device="cpu", quantize="int8")
    prompts = [PROMPT, "A short one", PROMPT + " and then some more words to make it long"]
    before = decode_step.calls
    cfg = GenerationConfig(max_new_tokens=10, temperature=0, ignore_eos=True)
    together = [r.samples[0].token_ids for r in lm.generate_many(prompts, cfg)]
    assert decode_step.calls > before
    alone = [r.samples[0].token_ids for r in lm.generate_many(prompts, cfg, max_batch=1)]
    assert together == alone


def test_gpt2_kernels_unfused_turns_it_off(ckpt_h: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = load(str(ckpt_h), device="cpu")
    ids = torch.tensor([lm.encode(PROMPT)])
    monkeypatch.setenv("GPT2_KERNELS", "unfused")
    before = decode_step.calls
    plain, _ = decode_steps(lm, ids, 3)
    assert decode_step.calls == before
    monkeypatch.delenv("GPT2_KERNELS")
    fused, _ = decode_steps(lm, ids, 3)
    assert decode_step.calls == before + 3
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)


def test_int8_row_is_the_same_bits_alone_or_in_a_batch(ckpt_h: Path) -> None:
    """int8 sums are exact and everything else is per row: a row's decode logits do not depend
    on how many other rows share its step (as served by continuous batching)."""
    lm = load(str(ckpt_h), device="cpu", quantize="int8")
    ids = torch.tensor([lm.encode(PROMPT)] * 6)
    together, _ = decode_steps(lm, ids, 3)  # (steps, 6, V): rows of different lengths
    before = decode_step.calls
    for r in range(6):  # row r alone: the same prompt length, the same fed tokens
        model, n = lm.model, ids.shape[1] - r
        cache = model.new_cache(1, ids.shape[1] + 7)
        with torch.inference_mode():
            model(ids[r : r + 1, :n], torch.arange(n)[None], cache)
            for s in range(3):
                alone = model(torch.tensor([[7 + r + s]]), torch.tensor([[n + s]]), cache, last_only=True)
                torch.testing.assert_close(alone[0], together[s, r], atol=0, rtol=0)
    assert decode_step.calls == before + 18  # every step alone was fused too


@pytest.mark.parametrize(("dtype", "quantize"), PRECISIONS)
def test_the_step_takes_the_layout_of_its_weights(
    ckpt_h: Path, dtype: str, quantize: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an Intel CPU with AMX half weights go in blocks, int8 in prefetched rows; on an AMD CPU
    both one row at a time; float32 in blocks: the choice reaches ``model_step`` and ``block_step``."""
    lm = load(str(ckpt_h), device="cpu", dtype=dtype, quantize=quantize)
    model, c = lm.model, lm.model.config
    seen: list[int] = []
    nk = kernels.nk()
    for name in ("model_step", "block_step"):
        real = getattr(nk, name)
        monkeypatch.setattr(nk, name, lambda *a, real=real: (seen.append(a[-1]), real(*a))[1])
    monkeypatch.delenv("GPT2_GEMV", raising=False)
    x = np.random.default_rng(1).standard_normal((1, c.n_embd), dtype=np.float32)
    table = decode_step._operand_table
    f32 = dtype == "float32" and quantize is None
    on_intel = kernels.PREFETCHED_ROWS if quantize == "int8" else kernels.BLOCKS
    on_amd = kernels.BLOCKS if f32 else kernels.ROWS
    for vendor, amx, want in (("GenuineIntel", True, on_intel), ("AuthenticAMD", False, on_amd)):
        monkeypatch.setattr(kernels, "_cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(kernels, "_has_amx", lambda amx=amx: amx)
        for one_call in (True, False):
            monkeypatch.setattr(decode_step, "_operand_table", table if one_call else lambda model: None)
            seen.clear()
            decode_step._blocks(model, x.copy(), np.array([0]), model.new_cache(1, 4), 0, True)
            assert seen and set(seen) == {want}, (vendor, one_call, seen)
