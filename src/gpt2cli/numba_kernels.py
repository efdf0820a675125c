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

One kernel serves every storage type: ``widen`` is compiled per weight element type.
Half-precision weights arrive as their raw 16 bits (bfloat16 as uint16, float16 as int16):
bfloat16 -> float32 is a 16-bit shift, float16 -> float32 one ``vcvtph2ps`` (F16C, on every
AVX2 CPU), so both vectorise like the float32 kernel while reading half the bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from gpt2cli.kernels import writable_cache_dir

_CACHE_DIR = writable_cache_dir()
if _CACHE_DIR is not None:
    numba.config.CACHE_DIR = str(_CACHE_DIR)  # type: ignore[attr-defined]  # read at decoration
CACHE = _CACHE_DIR is not None
"""Compiled kernels are kept on disk where a cache directory is writable, else compiled in memory."""


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
            step = 64 // w.itemsize
            for k in range(4):
                for j in range(0, w.shape[1], step):
                    prefetch(w, o + k, j)  # type: ignore[call-arg]

    return impl


def widen(v):  # type: ignore[no-untyped-def]
    """One stored weight as float32 (compiled per storage type by the overload below)."""
    raise NotImplementedError  # only called inside numba-compiled code


@overload(widen, inline="always")
def _widen(v):  # type: ignore[no-untyped-def]
    if v == types.float32:
        return lambda v: v
    if v == types.int8:
        return lambda v: np.float32(v)
    if v == types.uint16:  # bfloat16 bits
        return lambda v: bf16_bits_to_f32(v)  # type: ignore[call-arg]
    if v == types.int16:  # float16 bits
        return lambda v: f16_bits_to_f32(v)  # type: ignore[call-arg]
    return None


# The weight rows are taken four at a time: x is loaded once for four dot products (four
# independent sums in flight), ~15-25% faster than one row at a time here. Rows of x go four
# at a time too where there are four (``_tile``: 16 sums, each weight value loaded once for
# four rows of x instead of once per row), 1.6-1.9x faster at 8 rows; the rest go one by one.
# A row's sum is then ordered by where it falls (in a tile or not): batches of different
# sizes may differ in the last bit (~3e-7 relative), never between thread counts. ``gemv``
# splits the blocks between numba's threads, ``gemv_serial`` runs them in the calling thread
# (no thread pool: what a busy machine needs). Both inline the same block code: bit-identical sums.
_INLINE = {"fastmath": True, "cache": CACHE, "nogil": True, "inline": "always"}


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
def _row(x, w, scale, b, out, o):  # type: ignore[no-untyped-def]  # the last out % 4 rows
    row = w[o]
    for r in range(x.shape[0]):
        xr = x[r]
        acc = np.float32(0.0)
        for i in range(x.shape[1]):
            acc += xr[i] * widen(row[i])
        out[r, o] = acc * scale[o] + b[o]


@numba.njit(parallel=True, fastmath=True, cache=CACHE, nogil=True)
def gemv(x, w, scale, b, out):  # type: ignore[no-untyped-def]
    n4 = w.shape[0] // 4
    for t in prange(n4):
        _block(x, w, scale, b, out, 4 * t)
    for o in range(4 * n4, w.shape[0]):
        _row(x, w, scale, b, out, o)


@numba.njit(fastmath=True, cache=CACHE, nogil=True)
def gemv_serial(x, w, scale, b, out):  # type: ignore[no-untyped-def]
    n4 = w.shape[0] // 4
    for t in range(n4):
        _block(x, w, scale, b, out, 4 * t)
    for o in range(4 * n4, w.shape[0]):
        _row(x, w, scale, b, out, o)


@numba.njit(fastmath=True, cache=CACHE, nogil=True)
def embed_i8(ids, w, scale, out):  # type: ignore[no-untyped-def]  # ids (n,), w int8 (V, C) -> out (n, C)
    for t in range(ids.shape[0]):
        row = w[ids[t]]
        s = scale[ids[t]]
        for i in range(w.shape[1]):
            out[t, i] = np.float32(row[i]) * s


# The int8 GEMM's prologue and epilogue (kernels.int8_gemm), row by row, parallel and serial.
# No "arcp" in the quantisation (x / s as x * (1 / s)): its values equal torch's round(x / s).
_EXACT = {"nnan", "ninf", "nsz", "reassoc"}


