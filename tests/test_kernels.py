"""Every CPU matmul path of kernels.py against the float32 reference: the numba decode kernels
(float32, bfloat16, float16; int8 on each instruction set), the half-precision and int8 GEMMs for many rows, the
pure-torch fallbacks (kernels off, or a CPU without the instructions), the custom ops that
carry the kernels into torch.compile graphs, and the int8 embedding lookup."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2cli import kernels
from gpt2cli.quantize import quantize_rows

needs_numba = pytest.mark.skipif(not kernels.available(), reason="numba not installed")
HALF = [torch.bfloat16, torch.float16]


def _data(out_f: int, in_f: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen)
    x = torch.randn(rows, in_f, generator=gen)
    return x, w, b


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The numpy dtype of the weight of every numba kernel call: proves which path ran."""
    calls: list[str] = []

    def counted(real: Callable) -> Callable:
        def call(x, w, *rest):
            calls.append(str(w.dtype))
            return real(x, w, *rest)

        return call

    for name in ("gemv", "gemv_serial", "gemv_i8", "gemv_i8_serial"):
        monkeypatch.setattr(kernels._nk, name, counted(getattr(kernels._nk, name)))
    return calls


def _int8_by_definition(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    """What an int8 layer computes on CPU, in plain torch: x rounded to int8 per row, the
    products summed exactly (int64 here), rescaled by x's and the weight's scales, plus bias."""
    xs = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    xq = torch.round(x / xs).long()
    y = (xq @ q.long().T).float().mul_(xs).mul_(scale)
    return y.add_(b) if b is not None else y


@needs_numba
@pytest.mark.parametrize("rows", [1, 3, 6, 16])  # 6: a tile of four rows of x and two alone
@pytest.mark.parametrize(("out_f", "in_f", "bias"), [(96, 32, True), (37, 130, True), (300, 64, False)])
def test_gemv_f32_matches_f_linear(spy, rows: int, out_f: int, in_f: int, bias: bool) -> None:
    x, w, b = _data(out_f, in_f, rows)
    bb = b if bias else None
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, w, bb), F.linear(x, w, bb), atol=1e-5, rtol=1e-5)
        # leading dims are kept: (B, T, in) -> (B, T, out)
        y3 = kernels.linear(x.view(rows, 1, in_f), w, bb)
    assert y3.shape == (rows, 1, out_f)
    assert spy == ["float32", "float32"]


@needs_numba
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows", [1, 3, 5])  # 1, 3: one weight row at a time; 5: blocks of four
def test_gemv_half_accumulates_in_float32(spy, dtype: torch.dtype, rows: int) -> None:
    x, w, b = _data(77, 200, rows)
    wh = w.to(dtype)
    with torch.inference_mode():
        y = kernels.linear(x, wh, b)
    # float32 x times the exactly widened weights: only summation order differs
    torch.testing.assert_close(y, F.linear(x, wh.float(), b), atol=1e-5, rtol=1e-5)
    assert y.dtype == torch.float32 and spy == ["uint16" if dtype == torch.bfloat16 else "int16"]


@needs_numba
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8, 16])  # tiles of four rows of x and rows alone
# a tail in both dims; 128: whole chunks on every tier (one row of x: the row-at-a-time path)
@pytest.mark.parametrize(("out_f", "in_f"), [(64, 48), (65, 200), (9, 3), (67, 128)])
def test_gemv_int8_is_the_int8_definition_bit_for_bit(
    spy, monkeypatch, rows: int, out_f: int, in_f: int
) -> None:
    """The int8 decode GEMV: x rounded per row, exact int32 sums (VNNI here where the CPU has
    it), the strict epilogue: the same bits as the definition in torch and as the many-row GEMM
    (torch's _int_mm here; the other many-row path is this kernel)."""
    monkeypatch.setenv("GPT2_INT8_GEMM", "int-mm")
    x, w, b = _data(out_f, in_f, rows)
    q, scale = quantize_rows(w)
    for bias in (b, None):
        y = kernels.linear_int8(x, q, scale, bias)
        torch.testing.assert_close(y, _int8_by_definition(x, q, scale, bias), atol=0, rtol=0)
        many = kernels.linear_int8(x.repeat(20, 1), q, scale, bias)  # > 16 rows: the GEMM path
        torch.testing.assert_close(many[:rows], y, atol=0, rtol=0)
    assert spy == ["int8", "int8"]
    dequantised = F.linear(x, q.float() * scale[:, None], b)
    assert ((y - F.linear(x, q.float() * scale[:, None])).norm() / dequantised.norm()) < 0.02


