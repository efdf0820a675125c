"""The numba bodies of the CPU decode kernels: matrix times a few rows, bound by reading the weight.

Imported by ``kernels.py`` only where numba is installed; ``kernels.py`` owns the choice of
path, the threads and the torch-facing wrappers. Every kernel computes, for x (B, in) and a
weight (out, in) in its storage type,

    out[r, o] = sum_i x[r, i] * w[o, i]  (+ per-row scale for int8)  + b[o]

with one dot product per output row, rows split between threads (``prange``) or run in the
calling thread (the ``_serial`` twins). Each weight
row is read from memory once and reused from L1 for every row of x, so B <= 16 rows cost
little more than one. ``fastmath`` lets LLVM vectorise the reduction (reassociated sums): the
result differs from BLAS by rounding only (~1e-6 relative). The order of the sum does not
depend on the number of threads, so the output is bit-identical for 1, 2 or N threads.

Half-precision weights arrive as their raw 16 bits (an int16 view): bfloat16 -> float32 is
a 16-bit shift, float16 -> float32 one ``vcvtph2ps`` (F16C, on every AVX2 CPU), so both
vectorise like the float32 kernel while reading half the bytes.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic


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


# One output row per call of a ``_row_*`` function; ``gemv_*`` splits the rows between numba's
# threads, ``gemv_*_serial`` runs them in the calling thread (no thread pool involved: what a
# busy machine needs). Both inline the same row function, so their sums are bit-identical.
_ROW = {"fastmath": True, "cache": True, "nogil": True, "inline": "always"}


@numba.njit(**_ROW)  # type: ignore[call-overload]
def _row_f32(x, w, b, out, o):  # type: ignore[no-untyped-def]  # x (B, in), w (out, in), b (out,), out (B, out)
    row = w[o]
    for r in range(x.shape[0]):
        xr = x[r]
        acc = np.float32(0.0)
        for i in range(x.shape[1]):
            acc += xr[i] * row[i]
        out[r, o] = acc + b[o]


@numba.njit(**_ROW)  # type: ignore[call-overload]
def _row_bf16(x, w, b, out, o):  # type: ignore[no-untyped-def]  # w: int16 bits of bfloat16
    row = w[o]
    for r in range(x.shape[0]):
        xr = x[r]
        acc = np.float32(0.0)
        for i in range(x.shape[1]):
            acc += xr[i] * bf16_bits_to_f32(row[i])  # type: ignore[call-arg]
        out[r, o] = acc + b[o]


@numba.njit(**_ROW)  # type: ignore[call-overload]
def _row_f16(x, w, b, out, o):  # type: ignore[no-untyped-def]  # w: int16 bits of float16
    row = w[o]
    for r in range(x.shape[0]):
        xr = x[r]
        acc = np.float32(0.0)
        for i in range(x.shape[1]):
            acc += xr[i] * f16_bits_to_f32(row[i])  # type: ignore[call-arg]
        out[r, o] = acc + b[o]


@numba.njit(**_ROW)  # type: ignore[call-overload]
def _row_i8(x, w, scale, b, out, o):  # type: ignore[no-untyped-def]  # w int8 (out, in), scale (out,)
    row = w[o]
    for r in range(x.shape[0]):
        xr = x[r]
        acc = np.float32(0.0)
        for i in range(x.shape[1]):
            acc += xr[i] * np.float32(row[i])
        out[r, o] = acc * scale[o] + b[o]


_PAR = {"parallel": True, "fastmath": True, "cache": True, "nogil": True}
_SER = {"fastmath": True, "cache": True, "nogil": True}


@numba.njit(**_PAR)  # type: ignore[call-overload]
def gemv_f32(x, w, b, out):  # type: ignore[no-untyped-def]
    for o in prange(w.shape[0]):
        _row_f32(x, w, b, out, o)


@numba.njit(**_SER)  # type: ignore[call-overload]
def gemv_f32_serial(x, w, b, out):  # type: ignore[no-untyped-def]
    for o in range(w.shape[0]):
        _row_f32(x, w, b, out, o)


@numba.njit(**_PAR)  # type: ignore[call-overload]
def gemv_bf16(x, w, b, out):  # type: ignore[no-untyped-def]
    for o in prange(w.shape[0]):
        _row_bf16(x, w, b, out, o)


@numba.njit(**_SER)  # type: ignore[call-overload]
def gemv_bf16_serial(x, w, b, out):  # type: ignore[no-untyped-def]
    for o in range(w.shape[0]):
        _row_bf16(x, w, b, out, o)


@numba.njit(**_PAR)  # type: ignore[call-overload]
def gemv_f16(x, w, b, out):  # type: ignore[no-untyped-def]
    for o in prange(w.shape[0]):
        _row_f16(x, w, b, out, o)


@numba.njit(**_SER)  # type: ignore[call-overload]
def gemv_f16_serial(x, w, b, out):  # type: ignore[no-untyped-def]
    for o in range(w.shape[0]):
        _row_f16(x, w, b, out, o)


@numba.njit(**_PAR)  # type: ignore[call-overload]
def gemv_i8(x, w, scale, b, out):  # type: ignore[no-untyped-def]
    for o in prange(w.shape[0]):
        _row_i8(x, w, scale, b, out, o)


@numba.njit(**_SER)  # type: ignore[call-overload]
def gemv_i8_serial(x, w, scale, b, out):  # type: ignore[no-untyped-def]
    for o in range(w.shape[0]):
        _row_i8(x, w, scale, b, out, o)


@numba.njit(**_SER)  # type: ignore[call-overload]
def embed_i8(ids, w, scale, out):  # type: ignore[no-untyped-def]  # ids (n,), w int8 (V, C) -> out (n, C)
    for t in range(ids.shape[0]):
        row = w[ids[t]]
        s = scale[ids[t]]
        for i in range(w.shape[1]):
            out[t, i] = np.float32(row[i]) * s


GEMV = {"f32": (gemv_f32, gemv_f32_serial), "bf16": (gemv_bf16, gemv_bf16_serial),
        "f16": (gemv_f16, gemv_f16_serial), "i8": (gemv_i8, gemv_i8_serial)}  # fmt: skip
"""kind -> (parallel kernel, serial kernel)."""


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel for the types the wrappers pass."""
    x = np.zeros((1, 8), np.float32)
    b = np.zeros(4, np.float32)
    out = np.empty((1, 4), np.float32)
    for kernel in (gemv_f32, gemv_f32_serial):
        kernel(x, np.zeros((4, 8), np.float32), b, out)
    for kernel in (gemv_bf16, gemv_bf16_serial, gemv_f16, gemv_f16_serial):
        kernel(x, np.zeros((4, 8), np.int16), b, out)
    for kernel in (gemv_i8, gemv_i8_serial):
        kernel(x, np.zeros((4, 8), np.int8), b, b, out)
    embed_i8(np.zeros(1, np.int64), np.zeros((4, 4), np.int8), b, out)