@numba.njit(fastmath=_EXACT, cache=CACHE, nogil=True, inline="always")  # type: ignore[call-overload]
def _quantize_into(xr, qr):  # type: ignore[no-untyped-def]  # one row (K,) -> int8 qr (K,); returns its scale
    peak = np.float32(0.0)
    for k in range(xr.shape[0]):
        peak = max(peak, abs(xr[k]))
    s = max(peak, np.float32(1e-12)) / np.float32(127.0)
    for k in range(xr.shape[0]):
        qr[k] = np.int8(np.rint(xr[k] / s))
    return s


@numba.njit(fastmath=_EXACT, cache=CACHE, nogil=True, inline="always")  # type: ignore[call-overload]
def _quantize_row(x, xq, xs, m):  # type: ignore[no-untyped-def]  # x (M, K) -> xq (M, K) int8, xs (M,)
    xs[m] = _quantize_into(x[m], xq[m])


@numba.njit(parallel=True, fastmath=_EXACT, cache=CACHE, nogil=True)  # type: ignore[call-overload]
def quantize_rows_i8(x, xq, xs):  # type: ignore[no-untyped-def]
    """Symmetric per-row int8: xs[m] = max|x[m]| / 127, xq = round(x / xs) (half to even)."""
    for m in prange(x.shape[0]):
        _quantize_row(x, xq, xs, m)


@numba.njit(fastmath=_EXACT, cache=CACHE, nogil=True)  # type: ignore[call-overload]
def quantize_rows_i8_serial(x, xq, xs):  # type: ignore[no-untyped-def]
    for m in range(x.shape[0]):
        _quantize_row(x, xq, xs, m)


@numba.njit(fastmath=True, cache=CACHE, nogil=True, inline="always")
def _dequantize_row(acc, xs, ws, b, out, m):  # type: ignore[no-untyped-def]  # int32 (M, N) -> float32
    sm = xs[m]
    for n in range(acc.shape[1]):
        out[m, n] = np.float32(acc[m, n]) * sm * ws[n] + b[n]


@numba.njit(parallel=True, fastmath=True, cache=CACHE, nogil=True)
def dequantize_acc(acc, xs, ws, b, out):  # type: ignore[no-untyped-def]
    """out[m, n] = acc[m, n] * xs[m] * ws[n] + b[n]: the int8 GEMM's epilogue in one pass."""
    for m in prange(acc.shape[0]):
        _dequantize_row(acc, xs, ws, b, out, m)


@numba.njit(fastmath=True, cache=CACHE, nogil=True)
def dequantize_acc_serial(acc, xs, ws, b, out):  # type: ignore[no-untyped-def]
    for m in range(acc.shape[0]):
        _dequantize_row(acc, xs, ws, b, out, m)


