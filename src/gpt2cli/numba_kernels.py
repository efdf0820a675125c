"""The numba bodies of the CPU decode kernels: matrix times a few rows, bound by reading the weight.

Imported by ``kernels.py`` only where numba is installed; ``kernels.py`` owns the choice of
path, the threads and the torch-facing wrappers. Every kernel computes, for x (B, in) and a
weight (out, in) in its storage type,

    out[r, o] = scale[o] * sum_i x[r, i] * w[o, i]  +  b[o]      (scale: 1 unless int8)

with one dot product per output row, rows split between threads (``prange``) or run in the
calling thread (the ``_serial`` twins). Each weight
row is read from memory once and reused from L1 for every row of x, so B <= 16 rows cost
little more than one. ``fastmath`` lets LLVM vectorise the reduction (reassociated sums): the
result differs from BLAS by rounding only (~1e-6 relative). The order of the sum does not
depend on the number of threads, so the output is bit-identical for 1, 2 or N threads.

``gemv`` serves the float storage types: ``widen`` is compiled per weight element type.
Half-precision weights arrive as their raw 16 bits (bfloat16 as uint16, float16 as int16):
bfloat16 -> float32 is a 16-bit shift, float16 -> float32 one ``vcvtph2ps`` (F16C, on every
AVX2 CPU), so both vectorise like the float32 kernel while reading half the bytes. int8
weights go to ``gemv_i8``: x rounded to int8 per row, int8 x int8 products summed exactly
(``vpdpbusd`` where the CPU has VNNI), the int8 GEMM's numbers bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from gpt2cli.kernels import BLOCKS, PREFETCHED_ROWS, ROWS, on_x86, writable_cache_dir

_CACHE_DIR = writable_cache_dir()
if _CACHE_DIR is not None:
    numba.config.CACHE_DIR = str(_CACHE_DIR)  # type: ignore[attr-defined]  # read at decoration
CACHE = _CACHE_DIR is not None
"""Compiled kernels are kept on disk where a cache directory is writable, else compiled in memory."""
# Every kernel takes error_model="numpy": numba's default (Python's) tests each float division
# for zero to raise ZeroDivisionError, and that branch keeps a loop with a division scalar (the
# GELU's rational tanh, the int8 quantiser: ~9x slower). Our divisors are never zero.


@intrinsic
def bf16_bits_to_f32(typingctx: Any, bits: Any) -> Any:
    """The float32 whose upper 16 bits are ``bits`` (a bfloat16's raw int16)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def f16_bits_to_f32(typingctx: Any, bits: Any) -> Any:
    """The float32 value of a float16 given as its raw int16."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def i32_bits_to_f32(typingctx: Any, bits: Any) -> Any:
    """The float32 whose bits are ``bits`` (an int32)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


@numba.njit(inline="always", error_model="numpy")
def f16_bits_to_f32_soft(bits):  # type: ignore[no-untyped-def]
    """``f16_bits_to_f32`` in integer operations, for x86 targets without F16C (where LLVM would
    call ``__extendhfsf2``, which numba's JIT cannot link: a fatal LLVM error)."""
    h = np.int32(bits) & 0xFFFF
    sign, exponent, mantissa = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
    if exponent == 0:  # zero or subnormal: mantissa * 2**-24, exactly
        magnitude = np.float32(mantissa) * np.float32(5.960464477539063e-08)
        return -magnitude if sign else magnitude
    if exponent == 31:  # inf, nan
        return i32_bits_to_f32(np.int32(sign | 0x7F800000 | (mantissa << 13)))  # type: ignore[call-arg]
    return i32_bits_to_f32(np.int32(sign | ((exponent + 112) << 23) | (mantissa << 13)))  # type: ignore[call-arg]


@intrinsic
def prefetch(typingctx: Any, arr: Any, i: Any, j: Any) -> Any:
    """Ask for the cache line of ``arr[i, j]`` now (llvm.prefetch: read, keep in all levels)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        flags = [ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)]
        builder.call(fn, [builder.bitcast(ptr, i8p), *flags])
        return context.get_dummy_value()

    return types.void(arr, i, j), codegen


PREFETCH_BLOCKS = 2
"""Prefetch distance in blocks of four rows (8 rows ahead)."""

PREFETCH_ROWS = 4
"""Prefetch distance of the one-row-at-a-time GEMV, in weight rows."""


def prefetch_block(w, o):  # type: ignore[no-untyped-def]
    """Prefetch rows o..o+3 of w, where that pays (compiled per storage type)."""
    raise NotImplementedError  # only called inside numba-compiled code


@overload(prefetch_block, inline="always")
def _prefetch_block(w, o):  # type: ignore[no-untyped-def]
    # float32 rows stream at the memory's pace on their own; 16- and 8-bit rows take twice or
    # four times the instructions per cache line, so the out-of-order window sees too few lines
    # ahead: prefetching the block after next lifts them from ~6 to ~9 GB/s on one core here.
    if w.dtype == types.float32:
        return lambda w, o: None

    def impl(w, o):  # type: ignore[no-untyped-def]
        if o + 3 < w.shape[0]:
            for k in range(4):
                prefetch_row(w, o + k)

    return impl


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy", inline="always")
def prefetch_row(w, o):  # type: ignore[no-untyped-def]
    """Prefetch every cache line of row o of w (none past the last row)."""
    if o < w.shape[0]:
        for j in range(0, w.shape[1], 64 // w.itemsize):
            prefetch(w, o, j)  # type: ignore[call-arg]


def _target_features() -> frozenset[str]:
    """The CPU features numba compiles for (NUMBA_CPU_FEATURES, else the host's)."""
    import llvmlite.binding as llvm

    spec = numba.config.CPU_FEATURES  # type: ignore[attr-defined]
    if spec is None:
        spec = llvm.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in spec.split(",") if f.startswith("+"))


_SOFT_F16 = on_x86() and "f16c" not in _target_features()
"""float16 widened in integer operations: an x86 target without F16C (e.g. NUMBA_CPU_NAME=generic)."""


def widen(v):  # type: ignore[no-untyped-def]
    """One stored weight as float32 (compiled per storage type by the overload below)."""
    raise NotImplementedError  # only called inside numba-compiled code


@overload(widen, inline="always")
def _widen(v):  # type: ignore[no-untyped-def]
    if v == types.float32:
        return lambda v: v
    if v == types.uint16:  # bfloat16 bits
        return lambda v: bf16_bits_to_f32(v)  # type: ignore[call-arg]
    if v == types.int16:  # float16 bits
        if _SOFT_F16:
            return lambda v: f16_bits_to_f32_soft(v)
        return lambda v: f16_bits_to_f32(v)  # type: ignore[call-arg]
    return None


# Half-precision weight rows are taken four at a time (``_block``: x loaded once for four
# dot products, four independent sums in flight), float32 rows eight at a time (``_block8``:
# 7% faster than four at batch 1 on an Ice Lake Xeon, as fast as MKL's sgemv there). With a
# row ``layout`` (the caller's choice: kernels.gemv_layout) and fewer than four rows of x
# (batch-1 decode), rows go one at a time instead (``_row``), the matrix read front to back as
# one stream per thread, prefetched PREFETCH_ROWS rows ahead or not: on an Ice Lake Xeon half
# weights 8% faster than the blocks with the prefetch (15% slower without), on a 2-core Zen 5
# 18-21% faster without it, on a Zen 4 EPYC 1.13-1.26x the prefetched rows without it
# (docs/performance.md). fastmath lets LLVM order each loop's sums (vector width, how many
# partial sums) by the registers the CPU has: for half weights the rows and the blocks came out
# the same bits on the AVX-512 CPUs seen, not on an AVX2-only one (a few ulps, ~1e-5 of the
# largest output); float32's rows (``GPT2_GEMV=rows``) sum in another order than its blocks
# everywhere. The thread count and the prefetch change no bit on any CPU.
# Rows of x go four at a time where there are four (``_tile``: 16 sums, each weight value
# loaded once for four rows of x instead of once per row), 1.6-1.9x faster at 8 rows (there
# one weight row at a time is 20% slower than four); the rest go one by one. A row's sum is
# then ordered by where it falls (in a tile or not; in which block of w): batches of different
# sizes may differ in the last bit (~3e-7 relative), never between thread counts. ``gemv``
# splits the rows between numba's threads, ``gemv_serial`` runs them in the calling thread
# (no thread pool: what a busy machine needs). Both inline the same block code: bit-identical sums.
_INLINE = {"fastmath": True, "cache": CACHE, "nogil": True, "error_model": "numpy", "inline": "always"}


@numba.njit(**_INLINE)  # type: ignore[call-overload]
def _block(x, w, scale, b, out, o):  # type: ignore[no-untyped-def]  # rows o..o+3 of w
    prefetch_block(w, o + 4 * PREFETCH_BLOCKS)
    tiled = x.shape[0] // 4 * 4
    for r in range(0, tiled, 4):
        _tile(x, w, scale, b, out, o, r)
    w0, w1, w2, w3 = w[o], w[o + 1], w[o + 2], w[o + 3]
    for r in range(tiled, x.shape[0]):
        xr = x[r]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for i in range(x.shape[1]):
            xi = xr[i]
            a0 += xi * widen(w0[i])
            a1 += xi * widen(w1[i])
            a2 += xi * widen(w2[i])
            a3 += xi * widen(w3[i])
        _store(out, r, o, scale, b, a0, a1, a2, a3)


@numba.njit(**_INLINE)  # type: ignore[call-overload]
def _block8(x, w, scale, b, out, o):  # type: ignore[no-untyped-def]  # rows o..o+7 of w (float32)
    tiled = x.shape[0] // 4 * 4
    for r in range(0, tiled, 4):
        _tile(x, w, scale, b, out, o, r)
        _tile(x, w, scale, b, out, o + 4, r)
    w0, w1, w2, w3 = w[o], w[o + 1], w[o + 2], w[o + 3]
    w4, w5, w6, w7 = w[o + 4], w[o + 5], w[o + 6], w[o + 7]
    for r in range(tiled, x.shape[0]):
        xr = x[r]
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
        for i in range(x.shape[1]):
            xi = xr[i]
            a0, a1, a2, a3 = a0 + xi * w0[i], a1 + xi * w1[i], a2 + xi * w2[i], a3 + xi * w3[i]
            a4, a5, a6, a7 = a4 + xi * w4[i], a5 + xi * w5[i], a6 + xi * w6[i], a7 + xi * w7[i]
        _store(out, r, o, scale, b, a0, a1, a2, a3)
        _store(out, r, o + 4, scale, b, a4, a5, a6, a7)


@numba.njit(**_INLINE)  # type: ignore[call-overload]
def _tile(x, w, scale, b, out, o, r):  # type: ignore[no-untyped-def]  # rows r..r+3 of x, o..o+3 of w
    w0, w1, w2, w3 = w[o], w[o + 1], w[o + 2], w[o + 3]
    x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)  # a{x row}{w row}
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
    for i in range(x.shape[1]):
        v0, v1, v2, v3 = widen(w0[i]), widen(w1[i]), widen(w2[i]), widen(w3[i])
        y0, y1, y2, y3 = x0[i], x1[i], x2[i], x3[i]
        a00, a01, a02, a03 = a00 + y0 * v0, a01 + y0 * v1, a02 + y0 * v2, a03 + y0 * v3
        a10, a11, a12, a13 = a10 + y1 * v0, a11 + y1 * v1, a12 + y1 * v2, a13 + y1 * v3
        a20, a21, a22, a23 = a20 + y2 * v0, a21 + y2 * v1, a22 + y2 * v2, a23 + y2 * v3
        a30, a31, a32, a33 = a30 + y3 * v0, a31 + y3 * v1, a32 + y3 * v2, a33 + y3 * v3
    _store(out, r, o, scale, b, a00, a01, a02, a03)
    _store(out, r + 1, o, scale, b, a10, a11, a12, a13)
    _store(out, r + 2, o, scale, b, a20, a21, a22, a23)
    _store(out, r + 3, o, scale, b, a30, a31, a32, a33)


