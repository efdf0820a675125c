"""The GPT2_* environment variables that pick a code path: their names, their values, and how
the library reads them. Imports nothing heavy: the CLI checks them before torch is loaded."""

from __future__ import annotations

import os
from collections.abc import Mapping

THREADS_ENV = "GPT2_THREADS"
"""Threads for torch and the numba kernels (a positive integer)."""

KERNELS_ENV = "GPT2_KERNELS"
KERNEL_CHOICES = ("auto", "numba", "unfused", "torch")
"""torch: PyTorch's matmuls only; unfused: the numba matmuls without the fused decode step."""

GEMM_ENV = "GPT2_GEMM"
GEMM_CHOICES = ("auto", "onednn", "blas")
"""Where float32 GEMMs of prefill and scoring go (kernels.fp32_gemm_path)."""

INT8_GEMM_ENV = "GPT2_INT8_GEMM"
INT8_GEMM_CHOICES = ("auto", "int-mm", "numba")
"""Where int8 layers of more than a few rows go on CPU (kernels.int8_gemm_path): torch's
``_int_mm`` (oneDNN; auto where the CPU has VNNI or AMX) or the numba int8 kernel over all
rows (auto elsewhere: on an AVX2-only CPU ``_int_mm`` ran 30x slower than a float32 GEMM)."""

GEMV_ENV = "GPT2_GEMV"
GEMV_CHOICES = ("auto", "rows", "prefetched-rows", "blocks")
"""How batch-1 decode reads its weights (kernels.gemv_layout): one row at a time (auto for half
and int8 weights on AMD CPUs: on a Zen 4 EPYC float16 1.04-1.26x the prefetched rows end to
end), one row at a time with each row prefetched a few rows ahead (auto for them on Intel's:
1.06-1.08x the blocks on an Ice Lake Xeon), or rows side by side in blocks (auto for float32,
and for half weights on CPUs with AMX: 1.11x the rows on a Sapphire Rapids Xeon;
docs/performance.md). int8 sums are the same bits in every layout; half sums too on the
AVX-512 CPUs seen, within a few ulps on AVX2 ones (numba_kernels' note on the layouts)."""


def choice(name: str, choices: tuple[str, ...], environ: Mapping[str, str] | None = None) -> str:
    """``name``'s value in ``environ`` (the process's by default) if it is one of ``choices``
    (any case, spaces around), else "auto": unset, or a value the CLI would have refused."""
    value = (os.environ if environ is None else environ).get(name, "").strip().lower()
    return value if value in choices else "auto"


def threads(environ: Mapping[str, str] | None = None) -> int | None:
    """``GPT2_THREADS`` as a thread count, or None where unset (or not a positive integer)."""
    value = (os.environ if environ is None else environ).get(THREADS_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