_TIERS = {  # tier: (numba's target CPU, its features, what the host must have to run it)
    "vnni256": ("alderlake", "+avx2,+avxvnni,+fma,+f16c,+popcnt", "avxvnni"),
    "avx2": ("haswell", "+avx2,+fma,+f16c,+popcnt", "avx2"),
    "generic": ("x86-64", "+sse2", "sse2"),
}
_TIER_SCRIPT = """
import sys, numpy as np
from gpt2cli import numba_kernels as nk
assert nk.DOT_TIER == sys.argv[1], nk.DOT_TIER
for case in ("blocks", "row"):
    data = np.load(sys.argv[2] + case + ".npz")
    for name in ("gemv_i8", "gemv_i8_serial"):
        out = np.empty((data["x"].shape[0], data["w"].shape[0]), np.float32)
        layout = nk.PREFETCHED_ROWS if case == "row" else nk.BLOCKS
        getattr(nk, name)(data["x"], data["w"], data["scale"], data["b"], data["sums"], out, layout)
        np.save(sys.argv[3] + case + name + ".npy", out)
if sys.argv[1] == "generic":  # no F16C: float16 weights widened in integer operations, exactly
    assert nk._SOFT_F16
    bits = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    finite = bits[(bits.view(np.uint16) & 0x7C00) != 0x7C00].reshape(-1, 8)
    ones, zeros = np.ones(finite.shape[0], np.float32), np.zeros(finite.shape[0], np.float32)
    for j in range(8):  # x = e_j picks column j: out = the widened values, bit for bit
        out = np.empty((1, finite.shape[0]), np.float32)
        nk.gemv_serial(np.eye(8, dtype=np.float32)[j : j + 1], finite, ones, zeros, out, True)
        assert (out[0] == finite[:, j].view(np.float16).astype(np.float32)).all(), j
"""


@needs_numba
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("tier", list(_TIERS))
def test_every_int8_instruction_set_gives_the_same_bits(tier: str, tmp_path: Path) -> None:
    """numba compiled for an older x86 CPU (its instruction set for the int8 dot products) gives
    the same bits as this CPU's own tier: the sums are exact whichever instructions made them.
    Plain x86-64 (no F16C) also widens float16 weights without a fatal LLVM error."""
    from gpt2cli import numba_kernels as nk

    cpu, features, needs = _TIERS[tier]
    if needs not in nk._target_features():
        pytest.skip(f"this CPU has no {needs}")
    cases = {  # 33 blocks of four rows and one alone, 200 = chunks and a tail; one row of x
        "blocks": _data(133, 200, 6),
        "row": _data(133, 128, 1),
    }
    for case, (x, w, b) in cases.items():
        q, scale = quantize_rows(w)
        sums = q.sum(dim=1, dtype=torch.int32).numpy()
        arrays = {"x": x.numpy(), "w": q.numpy(), "scale": scale.numpy(), "b": b.numpy(), "sums": sums}
        np.savez(tmp_path / f"data_{case}.npz", **arrays)
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": cpu,
        "NUMBA_CPU_FEATURES": features,
        "NUMBA_CACHE_DIR": str(tmp_path),
    }
    args = [sys.executable, "-c", _TIER_SCRIPT, tier, str(tmp_path / "data_"), str(tmp_path / "out_")]
    subprocess.run(args, env=env, check=True, timeout=600)
    for case, (x, w, b) in cases.items():
        q, scale = quantize_rows(w)
        sums = q.sum(dim=1, dtype=torch.int32).numpy()
        here = torch.empty(x.shape[0], 133)
        nk.gemv_i8(x.numpy(), q.numpy(), scale.numpy(), b.numpy(), sums, here.numpy(), case == "row")
        torch.testing.assert_close(here, _int8_by_definition(x, q, scale, b), atol=0, rtol=0)
        for name in ("gemv_i8", "gemv_i8_serial"):
            theirs = torch.from_numpy(np.load(tmp_path / f"out_{case}{name}.npy"))
            torch.testing.assert_close(theirs, here, atol=0, rtol=0, msg=f"{case} {name}")