@numba.njit(**_INLINE)  # type: ignore[call-overload]
def _store(out, r, o, scale, b, a0, a1, a2, a3):  # type: ignore[no-untyped-def]  # out[r, o..o+3]
    out[r, o] = a0 * scale[o] + b[o]
    out[r, o + 1] = a1 * scale[o + 1] + b[o + 1]
    out[r, o + 2] = a2 * scale[o + 2] + b[o + 2]
    out[r, o + 3] = a3 * scale[o + 3] + b[o + 3]


@numba.njit(**_INLINE)  # type: ignore[call-overload]
def _row(x, w, scale, b, out, o):  # type: ignore[no-untyped-def]  # row o of w, each row of x
    row = w[o]
    for r in range(x.shape[0]):
        xr = x[r]
        acc = np.float32(0.0)
        for i in range(x.shape[1]):
            acc += xr[i] * widen(row[i])
        out[r, o] = acc * scale[o] + b[o]


def block_rows(w):  # type: ignore[no-untyped-def]
    """How many weight rows ``gemv`` takes at a time: 8 for float32, 4 for half precision."""
    raise NotImplementedError  # only called inside numba-compiled code


@overload(block_rows, inline="always")
def _block_rows(w):  # type: ignore[no-untyped-def]
    n = 8 if w.dtype == types.float32 else 4
    return lambda w: n


