"""Batch-1 CPU matmul kernels and the one ``linear`` the model calls, which picks the path.

Decoding one token multiplies a single activation row by every weight matrix: a
matrix-vector product bound by memory bandwidth. PyTorch's BLAS GEMV reaches about half
of this CPU's bandwidth; a numba kernel with one dot product per output row over the
(out, in) weight reaches about 80% (figures in docs/performance.md). Paths:

- CPU, float32, up to 16 rows:    numba ``_gemv_f32``   (fallback: ``F.linear``)
- CPU, int8 weight, up to 16 rows: numba ``_gemv_i8``   (fallback: dequantise + ``F.linear``)
- CPU, float16/bfloat16 weight:   one row: ``F.linear`` in the weight's dtype (its GEMV is
  fast); several rows: the weight converted to float32 for that call (half GEMM is slow here)
- anything else (several rows, CUDA, MPS): ``F.linear``

numba is optional: without it (or with ``GPT2_KERNELS=torch``) every path is pure torch.
The kernels are compiled once per process and cached on disk in the first writable one of
``NUMBA_CACHE_DIR`` and ``$XDG_CACHE_HOME/gpt2cli/numba`` (``~/.cache/...``); with neither
(a read-only install and home) they are compiled in memory, never failing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_numba: Any = None  # the compiled kernels module namespace, once built
_numba_state = "unknown"  # unknown | ready | missing


def _build() -> bool:
    """Compile (or load from numba's cache) the kernels; False when numba is unavailable."""
    global _numba, _numba_state
    if _numba_state != "unknown":
        return _numba_state == "ready"
    if os.environ.get("GPT2_KERNELS", "").lower() == "torch":
        _numba_state = "missing"
        return False
    try:
        import numba
        import numpy as np
    except ImportError:
        _numba_state = "missing"
        return False
    cache_dir = writable_cache_dir()
    if cache_dir is not None:
        numba.config.CACHE_DIR = str(cache_dir)  # type: ignore[attr-defined]  # read at decoration
    cache = cache_dir is not None
    # numba picks its threading layer (tbb, then OpenMP, then workqueue). On an idle 2-core
    # machine OpenMP decodes 2x faster than workqueue (43 vs 21 tok/s); on a heavily shared one
    # OpenMP's spin-waiting beside torch's pool hurts, and NUMBA_THREADING_LAYER=workqueue
    # is the remedy (docs/performance.md).

    # fastmath lets LLVM vectorise the dot product (reassociated sums): the result differs
    # from BLAS by rounding only (~1e-6 relative), well inside the 1e-4 fidelity target.
    # x is (B, in) with B small (decode rows): each weight row is read from memory once and
    # reused, from L1, for every row of x, so B rows cost little more than one.
    @numba.njit(parallel=True, fastmath=True, cache=cache)
    def gemv_f32(x, w, b, out):  # x (B, in), w (out, in), b (out,), out (B, out)
        for o in numba.prange(w.shape[0]):
            row = w[o]
            for r in range(x.shape[0]):
                xr = x[r]
                acc = np.float32(0.0)
                for i in range(x.shape[1]):
                    acc += xr[i] * row[i]
                out[r, o] = acc + b[o]

    @numba.njit(parallel=True, fastmath=True, cache=cache)
    def gemv_f32_nobias(x, w, out):
        for o in numba.prange(w.shape[0]):
            row = w[o]
            for r in range(x.shape[0]):
                xr = x[r]
                acc = np.float32(0.0)
                for i in range(x.shape[1]):
                    acc += xr[i] * row[i]
                out[r, o] = acc

    @numba.njit(parallel=True, fastmath=True, cache=cache)
    def gemv_i8(x, w, scale, b, out):  # w int8 (out, in), scale (out,): y = scale * (w @ x) + b
        for o in numba.prange(w.shape[0]):
            row = w[o]
            for r in range(x.shape[0]):
                xr = x[r]
                acc = np.float32(0.0)
                for i in range(x.shape[1]):
                    acc += xr[i] * np.float32(row[i])
                out[r, o] = acc * scale[o] + b[o]

    from types import SimpleNamespace

    _numba = SimpleNamespace(gemv_f32=gemv_f32, gemv_f32_nobias=gemv_f32_nobias, gemv_i8=gemv_i8, numba=numba)
    _numba_state = "ready"
    _sync_threads()
    return True


def cache_dirs() -> list[Path]:
    """Where compiled kernels may be kept, in order of preference."""
    dirs = [Path(os.environ["NUMBA_CACHE_DIR"])] if os.environ.get("NUMBA_CACHE_DIR") else []
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [*dirs, Path(base) / "gpt2cli" / "numba"]


def writable_cache_dir() -> Path | None:
    """The first of ``cache_dirs`` that can be created and written, or None (compile in memory)."""
    for path in cache_dirs():
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError:
            continue
        return path
    return None


def _sync_threads() -> None:
    """numba's thread pool uses as many threads as torch's intra-op pool."""
    if _numba is None:
        return
    n = max(1, min(torch.get_num_threads(), _numba.numba.config.NUMBA_NUM_THREADS))
    _numba.numba.set_num_threads(n)


def available() -> bool:
    """Whether the numba kernels can be used in this process."""
    return _build()


def set_enabled(enabled: bool) -> None:
    """Switch the numba kernels on or off for this process (tests compare both paths)."""
    global _numba_state
    if not enabled:
        _numba_state = "missing"
    else:
        _numba_state = "unknown" if _numba is None else "ready"
        _build()


def is_enabled() -> bool:
    return _numba_state == "ready" or (_numba_state == "unknown" and _build())


def warm_up() -> None:
    """Compile the kernels now (at load time) rather than in the first decode step."""
    if not _build():
        return
    x = torch.zeros(1, 8)
    w = torch.zeros(4, 8)
    b = torch.zeros(4)
    out = torch.empty(1, 4)
    _numba.gemv_f32(x.numpy(), w.numpy(), b.numpy(), out.numpy())
    _numba.gemv_f32_nobias(x.numpy(), w.numpy(), out.numpy())
    _numba.gemv_i8(x.numpy(), torch.zeros(4, 8, dtype=torch.int8).numpy(), b.numpy(), b.numpy(), out.numpy())


# Up to this many rows (decode steps of several samples) the kernels beat BLAS GEMM: they are
# bound by reading the weights, which they do once for all rows.
SMALL_BATCH = 16


def _is_single_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


def _is_small_batch(x: torch.Tensor) -> bool:
    return x.numel() <= SMALL_BATCH * x.shape[-1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for x (..., in) and weight (out, in), on the fastest path here."""
    if x.device.type != "cpu" or x.requires_grad or weight.requires_grad:
        return F.linear(x, weight, bias)
    if weight.dtype in (torch.float16, torch.bfloat16):
        return _linear_half_cpu(x, weight, bias)
    if (
        weight.dtype == torch.float32
        and x.dtype == torch.float32
        and _is_small_batch(x)
        and is_enabled()
        and not torch.compiler.is_compiling()
    ):
        return _gemv_f32(x, weight, bias)
    return F.linear(x, weight, bias)


def _gemv_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    xv = x.reshape(-1, x.shape[-1]).contiguous()  # (B, in)
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
    out2d = out.view(-1, weight.shape[0])  # (B, out)
    w = weight if weight.is_contiguous() else weight.contiguous()
    if bias is None:
        _numba.gemv_f32_nobias(xv.numpy(), w.numpy(), out2d.numpy())
    else:
        _numba.gemv_f32(xv.numpy(), w.numpy(), bias.numpy(), out2d.numpy())
    return out


def _linear_half_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Half-precision weights, float32 activations: GEMV in half, GEMM in float32."""
    b32 = bias.float() if bias is not None else None
    if _is_single_row(x):
        y = F.linear(x.to(weight.dtype), weight, bias.to(weight.dtype) if bias is not None else None)
        return y.float()
    # Prefill: half GEMM runs at ~1 GFLOP/s on this CPU; converting the weight is far cheaper.
    return F.linear(x.float(), weight.float(), b32)


def linear_int8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias`` for int8 qweight (out, in), float32 scale (out,)."""
    if x.device.type == "cpu" and _is_small_batch(x) and is_enabled() and not torch.compiler.is_compiling():
        xv = x.reshape(-1, x.shape[-1]).float().contiguous()  # (B, in)
        out = torch.empty(*x.shape[:-1], qweight.shape[0], dtype=torch.float32)
        b = bias if bias is not None else torch.zeros(qweight.shape[0])
        out2d = out.view(-1, qweight.shape[0])
        _numba.gemv_i8(xv.numpy(), qweight.numpy(), scale.numpy(), b.float().numpy(), out2d.numpy())
        return out.to(x.dtype)
    # Several rows (or no numba): dequantise for this call; GEMM cost dwarfs the conversion.
    w = qweight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