_ROW_SUMS_RSS = """
import re, torch
from gpt2cli import kernels
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
gen = torch.Generator().manual_seed(0)
weights = [torch.randint(-127, 128, (3072, 768), dtype=torch.int8, generator=gen) for _ in range(24)]
before = rss()
sums = [kernels._row_sums(w) for w in weights]
print(rss() - before, sum(w.numel() for w in weights))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_int8_row_sums_take_no_copy_of_the_weights() -> None:
    """The row sums the int8 GEMV needs cost 4 bytes a row, not a transient int32 copy of each
    matrix (torch's sum(dtype=int32) made one, and the freed copies stayed in the process: +217
    MiB for the 124M model's blocks, whose int8 weights are 85 MiB)."""
    done = subprocess.run([sys.executable, "-c", _ROW_SUMS_RSS], capture_output=True, text=True, check=True)
    grown, weight_bytes = map(int, done.stdout.split())
    assert grown < weight_bytes // 4, (grown, weight_bytes)


@needs_numba
def test_int8_row_sums_follow_the_weight() -> None:
    """The GEMV's per-weight row sums (VNNI's correction) are redone when the weight changes in
    place, and inference-mode weights (no version counter) work too."""
    x, w, b = _data(64, 128, 2)
    q, scale = quantize_rows(w)
    kernels.linear_int8(x, q, scale, b)  # row sums computed and kept
    q.neg_()  # same storage, new values
    torch.testing.assert_close(
        kernels.linear_int8(x, q, scale, b), _int8_by_definition(x, q, scale, b), atol=0, rtol=0
    )
    with torch.inference_mode():
        qi, si = quantize_rows(w)
        torch.testing.assert_close(
            kernels.linear_int8(x, qi, si, b), _int8_by_definition(x, qi, si, b), atol=0, rtol=0
        )


LAYOUTS = (kernels.BLOCKS, kernels.ROWS, kernels.PREFETCHED_ROWS)


@needs_numba
def test_serial_and_parallel_kernels_are_bit_identical() -> None:
    """One thread runs the serial twins: the sums must not change with the thread count, nor
    with the prefetch, nor (int8 weights; half weights where the CPU has AVX-512) with the
    weight-row layout: blocks or rows. float32's rows, and half's on AVX2 CPUs, sum in another
    order than their blocks (within rounding)."""
    nk = kernels._nk
    x, w, b = _data(
        333, 256, 7
    )  # 333 rows: 83 blocks of four (float32: 41 of eight, one of four) and one; x: a tile and three
    q, scale = quantize_rows(w)
    ones = torch.ones(333).numpy()
    cases = {
        "f32": (w.numpy(), ones),
        "bf16": (w.to(torch.bfloat16).view(torch.uint16).numpy(), ones),
        "f16": (w.to(torch.float16).view(torch.int16).numpy(), ones),
    }
    for kind, (weights, sc) in cases.items():
        by_batch = []
        for xr in (x, x[4:6], x[4:5]):  # fewer than four rows: the layout choice applies
            outs = {}
            for kernel in (nk.gemv, nk.gemv_serial):
                for layout in LAYOUTS:
                    out = torch.empty(xr.shape[0], 333)
                    kernel(xr.contiguous().numpy(), weights, sc, b.numpy(), out.numpy(), layout)
                    outs[kernel, layout] = out
            blocks = outs[nk.gemv, kernels.BLOCKS]
            for layout in LAYOUTS:  # the thread count changes no bit
                assert torch.equal(outs[nk.gemv, layout], outs[nk.gemv_serial, layout]), (kind, layout)
            rows = outs[nk.gemv, kernels.ROWS]
            assert torch.equal(rows, outs[nk.gemv, kernels.PREFETCHED_ROWS]), kind  # prefetch: no bit
            if kind != "f32" and "avx512f" in nk._target_features():
                assert torch.equal(rows, blocks), (kind, xr.shape[0])
            else:  # the vectorizer orders each loop's sums by the registers it has
                torch.testing.assert_close(rows, blocks, atol=1e-4, rtol=1e-5)
            by_batch.append(blocks)
        # rows 4 and 5 alone get the bits they get in the batch of 7 (outside its tile)
        assert torch.equal(by_batch[1], by_batch[0][4:6]), kind
        assert torch.equal(by_batch[2], by_batch[0][4:5]), kind
    sums = q.sum(dim=1, dtype=torch.int32).numpy()
    for xr in (x, x[4:5]):  # one row of x (whole chunks): the layout choice applies
        int8_outs = []
        for kernel in (nk.gemv_i8, nk.gemv_i8_serial):
            for layout in LAYOUTS:
                out = torch.empty(xr.shape[0], 333)
                kernel(
                    xr.contiguous().numpy(), q.numpy(), scale.numpy(), b.numpy(), sums, out.numpy(), layout
                )
                int8_outs.append(out)
        assert all(torch.equal(int8_outs[0], o) for o in int8_outs[1:]), ("i8", xr.shape[0])


@needs_numba
def test_gemv_layout_follows_the_cpu_and_gpt2_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch-1 decode reads half and int8 weight rows one at a time on AMD CPUs, prefetched on
    Intel's, half weights in four-row blocks on CPUs with AMX, float32 in blocks;
    GPT2_GEMV=rows|prefetched-rows|blocks decides by hand (float32 too). The choice reaches the
    kernel (a spy on its last argument)."""
    seen: list[int] = []
    real = kernels._nk.gemv

    def spied(*args: Any) -> None:
        seen.append(args[-1])
        real(*args)

    monkeypatch.setattr(kernels._nk, "gemv", spied)
    monkeypatch.setattr(kernels._nk, "gemv_serial", spied)
    x, w, b = _data(40, 64, 1)
    blocks, rows, prefetched = LAYOUTS
    intel, amd = "GenuineIntel", "AuthenticAMD"
    for vendor, amx, env, want in [  # want: the layouts of (half, float32, int8) weights
        (intel, False, None, (prefetched, blocks, prefetched)),
        (intel, True, None, (blocks, blocks, prefetched)),
        (intel, True, "auto", (blocks, blocks, prefetched)),
        (intel, True, "sideways", (blocks, blocks, prefetched)),  # unknown: auto
        (amd, False, None, (rows, blocks, rows)),
        (intel, True, "rows", (rows, rows, rows)),
        (amd, False, "prefetched-rows", (prefetched, prefetched, prefetched)),
        (amd, False, " Blocks ", (blocks, blocks, blocks)),
    ]:
        monkeypatch.setattr(kernels, "_has_amx", lambda amx=amx: amx)
        monkeypatch.setattr(kernels, "_cpu_vendor", lambda vendor=vendor: vendor)
        if env is None:
            monkeypatch.delenv("GPT2_GEMV", raising=False)
        else:
            monkeypatch.setenv("GPT2_GEMV", env)
        case = (vendor, amx, env)
        for dtype, layout in ((torch.bfloat16, want[0]), (torch.float16, want[0]), (torch.float32, want[1])):
            assert kernels.gemv_layout(kernels.gemv_operands(w.to(dtype), None, None)[0]) == layout, case
            seen.clear()
            kernels.linear(x, w.to(dtype), b)
            assert seen == [layout], (case, dtype)
        assert kernels.gemv_layout(kernels.gemv_operands(*quantize_rows(w), None)[0]) == want[2], case


needs_onednn = pytest.mark.skipif(not kernels._has_onednn_linear(), reason="torch without oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The input shape of every oneDNN float32 GEMM call: proves which path ran."""
    calls: list[tuple[int, ...]] = []
    real = kernels._onednn_linear

    def counted(x, w, b):
        calls.append(tuple(x.shape))
        return real(x, w, b)

    monkeypatch.setattr(kernels, "_onednn_linear", counted)
    return calls


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_env_chooses_the_float32_gemm(monkeypatch, onednn_calls, bias: bool) -> None:
    x, w, b = _data(300, 130, 40)  # 40 rows > SMALL_BATCH: the GEMM path
    bias_t = b if bias else None
    x3 = x.view(2, 20, 130)  # (B, T, C), as the model calls it
    reference = F.linear(x3, w, bias_t)
    monkeypatch.setenv("GPT2_GEMM", "blas")
    assert kernels.fp32_gemm_path() == "blas"
    assert torch.equal(kernels.linear(x3, w, bias_t), reference) and onednn_calls == []
    monkeypatch.setenv("GPT2_GEMM", "onednn")
    assert kernels.fp32_gemm_path() == "onednn"
    y = kernels.linear(x3, w, bias_t)
    assert onednn_calls == [(2, 20, 130)] and y.shape == (2, 20, 300)
    torch.testing.assert_close(y, reference, atol=1e-4, rtol=1e-5)
    kernels.linear(x[:16], w, bias_t)  # up to SMALL_BATCH rows: the decode kernels, never a GEMM
    doubled = kernels.linear(x.double(), w.double(), None)  # not float32: torch's own path
    assert len(onednn_calls) == 1 and doubled.dtype == torch.float64


@needs_onednn
def test_onednn_gemm_rows_do_not_depend_on_batch_or_threads(monkeypatch, onednn_calls) -> None:
    """A row's bits whatever else is in the batch and however many threads: what keeps greedy
    ids and scores identical across batch sizes and ``--threads`` on the oneDNN path."""
    monkeypatch.setenv("GPT2_GEMM", "onednn")
    x, w, b = _data(2304, 768, 64)
    whole = kernels.linear(x, w, b)
    part = kernels.linear(x[:20], w, b)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = kernels.linear(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert len(onednn_calls) == 3
    assert torch.equal(whole[:20], part) and torch.equal(whole, one_thread)


def test_gemm_auto_follows_the_cpu_vendor(monkeypatch) -> None:
    monkeypatch.delenv("GPT2_GEMM", raising=False)
    monkeypatch.setattr(kernels, "_has_onednn_linear", lambda: True)
    for vendor, path in [("AuthenticAMD", "onednn"), ("GenuineIntel", "blas"), ("", "blas")]:
        monkeypatch.setattr(kernels, "_cpu_vendor", lambda v=vendor: v)
        assert kernels.fp32_gemm_path() == path, vendor
    monkeypatch.setattr(kernels, "_cpu_vendor", lambda: "AuthenticAMD")
    kernels.set_enabled(False)
    try:
        assert kernels.fp32_gemm_path() == "blas"  # the reference never changes path
    finally:
        kernels.set_enabled(True)
    monkeypatch.setattr(kernels, "_has_onednn_linear", lambda: False)
    monkeypatch.setenv("GPT2_GEMM", "onednn")
    assert kernels.fp32_gemm_path() == "blas"


def test_int8_gemm_is_exact_on_row_quantised_activations() -> None:
    x, w, b = _data(50, 96, 40)  # 40 rows > SMALL_BATCH: the GEMM path
    q, scale = quantize_rows(w)
    xq, xs = kernels.quantize_rows_dynamic(x)
    # the int32 sums are exact: the only error is x's rounding to 8 bits per row
    exact = (xq.double() @ q.double().T) * xs.double() * scale.double() + b.double()
    y = kernels.linear_int8(x, q, scale, b)
    torch.testing.assert_close(y.double(), exact, atol=1e-4, rtol=1e-5)
    reference = F.linear(x, q.float() * scale[:, None], b)
    assert not torch.equal(y, reference)  # the GEMM path ran, not the dequantised one
    assert ((y - reference).norm() / reference.norm()) < 0.01


@needs_numba
def test_both_int8_gemm_paths_give_the_same_bits(spy, monkeypatch) -> None:
    """GPT2_INT8_GEMM=int-mm (torch's _int_mm, the default with VNNI or AMX) and numba (gemv_i8
    over all the rows, the default without) sum the same int8 products exactly: the same bits,
    at any row count; each choice takes effect; with the fast paths off, _int_mm."""
    x, w, b = _data(70, 200, 2 * 45)
    q, scale = quantize_rows(w)
    outs = {}
    for path in ("int-mm", "numba"):
        monkeypatch.setenv("GPT2_INT8_GEMM", path)
        assert kernels.int8_gemm_path() == path
        spy.clear()
        outs[path] = kernels.linear_int8(x.view(2, 45, 200), q, scale, b)
        assert (spy == ["int8"]) == (path == "numba"), (path, spy)
    assert outs["numba"].shape == (2, 45, 70)
    assert torch.equal(outs["numba"], outs["int-mm"])
    torch.testing.assert_close(
        outs["numba"].view(90, 70), _int8_by_definition(x, q, scale, b), atol=1e-4, rtol=1e-5
    )
    monkeypatch.delenv("GPT2_INT8_GEMM")
    assert kernels.int8_gemm_path() == ("int-mm" if kernels._fast_int_mm() else "numba")
    monkeypatch.setenv("GPT2_INT8_GEMM", "numba")
    kernels.set_enabled(False)
    try:
        assert kernels.int8_gemm_path() == "int-mm"  # the reference never changes path
    finally:
        kernels.set_enabled(True)


def test_int8_gemm_auto_follows_the_cpu_features(monkeypatch) -> None:
    """_int_mm where oneDNN has VNNI (AVX-512 or AVX) or AMX for it, or off x86; numba elsewhere."""
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    for torch_has, flags, fast in [
        ({"_is_vnni_supported"}, "avx2 avx512f avx512_vnni", True),
        ({"_is_amx_tile_supported"}, "avx2 amx_tile", True),
        (set(), "avx2 avx_vnni", True),
        (set(), "fpu avx2 fma", False),
        (set(), "", False),
    ]:
        monkeypatch.setattr(kernels, "_torch_cpu_has", lambda name, has=torch_has: name in has)
        monkeypatch.setattr(kernels, "_cpu_flags", lambda f=flags: frozenset(f.split()))
        assert kernels._fast_int_mm.__wrapped__() is fast, (torch_has, flags)
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    assert kernels._fast_int_mm.__wrapped__() is True


@needs_numba
@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu", "silu"])
def test_int8_mlp_equals_its_two_layers(act: str, monkeypatch) -> None:
    """The fused int8 MLP (bias, activation and re-quantisation in one pass) against the two
    int8 layers and the activation run one by one: the same arithmetic, float32 rounding apart."""
    from gpt2cli.model import activation
    from gpt2cli.quantize import QLinear

    x, w1, b1 = _data(144, 36, 3 * 17)
    _, w2, b2 = _data(36, 144, 1, seed=1)
    fc, proj = QLinear(torch.nn.Linear(36, 144)), QLinear(torch.nn.Linear(144, 36))
    for layer, w, b in ((fc, w1, b1), (proj, w2, b2)):
        layer.qweight, layer.scale = quantize_rows(w)
        layer.bias = b
    x = x.view(3, 17, 36)
    monkeypatch.setenv("GPT2_INT8_GEMM", "numba")
    assert kernels.int8_mlp(x, fc, proj, act) is None  # the numba path runs the layers one by one
    monkeypatch.setenv("GPT2_INT8_GEMM", "int-mm")
    with torch.inference_mode():
        fused = kernels.int8_mlp(x, fc, proj, act)
        one_by_one = proj(activation(act, fc(x)))
        assert kernels.int8_mlp(x[:, :5], fc, proj, act) is None  # 15 rows: the GEMV path instead
    assert fused is not None and fused.shape == (3, 17, 36)
    torch.testing.assert_close(fused, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", HALF)
def test_half_gemm_close_to_float32(dtype: torch.dtype) -> None:
    x, w, b = _data(70, 96, 33)
    wh = w.to(dtype)
    y = kernels.linear(x, wh, b)
    reference = F.linear(x, wh.float(), b)
    assert y.dtype == torch.float32
    # x and the product are rounded to the half dtype on the oneDNN path
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert ((y - reference).norm() / reference.norm()) < 2 * eps


def test_without_cpu_support_every_path_is_the_torch_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX2-only CPU (no bf16/f16 GEMM): half weights converted per call; int8 is the same
    arithmetic on every CPU."""
    monkeypatch.setattr(kernels, "_capabilities", lambda: frozenset())
    x, w, b = _data(70, 96, 33)
    for dtype in HALF:
        wh = w.to(dtype)
        torch.testing.assert_close(kernels.linear(x, wh, b), F.linear(x, wh.float(), b), atol=1e-6, rtol=1e-6)
    q, scale = quantize_rows(w)
    torch.testing.assert_close(
        kernels.linear_int8(x, q, scale, b), _int8_by_definition(x, q, scale, b), atol=0, rtol=0
    )


def test_bf16_gemm_only_where_the_cpu_multiplies_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN emulates bf16 on x86 CPUs without AVX512-BF16 or AMX, 3-4x slower than widening
    the weight: there the weight is widened per call (the float32 result, bit for bit)."""
    x, w, b = _data(70, 96, 33)
    wh = w.to(torch.bfloat16)
    onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    try:
        for native in (False, True):
            with monkeypatch.context() as patch:
                patch.setattr(kernels.platform, "machine", lambda: "x86_64")
                patch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
                patch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
                kernels._capabilities.cache_clear()
                assert ("bf16" in kernels._capabilities()) == (native and onednn_bf16)
                y = kernels.linear(x, wh, b)
            widened = F.linear(x, wh.float(), b)
            if native and onednn_bf16:  # x rounded to bf16: close, not equal
                assert not torch.equal(y, widened)
            else:
                torch.testing.assert_close(y, widened, atol=1e-6, rtol=1e-6)
    finally:
        kernels._capabilities.cache_clear()


def test_half_weights_are_widened_a_block_of_rows_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a half-precision GEMM a half weight is widened to float32 in blocks of rows
    (never a float32 copy of the whole matrix), with the float32 GEMM's result."""
    monkeypatch.setattr(kernels, "_capabilities", lambda: frozenset())
    monkeypatch.setattr(kernels, "WIDEN_BLOCK_BYTES", 96 * 4 * 10)  # ten rows of 96 a block
    widened: list[tuple[int, ...]] = []
    real = kernels._gemm

    def spied(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        widened.append(tuple(weight.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(kernels, "_gemm", spied)
    x, w, b = _data(33, 96, 40)
    for dtype in HALF:
        for bias in (b, None):
            widened.clear()
            wh = w.to(dtype)
            y = kernels.linear(x.view(4, 10, 96), wh, bias)
            assert y.shape == (4, 10, 33)
            torch.testing.assert_close(y.view(40, 33), F.linear(x, wh.float(), bias), atol=1e-6, rtol=1e-6)
            assert widened == [(10, 96), (10, 96), (10, 96), (3, 96)]


def test_kernels_off_is_the_torch_reference() -> None:
    x1, w, b = _data(70, 96, 1)
    x40 = torch.randn(40, 96)
    q, scale = quantize_rows(w)
    kernels.set_enabled(False)
    try:
        assert not kernels.is_enabled()
        for x in (x1, x40):
            torch.testing.assert_close(kernels.linear(x, w, b), F.linear(x, w, b), atol=0, rtol=0)
            expected = _int8_by_definition(x, q, scale, b)
            torch.testing.assert_close(kernels.linear_int8(x, q, scale, b), expected, atol=0, rtol=0)
        torch.testing.assert_close(kernels.linear(x40, w.half(), b), F.linear(x40, w.half().float(), b))
    finally:
        kernels.set_enabled(True)


def test_int8_embedding_dequantises_the_rows_it_reads() -> None:
    _, w, _ = _data(300, 24, 1)
    q, scale = quantize_rows(w)
    ids = torch.tensor([[3, 7, 299], [0, 3, 150]])
    expected = q[ids].float() * scale[ids].unsqueeze(-1)
    torch.testing.assert_close(kernels.embedding_int8(ids, q, scale), expected, atol=0, rtol=0)
    kernels.set_enabled(False)
    try:
        torch.testing.assert_close(kernels.embedding_int8(ids, q, scale), expected, atol=0, rtol=0)
    finally:
        kernels.set_enabled(True)


@needs_numba
def test_custom_ops_pass_opcheck() -> None:
    """Schema, fake (meta) implementation and eager results agree, as torch.compile needs."""
    x, w, b = _data(40, 32, 2)
    q, scale = quantize_rows(w)
    for weight in (w, w.to(torch.bfloat16), w.to(torch.float16)):
        torch.library.opcheck(torch.ops.gpt2cli.gemv.default, (x, weight, b))
    torch.library.opcheck(torch.ops.gpt2cli.gemv.default, (x, w, None))
    torch.library.opcheck(torch.ops.gpt2cli.gemv_int8.default, (x, q, scale, b))


@needs_numba
def test_compiled_graph_calls_the_kernels() -> None:
    """Inside torch.compile half and int8 decode matmuls stay numba kernels (custom ops);
    float32 ones are torch's (as fast at the memory bus, and inductor fuses around them)."""
    x, w32, b = _data(40, 32, 1)
    w = w32.to(torch.bfloat16)
    q, scale = quantize_rows(w32)
    seen: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def step(x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(kernels.linear(x, w, b)) + kernels.linear(x, w32, b)
        return kernels.linear_int8(h[:, :32], q, scale, b)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=recording_backend, fullgraph=True)
    with torch.inference_mode():
        # eager runs the float32 matmul in numba, compiled in torch: rounding apart, the same
        torch.testing.assert_close(compiled(x), step(x), atol=1e-4, rtol=1e-5)
    assert seen.count("gpt2cli.gemv") == 1 and "gpt2cli.gemv_int8" in seen, seen
    assert any("linear" in target for target in seen), seen  # the float32 one