@numba.njit(**_INLINE)  # type: ignore[call-overload]
def _gemv_block(x, w, scale, b, out, t):  # type: ignore[no-untyped-def]  # the t-th block of rows
    if block_rows(w) == 8:
        _block8(x, w, scale, b, out, 8 * t)
    else:
        _block(x, w, scale, b, out, 4 * t)


@numba.njit(**_INLINE)  # type: ignore[call-overload]
def _gemv_rest(x, w, scale, b, out):  # type: ignore[no-untyped-def]  # the rows after the last block
    o = w.shape[0] // block_rows(w) * block_rows(w)
    if o + 4 <= w.shape[0]:  # 4-7 rows left: only after eight-row blocks (float32)
        _block(x, w, scale, b, out, o)
        o += 4
    for r in range(o, w.shape[0]):
        _row(x, w, scale, b, out, r)


@numba.njit(parallel=True, fastmath=True, cache=CACHE, nogil=True, error_model="numpy")
def gemv(x, w, scale, b, out, layout):  # type: ignore[no-untyped-def]
    if layout != BLOCKS and x.shape[0] < 4:
        for o in prange(w.shape[0]):
            if layout == PREFETCHED_ROWS:
                prefetch_row(w, o + PREFETCH_ROWS)
            _row(x, w, scale, b, out, o)
        return
    for t in prange(w.shape[0] // block_rows(w)):
        _gemv_block(x, w, scale, b, out, t)
    _gemv_rest(x, w, scale, b, out)


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy")
def gemv_serial(x, w, scale, b, out, layout):  # type: ignore[no-untyped-def]
    if layout != BLOCKS and x.shape[0] < 4:
        for o in range(w.shape[0]):
            if layout == PREFETCHED_ROWS:
                prefetch_row(w, o + PREFETCH_ROWS)
            _row(x, w, scale, b, out, o)
        return
    for t in range(w.shape[0] // block_rows(w)):
        _gemv_block(x, w, scale, b, out, t)
    _gemv_rest(x, w, scale, b, out)


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy")
def embed_i8(ids, w, scale, out):  # type: ignore[no-untyped-def]  # ids (n,), w int8 (V, C) -> out (n, C)
    for t in range(ids.shape[0]):
        row = w[ids[t]]
        s = scale[ids[t]]
        for i in range(w.shape[1]):
            out[t, i] = np.float32(row[i]) * s


# The int8 GEMM's prologue and epilogue (kernels.int8_gemm), row by row, parallel and serial.
# No "arcp" in the quantisation (x / s as x * (1 / s)): its values equal torch's round(x / s).
_EXACT = {"nnan", "ninf", "nsz", "reassoc"}
# The int8 epilogue: no reassociation or contraction, so (sum * x scale) * w scale + bias rounds
# the same in ``dequantize_acc``, in ``gemv_i8`` and in torch's reference ops: bit-identical results.
_STRICT = {"nnan", "ninf", "nsz"}


@numba.njit(fastmath=_EXACT, cache=CACHE, nogil=True, error_model="numpy", inline="always")  # type: ignore[call-overload]
def _quantize_into(xr, qr):  # type: ignore[no-untyped-def]  # one row (K,) -> int8 qr (K,); returns its scale
    peak = np.float32(0.0)
    for k in range(xr.shape[0]):
        peak = max(peak, abs(xr[k]))
    s = max(peak, np.float32(1e-12)) / np.float32(127.0)
    for k in range(xr.shape[0]):
        qr[k] = np.int8(np.rint(xr[k] / s))
    return s


@numba.njit(fastmath=_EXACT, cache=CACHE, nogil=True, error_model="numpy", inline="always")  # type: ignore[call-overload]
def _quantize_row(x, xq, xs, m):  # type: ignore[no-untyped-def]  # x (M, K) -> xq (M, K) int8, xs (M,)
    xs[m] = _quantize_into(x[m], xq[m])


@numba.njit(parallel=True, fastmath=_EXACT, cache=CACHE, nogil=True, error_model="numpy")  # type: ignore[call-overload]
def quantize_rows_i8(x, xq, xs):  # type: ignore[no-untyped-def]
    """Symmetric per-row int8: xs[m] = max|x[m]| / 127, xq = round(x / xs) (half to even)."""
    for m in prange(x.shape[0]):
        _quantize_row(x, xq, xs, m)


@numba.njit(fastmath=_EXACT, cache=CACHE, nogil=True, error_model="numpy")  # type: ignore[call-overload]
def quantize_rows_i8_serial(x, xq, xs):  # type: ignore[no-untyped-def]
    for m in range(x.shape[0]):
        _quantize_row(x, xq, xs, m)


@numba.njit(fastmath=_STRICT, cache=CACHE, nogil=True, error_model="numpy", inline="always")  # type: ignore[call-overload]
def _dequantize_row(acc, xs, ws, b, out, m):  # type: ignore[no-untyped-def]  # int32 (M, N) -> float32
    sm = xs[m]
    for n in range(acc.shape[1]):
        out[m, n] = np.float32(acc[m, n]) * sm * ws[n] + b[n]


@numba.njit(parallel=True, fastmath=_STRICT, cache=CACHE, nogil=True, error_model="numpy")  # type: ignore[call-overload]
def dequantize_acc(acc, xs, ws, b, out):  # type: ignore[no-untyped-def]
    """out[m, n] = acc[m, n] * xs[m] * ws[n] + b[n]: the int8 GEMM's epilogue in one pass."""
    for m in prange(acc.shape[0]):
        _dequantize_row(acc, xs, ws, b, out, m)


@numba.njit(fastmath=_STRICT, cache=CACHE, nogil=True, error_model="numpy")  # type: ignore[call-overload]
def dequantize_acc_serial(acc, xs, ws, b, out):  # type: ignore[no-untyped-def]
    for m in range(acc.shape[0]):
        _dequantize_row(acc, xs, ws, b, out, m)


# --- int8 x int8 dot products: the int8 decode GEMV ----------------------------------------------
#
# int8 layers multiply int8 activations (x rounded per row, as the int8 GEMM of prefill does)
# by int8 weights with exact int32 sums, so a row's result is the same whatever path, tile,
# batch or thread count computed it. The inner loop is one LLVM intrinsic written per
# instruction set numba compiles for (its target features, part of numba's cache key):
#   vnni512  AVX512-VNNI ``vpdpbusd`` zmm: 64 u8 x s8 products per instruction
#   vnni256  AVX-VNNI (or AVX512-VNNI+VL without AVX512BW) ``vpdpbusd`` ymm: 32
#   avx2     ``vpmaddwd`` on sign-extended int16: 16
#   generic  plain vector IR (sext to i32, mul, add) that any LLVM target lowers
# ``vpdpbusd`` takes one operand unsigned: x goes in as x + 128 (its sign bit flipped) and
# 128 * sum(w[o]) (``wsum``, computed once per weight) is taken off the sum afterwards.


def _dot_tier(features: frozenset[str]) -> str:
    if {"avx512vnni", "avx512bw"} <= features:
        return "vnni512"
    if "avxvnni" in features or {"avx512vnni", "avx512vl"} <= features:
        return "vnni256"
    if "avx2" in features:
        return "avx2"
    return "generic"


DOT_TIER = _dot_tier(_target_features())
"""How the int8 dot products are computed on this CPU (see above)."""
CHUNK = {"vnni512": 64, "vnni256": 32, "avx2": 32, "generic": 16}[DOT_TIER]
"""Bytes of a row the intrinsic takes per iteration; the last ``in % CHUNK`` go one by one."""
OFFSET = 128 if DOT_TIER.startswith("vnni") else 0
"""What the intrinsic adds to each x value (vpdpbusd's unsigned operand)."""

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _row_pointer(context: Any, builder: Any, aryty: Any, value: Any, row: Any) -> Any:
    """An i8* to ``value[row, 0]`` (a C-contiguous 2-D int8 array)."""
    ary = context.make_array(aryty)(context, builder, value)
    row = builder.sext(row, _I64) if row.type.width < 64 else row
    ptr = cgutils.get_item_pointer(
        context, builder, aryty, ary, [row, ir.Constant(_I64, 0)], wraparound=False
    )
    return builder.bitcast(ptr, _I8.as_pointer())


def _load(builder: Any, ptr: Any, offset: Any, lanes: int) -> Any:
    return builder.load(
        builder.bitcast(builder.gep(ptr, [offset]), ir.VectorType(_I8, lanes).as_pointer()), align=1
    )


def _halves(builder: Any, v: Any, parts: int) -> list[Any]:
    """v (<n x i8>) split into ``parts`` equal vectors."""
    n = v.type.count // parts
    return [
        builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(p * n, p * n + n))))
        for p in range(parts)
    ]