WEIGHT_TYPES = (np.float32, np.uint16, np.int16, np.int8)
"""Stored weight element types: float32, bfloat16 bits, float16 bits, int8."""


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel for the types the wrappers pass."""
    x = np.zeros((1, 8), np.float32)
    ones = np.ones(5, np.float32)
    out = np.empty((1, 5), np.float32)
    for dtype in WEIGHT_TYPES:
        for kernel in (gemv, gemv_serial):
            kernel(x, np.zeros((5, 8), dtype), ones, ones, out)
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


@numba.njit(fastmath=True, cache=CACHE, nogil=True, inline="always")
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


@numba.njit(fastmath=True, cache=CACHE, nogil=True, inline="always")
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


@numba.njit(fastmath=True, cache=CACHE, nogil=True, inline="always")
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


@numba.njit(parallel=True, fastmath=True, cache=CACHE, nogil=True)
def attend(qkv, pos, kc, vc, row0, scale, y, scores):  # type: ignore[no-untyped-def]
    n_head = kc.shape[1]
    for t in prange(qkv.shape[0] * n_head):
        _attend_one(qkv, pos, kc, vc, row0, scale, y, scores[t], t // n_head, t % n_head)


@numba.njit(fastmath=True, cache=CACHE, nogil=True)
def attend_serial(qkv, pos, kc, vc, row0, scale, y, scores):  # type: ignore[no-untyped-def]
    n_head = kc.shape[1]
    for t in range(qkv.shape[0] * n_head):
        _attend_one(qkv, pos, kc, vc, row0, scale, y, scores[t], t // n_head, t % n_head)


@numba.njit(fastmath=True, cache=CACHE, nogil=True, inline="always")
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


@numba.njit(fastmath=True, cache=CACHE, nogil=True, inline="always")
def _matmul(x, w, scale, b, out, parallel):  # type: ignore[no-untyped-def]
    if parallel:
        gemv(x, w, scale, b, out)
    else:
        gemv_serial(x, w, scale, b, out)


@numba.njit(fastmath=True, cache=CACHE, nogil=True)
def block_step(  # type: ignore[no-untyped-def]
    x, pos, kc, vc, row0, ln1, qkv_w, attn_o, ln2, fc, proj, eps, attn_scale, act, parallel
):
    """One GPT-2 block for x (B, C), each row one token at position pos[r], in place.

    ``ln1``/``ln2`` are (weight, bias); ``qkv_w``, ``attn_o``, ``fc``, ``proj`` are (weight,
    scale, bias) as ``gemv`` takes them. Writes the rows' keys and values into kc, vc (rows
    row0..row0+B-1) and leaves the block's output in x.
    """
    B, C = x.shape
    h = np.empty((B, C), np.float32)
    _layer_norm(x, ln1[0], ln1[1], eps, h)
    qkv = np.empty((B, qkv_w[0].shape[0]), np.float32)
    _matmul(h, qkv_w[0], qkv_w[1], qkv_w[2], qkv, parallel)
    y = np.empty((B, C), np.float32)
    scores = np.empty((B * kc.shape[1], pos.max() + 1), np.float32)
    if parallel:
        attend(qkv, pos, kc, vc, row0, attn_scale, y, scores)
    else:
        attend_serial(qkv, pos, kc, vc, row0, attn_scale, y, scores)
    a = np.empty((B, C), np.float32)
    _matmul(y, attn_o[0], attn_o[1], attn_o[2], a, parallel)
    x += a
    _layer_norm(x, ln2[0], ln2[1], eps, h)
    f = np.empty((B, fc[0].shape[0]), np.float32)
    _matmul(h, fc[0], fc[1], fc[2], f, parallel)
    for r in range(B):
        _activate(f[r], act)
    _matmul(f, proj[0], proj[1], proj[2], a, parallel)
    x += a


# The int8 MLP's middle (kernels.int8_mlp): c_fc's int32 sums -> bias, activation -> int8 for
# c_proj, row by row in one pass (no float32 hidden matrix, no separate GELU and quantise
# passes). The dequantisation contracts like ``dequantize_acc``; the rounding like the quantiser.
_EPILOGUE = {"nnan", "ninf", "nsz", "reassoc", "contract"}


@numba.njit(fastmath=_EPILOGUE, cache=CACHE, nogil=True, inline="always")  # type: ignore[call-overload]
def _activate_quantize_row(acc, xs, ws, b, act, hq, hs, m):  # type: ignore[no-untyped-def]
    row = np.empty(acc.shape[1], np.float32)
    sm = xs[m]
    for n in range(acc.shape[1]):
        row[n] = np.float32(acc[m, n]) * sm * ws[n] + b[n]
    _activate(row, act)
    hs[m] = _quantize_into(row, hq[m])


@numba.njit(parallel=True, fastmath=_EPILOGUE, cache=CACHE, nogil=True)  # type: ignore[call-overload]
def activate_quantize(acc, xs, ws, b, act, hq, hs):  # type: ignore[no-untyped-def]
    """acc int32 (M, N), x scales xs (M,), weight scales ws (N,), bias b (N,) -> the activation
    of the float32 result, rounded to int8 per row: hq (M, N), hs (M,)."""
    for m in prange(acc.shape[0]):
        _activate_quantize_row(acc, xs, ws, b, act, hq, hs, m)


@numba.njit(fastmath=_EPILOGUE, cache=CACHE, nogil=True)  # type: ignore[call-overload]
def activate_quantize_serial(acc, xs, ws, b, act, hq, hs):  # type: ignore[no-untyped-def]
    for m in range(acc.shape[0]):
        _activate_quantize_row(acc, xs, ws, b, act, hq, hs, m)