def _chunk_dots(builder: Any, xs: list[Any], ws: list[Any], accs: list[Any], tier: str) -> None:
    """accs[j * len(ws) + k] += the products of chunk xs[j] (x row j) and ws[k] (weight row k)."""
    module = builder.module
    n = len(ws)
    if tier.startswith("vnni"):
        lanes = CHUNK // 4
        vec = ir.VectorType(_I32, lanes)
        name = f"llvm.x86.avx512.vpdpbusd.{CHUNK * 8}"
        fn = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec, vec, vec]), name)
        flip = ir.Constant(ir.VectorType(_I8, CHUNK), [-128] * CHUNK)
        xu = [builder.bitcast(builder.xor(x, flip), vec) for x in xs]
        wv = [builder.bitcast(w, vec) for w in ws]
        for j, x in enumerate(xu):
            for k, w in enumerate(wv):
                a = accs[n * j + k]
                builder.store(builder.call(fn, [builder.load(a), x, w]), a)
        return
    if tier == "avx2":  # 16 int16 pairs -> 8 int32 per vpmaddwd
        v16, v8 = ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
        fn = cgutils.get_or_insert_function(module, ir.FunctionType(v8, [v16, v16]), "llvm.x86.avx2.pmadd.wd")
        xh = [[builder.sext(h, v16) for h in _halves(builder, x, 2)] for x in xs]
        wh = [[builder.sext(h, v16) for h in _halves(builder, w, 2)] for w in ws]
        for j in range(len(xs)):
            for k in range(len(ws)):
                a = accs[n * j + k]
                total = builder.load(a)
                for p in range(2):
                    total = builder.add(total, builder.call(fn, [xh[j][p], wh[k][p]]))
                builder.store(total, a)
        return
    v32 = ir.VectorType(_I32, CHUNK)
    xw = [builder.sext(x, v32) for x in xs]
    ww = [builder.sext(w, v32) for w in ws]
    for j in range(len(xs)):
        for k in range(len(ws)):
            a = accs[n * j + k]
            builder.store(builder.add(builder.load(a), builder.mul(xw[j], ww[k])), a)


def _make_dots(rows: int, wrows: int = 4) -> Any:
    """An intrinsic: the int32 dot products of x rows r..r+rows-1 with w rows o..o+wrows-1 over
    their first ``chunks * CHUNK`` values (x values plus OFFSET), as a tuple (x row major)."""

    @intrinsic
    def dots(typingctx: Any, x: Any, r: Any, w: Any, o: Any, chunks: Any) -> Any:
        if x.layout != "C" or w.layout != "C":  # rows are read as contiguous bytes
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            x_ty, _, w_ty, _, _ = signature.args
            x_val, r_val, w_val, o_val, n_val = args
            xp = [
                _row_pointer(context, builder, x_ty, x_val, builder.add(r_val, ir.Constant(r_val.type, j)))
                for j in range(rows)
            ]
            wp = [
                _row_pointer(context, builder, w_ty, w_val, builder.add(o_val, ir.Constant(o_val.type, k)))
                for k in range(wrows)
            ]
            lanes = {"vnni512": 16, "vnni256": 8, "avx2": 8, "generic": CHUNK}[DOT_TIER]
            vec = ir.VectorType(_I32, lanes)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(wrows * rows)]
            with cgutils.for_range(builder, n_val) as loop:
                offset = builder.mul(loop.index, ir.Constant(loop.index.type, CHUNK))
                xs = [_load(builder, p, offset, CHUNK) for p in xp]
                ws = [_load(builder, p, offset, CHUNK) for p in wp]
                _chunk_dots(builder, xs, ws, accs, DOT_TIER)
            reduce = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_I32, [vec]), f"llvm.vector.reduce.add.v{lanes}i32"
            )
            sums = [builder.call(reduce, [builder.load(a)]) for a in accs]
            return context.make_tuple(builder, signature.return_type, sums)

        return types.UniTuple(types.int32, wrows * rows)(x, r, w, o, chunks), codegen

    return dots


_dots_1x1 = _make_dots(1, 1)
_dots_1x4 = _make_dots(1)
_dots_4x4 = _make_dots(4)


@numba.njit(fastmath=_STRICT, cache=CACHE, nogil=True, error_model="numpy", inline="always")  # type: ignore[call-overload]
def _tail(xq, r, w, o, start):  # type: ignore[no-untyped-def]  # sum over the last in % CHUNK values
    total = 0
    for i in range(start, xq.shape[1]):
        total += (np.int32(xq[r, i]) + OFFSET) * np.int32(w[o, i])
    return total


@numba.njit(fastmath=_STRICT, cache=CACHE, nogil=True, error_model="numpy", inline="always")  # type: ignore[call-overload]
def _block_i8(xq, xs, w, scale, b, wsum, out, o, tail):  # type: ignore[no-untyped-def]  # rows o..o+3 of w
    prefetch_block(w, o + 4 * PREFETCH_BLOCKS)
    chunks = xq.shape[1] // CHUNK
    start = chunks * CHUNK
    tiled = xq.shape[0] // 4 * 4
    for r in range(0, tiled, 4):
        s = _dots_4x4(xq, r, w, o, chunks)  # type: ignore[call-arg]
        for j in range(4):
            for k in range(4):
                acc = s[4 * j + k] - OFFSET * wsum[o + k]
                if tail:
                    acc += _tail(xq, r + j, w, o + k, start)
                out[r + j, o + k] = np.float32(acc) * xs[r + j] * scale[o + k] + b[o + k]
    for r in range(tiled, xq.shape[0]):
        s1 = _dots_1x4(xq, r, w, o, chunks)  # type: ignore[call-arg]
        for k in range(4):
            acc = s1[k] - OFFSET * wsum[o + k]
            if tail:
                acc += _tail(xq, r, w, o + k, start)
            out[r, o + k] = np.float32(acc) * xs[r] * scale[o + k] + b[o + k]


@numba.njit(fastmath=_STRICT, cache=CACHE, nogil=True, error_model="numpy", inline="always")  # type: ignore[call-overload]
def _row_i8(xq, xs, w, scale, b, wsum, out, o):  # type: ignore[no-untyped-def]  # row o of w, each row of x
    chunks = xq.shape[1] // CHUNK  # whole chunks only: the caller checks in % CHUNK == 0
    for r in range(xq.shape[0]):
        acc = _dots_1x1(xq, r, w, o, chunks)[0] - OFFSET * wsum[o]  # type: ignore[call-arg]
        out[r, o] = np.float32(acc) * xs[r] * scale[o] + b[o]


@numba.njit(fastmath=_STRICT, cache=CACHE, nogil=True, error_model="numpy", inline="always")  # type: ignore[call-overload]
def _rows_left_i8(xq, xs, w, scale, b, wsum, out):  # type: ignore[no-untyped-def]  # the last out % 4 rows
    for o in range(w.shape[0] // 4 * 4, w.shape[0]):
        for r in range(xq.shape[0]):
            acc = _tail(xq, r, w, o, 0) - OFFSET * wsum[o]
            out[r, o] = np.float32(acc) * xs[r] * scale[o] + b[o]


@numba.njit(fastmath=_EXACT, cache=CACHE, nogil=True, error_model="numpy", inline="always")  # type: ignore[call-overload]
def _rounded(x):  # type: ignore[no-untyped-def]  # x float32 (B, in) -> int8 (B, in), scales (B,)
    xq = np.empty(x.shape, np.int8)
    xs = np.empty(x.shape[0], np.float32)
    quantize_rows_i8_serial(x, xq, xs)
    return xq, xs


@numba.njit(parallel=True, fastmath=_STRICT, cache=CACHE, nogil=True, error_model="numpy")  # type: ignore[call-overload]
def gemv_i8(x, w, scale, b, wsum, out, layout):  # type: ignore[no-untyped-def]
    """out = (x rounded to int8 per row) @ w.T, rescaled, + b; x float32 (B, in), w int8 (out, in),
    wsum int32 (out,) = w's row sums. The same numbers as ``int8_gemm`` (quantise, exact sums, rescale)."""
    xq, xs = _rounded(x)
    n4 = w.shape[0] // 4
    # One row of x (batch-1 decode) and a row layout: the weight rows one at a time, one
    # stream per thread, prefetched or not as in ``gemv``: 22-30% faster on Zen 5 (without the
    # prefetch), 6% faster on Ice Lake (11% slower without), the same sums; with two rows, 10%
    # slower on Zen 5 too.
    if layout != BLOCKS and x.shape[0] == 1 and x.shape[1] % CHUNK == 0:
        for o in prange(w.shape[0]):
            if layout == PREFETCHED_ROWS:
                prefetch_row(w, o + PREFETCH_ROWS)
            _row_i8(xq, xs, w, scale, b, wsum, out, o)
        return
    # The tail's loop is compiled only where in % CHUNK > 0 (GPT-2's widths are multiples of
    # 64): its mere presence beside the intrinsic halves the block's speed.
    if x.shape[1] % CHUNK == 0:
        for t in prange(n4):
            _block_i8(xq, xs, w, scale, b, wsum, out, 4 * t, False)
    else:
        for t in prange(n4):
            _block_i8(xq, xs, w, scale, b, wsum, out, 4 * t, True)
    _rows_left_i8(xq, xs, w, scale, b, wsum, out)


@numba.njit(fastmath=_STRICT, cache=CACHE, nogil=True, error_model="numpy")  # type: ignore[call-overload]
def gemv_i8_serial(x, w, scale, b, wsum, out, layout):  # type: ignore[no-untyped-def]
    xq, xs = _rounded(x)
    n4 = w.shape[0] // 4
    if layout != BLOCKS and x.shape[0] == 1 and x.shape[1] % CHUNK == 0:
        for o in range(w.shape[0]):
            if layout == PREFETCHED_ROWS:
                prefetch_row(w, o + PREFETCH_ROWS)
            _row_i8(xq, xs, w, scale, b, wsum, out, o)
        return
    if x.shape[1] % CHUNK == 0:
        for t in range(n4):
            _block_i8(xq, xs, w, scale, b, wsum, out, 4 * t, False)
    else:
        for t in range(n4):
            _block_i8(xq, xs, w, scale, b, wsum, out, 4 * t, True)
    _rows_left_i8(xq, xs, w, scale, b, wsum, out)


WEIGHT_TYPES = (np.float32, np.uint16, np.int16)
"""The float weights' stored element types (``gemv``): float32, bfloat16 bits, float16 bits."""


def warm_up(weight_types: Iterable[Any] = (*WEIGHT_TYPES, np.int8)) -> None:
    """Compile (or load from numba's disk cache) the kernels that weights stored as
    ``weight_types`` (numpy element types: WEIGHT_TYPES, int8) take, for the types the
    wrappers pass. Only those: compiled in memory (no writable cache), each costs seconds."""
    wanted = {np.dtype(t) for t in weight_types}
    x = np.zeros((1, 8), np.float32)
    ones = np.ones(5, np.float32)
    out = np.empty((1, 5), np.float32)
    for dtype in WEIGHT_TYPES:
        if np.dtype(dtype) in wanted:
            for kernel in (gemv, gemv_serial):
                kernel(x, np.zeros((5, 8), dtype), ones, ones, out, ROWS)
    if np.dtype(np.int8) not in wanted:
        return
    for int8_kernel in (gemv_i8, gemv_i8_serial):
        int8_kernel(x, np.zeros((5, 8), np.int8), ones, ones, np.zeros(5, np.int32), out, ROWS)
    embed_i8(np.zeros(1, np.int64), np.zeros((4, 5), np.int8), ones, out)
    for quantize in (quantize_rows_i8, quantize_rows_i8_serial):
        quantize(out, np.empty((1, 5), np.int8), ones[:1])
    for dequantize in (dequantize_acc, dequantize_acc_serial):
        dequantize(np.zeros((1, 5), np.int32), ones[:1], ones, ones, out)
    for activate in (activate_quantize, activate_quantize_serial):
        activate(
            np.zeros((1, 5), np.int32), ones[:1], ones, ones, 0, np.empty((1, 5), np.int8), ones[:1].copy()
        )


# --- the fused decode step: one native call per block (decode_step.py drives it) -----------------
#
# For a few rows each decoding one token, a block's ~15 small torch ops (LayerNorm, views,
# the cache write, SDPA, GELU, adds) and four Python-level kernel calls cost more than its
# matmuls in bf16 and int8 (docs/performance.md). ``block_step`` runs the whole block in one
# call: the matmuls are the same ``gemv`` kernels (same sums, bit for bit), the rest is the
# short loops below. Nothing in it depends on the thread count (attention splits whole
# (row, head) pairs between threads), so its output does not either.

ACTIVATIONS = {
    "gelu_new": 0,
    "gelu_pytorch_tanh": 0,
    "gelu_fast": 0,
    "gelu": 1,
    "relu": 2,
    "silu": 3,
    "swish": 3,
}
"""The activations ``block_step`` computes, by the code it takes (config.SUPPORTED_ACTIVATIONS)."""


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy", inline="always")
def _tanh(u):  # type: ignore[no-untyped-def]
    # Eigen's float tanh (a 13/6 rational function, within a few ulp; torch's Sleef tanh is
    # 1 ulp): unlike libm's tanhf it vectorises, and GELU takes one per hidden unit.
    u = min(max(u, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    u2 = u * u
    p = u2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = p * u2 + np.float32(-8.60467152213735e-11)
    p = p * u2 + np.float32(5.12229709037114e-08)
    p = p * u2 + np.float32(1.48572235717979e-05)
    p = p * u2 + np.float32(6.37261928875436e-04)
    p = p * u2 + np.float32(4.89352455891786e-03)
    q = u2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = q * u2 + np.float32(2.26843463243900e-03)
    q = q * u2 + np.float32(4.89352518554385e-03)
    return u * p / q


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy", inline="always")
def _activate(row, act):  # type: ignore[no-untyped-def]  # one row (N,) in place
    if act == 0:  # tanh GELU (GPT-2's gelu_new)
        for j in range(row.shape[0]):
            v = row[j]
            u = np.float32(0.7978845608028654) * (v + np.float32(0.044715) * v * v * v)  # sqrt(2/pi)
            row[j] = np.float32(0.5) * v * (np.float32(1.0) + _tanh(u))
    elif act == 1:  # exact GELU
        for j in range(row.shape[0]):
            v = row[j]
            row[j] = np.float32(0.5) * v * (np.float32(1.0) + np.float32(math.erf(v * 0.7071067811865476)))
    elif act == 2:
        for j in range(row.shape[0]):
            row[j] = max(row[j], np.float32(0.0))
    else:
        for j in range(row.shape[0]):
            row[j] = row[j] / (np.float32(1.0) + np.exp(-row[j]))


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy", inline="always")
def _attend_one(qkv, pos, kc, vc, row0, scale, y, scores, r, hd):  # type: ignore[no-untyped-def]
    """Row r, head hd: store its key and value at pos[r], attend over keys 0..pos[r].

    qkv (B, 3C) as c_attn gives it; kc, vc (rows, n_head, capacity + 1, head_dim); y (B, C).
    """
    C, D = y.shape[1], kc.shape[3]
    p, row, q0 = pos[r], row0 + r, hd * D
    kc[row, hd, p, :] = qkv[r, C + q0 : C + q0 + D]
    vc[row, hd, p, :] = qkv[r, 2 * C + q0 : 2 * C + q0 + D]
    q = qkv[r, q0 : q0 + D]
    peak = np.float32(-np.inf)
    for j in range(p + 1):
        key = kc[row, hd, j]
        s = np.float32(0.0)
        for d in range(D):
            s += q[d] * key[d]
        s *= scale
        scores[j] = s
        peak = max(peak, s)
    total = np.float32(0.0)
    for j in range(p + 1):
        e = np.exp(scores[j] - peak)
        scores[j] = e
        total += e
    out = y[r, q0 : q0 + D]
    out[:] = 0.0
    for j in range(p + 1):
        w, value = scores[j], vc[row, hd, j]
        for d in range(D):
            out[d] += w * value[d]
    inv = np.float32(1.0) / total
    for d in range(D):
        out[d] *= inv


@numba.njit(parallel=True, fastmath=True, cache=CACHE, nogil=True, error_model="numpy")
def attend(qkv, pos, kc, vc, row0, scale, y, scores):  # type: ignore[no-untyped-def]
    n_head = kc.shape[1]
    for t in prange(qkv.shape[0] * n_head):
        _attend_one(qkv, pos, kc, vc, row0, scale, y, scores[t], t // n_head, t % n_head)


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy")
def attend_serial(qkv, pos, kc, vc, row0, scale, y, scores):  # type: ignore[no-untyped-def]
    n_head = kc.shape[1]
    for t in range(qkv.shape[0] * n_head):
        _attend_one(qkv, pos, kc, vc, row0, scale, y, scores[t], t // n_head, t % n_head)


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy", inline="always")
def _layer_norm(x, w, b, eps, out):  # type: ignore[no-untyped-def]  # x (B, C) -> out (B, C)
    n = x.shape[1]
    for r in range(x.shape[0]):
        xr = x[r]
        mean = np.float32(0.0)
        for i in range(n):
            mean += xr[i]
        mean /= n
        var = np.float32(0.0)
        for i in range(n):
            var += (xr[i] - mean) * (xr[i] - mean)
        inv = np.float32(1.0) / np.sqrt(var / n + eps)
        for i in range(n):
            out[r, i] = (xr[i] - mean) * inv * w[i] + b[i]


def matmul(x, op, out, parallel, layout):  # type: ignore[no-untyped-def]
    """out = x @ w.T (rescaled) + b for op = (w, scale, b, wsum): ``gemv`` or ``gemv_i8`` by w's type
    (their ``_serial`` twins unless ``parallel``; ``layout`` as they take it)."""
    raise NotImplementedError  # only called inside numba-compiled code


@overload(matmul, inline="always")
def _matmul(x, op, out, parallel, layout):  # type: ignore[no-untyped-def]
    if op.types[0].dtype == types.int8:

        def int8(x, op, out, parallel, layout):  # type: ignore[no-untyped-def]
            if parallel:
                gemv_i8(x, op[0], op[1], op[2], op[3], out, layout)
            else:
                gemv_i8_serial(x, op[0], op[1], op[2], op[3], out, layout)

        return int8

    def floats(x, op, out, parallel, layout):  # type: ignore[no-untyped-def]
        if parallel:
            gemv(x, op[0], op[1], op[2], out, layout)
        else:
            gemv_serial(x, op[0], op[1], op[2], out, layout)

    return floats


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy")
def block_step(  # type: ignore[no-untyped-def]
    x, pos, kc, vc, row0, ln1, qkv_w, attn_o, ln2, fc, proj, eps, attn_scale, act, parallel, layout
):
    """One GPT-2 block for x (B, C), each row one token at position pos[r], in place.

    ``ln1``/``ln2`` are (weight, bias); ``qkv_w``, ``attn_o``, ``fc``, ``proj`` are (weight,
    scale, bias, row sums) as ``matmul`` takes them, and ``parallel`` and ``layout`` too.
    Writes the rows' keys and values into kc, vc (rows row0..row0+B-1) and leaves the block's
    output in x.
    """
    B, C = x.shape
    h = np.empty((B, C), np.float32)
    _layer_norm(x, ln1[0], ln1[1], eps, h)
    qkv = np.empty((B, qkv_w[0].shape[0]), np.float32)
    matmul(h, qkv_w, qkv, parallel, layout)
    y = np.empty((B, C), np.float32)
    scores = np.empty((B * kc.shape[1], pos.max() + 1), np.float32)
    if parallel:
        attend(qkv, pos, kc, vc, row0, attn_scale, y, scores)
    else:
        attend_serial(qkv, pos, kc, vc, row0, attn_scale, y, scores)
    a = np.empty((B, C), np.float32)
    matmul(y, attn_o, a, parallel, layout)
    x += a
    _layer_norm(x, ln2[0], ln2[1], eps, h)
    f = np.empty((B, fc[0].shape[0]), np.float32)
    matmul(h, fc, f, parallel, layout)
    for r in range(B):
        _activate(f[r], act)
    matmul(f, proj, a, parallel, layout)
    x += a


@intrinsic
def _pointer_like(typingctx: Any, address: Any, like: Any) -> Any:
    """The integer ``address`` as a pointer to the element type of ``like`` (an array or a scalar)."""
    dtype = like.dtype if isinstance(like, types.Array) else like

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(dtype)(address, like), codegen


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy", inline="always")
def _at(address, like, shape):  # type: ignore[no-untyped-def]  # the C-ordered array of like's type at address
    return numba.carray(_pointer_like(address, like), shape)  # type: ignore[call-arg]


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy", inline="always")
def _linear_at(row, col, like, out_f, in_f, sums):  # type: ignore[no-untyped-def]
    """The (weight, scale, bias, row sums) ``matmul`` takes, from addresses row[col..col+3]."""
    one = np.float32(0.0)
    return (
        _at(row[col], like, (out_f, in_f)),
        _at(row[col + 1], one, (out_f,)),
        _at(row[col + 2], one, (out_f,)),
        _at(row[col + 3], np.int32(0), (out_f if sums else 0,)),
    )


LN_1, C_ATTN, ATTN_PROJ, LN_2, C_FC, MLP_PROJ, KEYS, VALUES = 0, 2, 6, 10, 12, 16, 20, 21
"""Columns of ``model_step``'s table (one row per block): where each of a block's arrays'
addresses starts. A norm takes two (weight, bias), a linear four (weight, scale, bias, row
sums), the key and value cache one each (decode_step._flat gives the block's in this order)."""
TABLE_WIDTH = 22
LINEAR_COLUMNS = (C_ATTN, ATTN_PROJ, C_FC, MLP_PROJ)


@numba.njit(fastmath=True, cache=CACHE, nogil=True, error_model="numpy")
def model_step(x, pos, table, like, dims, kv_shape, row0, eps, scales, act, parallel, layout):  # type: ignore[no-untyped-def]
    """Every block of a decode step in one call: ``block_step`` for each row of ``table``.

    table int64 (n_layer, TABLE_WIDTH): a block's operands by address, in the columns above.
    ``like``: an array of the weights' element type; dims: (n_embd, c_attn's rows, c_fc's
    rows, 1 if int8 row sums else 0); kv_shape: a cache tensor's (rows, n_head, capacity + 1,
    head_dim); scales (n_layer,): attention scales.
    The caller keeps every addressed tensor alive and where it was.
    """
    C, qkv_f, inner, sums = dims[0], dims[1], dims[2], dims[3] == 1
    one = np.float32(0.0)
    for i in range(table.shape[0]):
        row = table[i]
        block_step(
            x,
            pos,
            _at(row[KEYS], one, kv_shape),
            _at(row[VALUES], one, kv_shape),
            row0,
            (_at(row[LN_1], one, (C,)), _at(row[LN_1 + 1], one, (C,))),
            _linear_at(row, C_ATTN, like, qkv_f, C, sums),
            _linear_at(row, ATTN_PROJ, like, C, C, sums),
            (_at(row[LN_2], one, (C,)), _at(row[LN_2 + 1], one, (C,))),
            _linear_at(row, C_FC, like, inner, C, sums),
            _linear_at(row, MLP_PROJ, like, C, inner, sums),
            eps,
            scales[i],
            act,
            parallel,
            layout,
        )


# The int8 MLP's middle (kernels.int8_mlp): c_fc's int32 sums -> bias, activation -> int8 for
# c_proj, row by row in one pass (no float32 hidden matrix, no separate GELU and quantise
# passes). The dequantisation contracts like ``dequantize_acc``; the rounding like the quantiser.
_EPILOGUE = {"nnan", "ninf", "nsz", "reassoc", "contract"}


@numba.njit(fastmath=_EPILOGUE, cache=CACHE, nogil=True, error_model="numpy", inline="always")  # type: ignore[call-overload]
def _activate_quantize_row(acc, xs, ws, b, act, hq, hs, m):  # type: ignore[no-untyped-def]
    row = np.empty(acc.shape[1], np.float32)
    sm = xs[m]
    for n in range(acc.shape[1]):
        row[n] = np.float32(acc[m, n]) * sm * ws[n] + b[n]
    _activate(row, act)
    hs[m] = _quantize_into(row, hq[m])


@numba.njit(parallel=True, fastmath=_EPILOGUE, cache=CACHE, nogil=True, error_model="numpy")  # type: ignore[call-overload]
def activate_quantize(acc, xs, ws, b, act, hq, hs):  # type: ignore[no-untyped-def]
    """acc int32 (M, N), x scales xs (M,), weight scales ws (N,), bias b (N,) -> the activation
    of the float32 result, rounded to int8 per row: hq (M, N), hs (M,)."""
    for m in prange(acc.shape[0]):
        _activate_quantize_row(acc, xs, ws, b, act, hq, hs, m)


@numba.njit(fastmath=_EPILOGUE, cache=CACHE, nogil=True, error_model="numpy")  # type: ignore[call-overload]
def activate_quantize_serial(acc, xs, ws, b, act, hq, hs):  # type: ignore[no-untyped-def]
    for m in range(acc.shape[0]):
        _activate_quantize_row(acc, xs, ws, b, act, hq, hs, m)
