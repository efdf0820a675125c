"""CPU matmul paths and the one ``linear`` / ``linear_int8`` the model calls, which picks the path.

Decoding multiplies a few activation rows by every weight matrix: bound by reading the
weights. Prefill and scoring multiply hundreds of rows: bound by arithmetic. Paths, for x
float32 (..., in) and a weight (out, in) on CPU:

| weight | up to 16 rows (decode) | more rows (prefill, scoring) |
|---|---|---|
| float32 | numba ``gemv`` | GEMM: oneDNN on AMD CPUs, else torch's BLAS (``fp32_gemm_path``) |
| bfloat16 | numba ``gemv`` (bits widened) | bf16 GEMM (oneDNN: AVX512-BF16/AMX), x rounded to bf16 |
| float16 | numba ``gemv`` (bits widened) | f16 GEMM (oneDNN: AVX512-FP16/AMX-FP16), x rounded to f16 |
| int8, per-row scale | numba ``gemv_i8`` (VNNI if there) | ``torch._int_mm`` (VNNI/AMX), else ``gemv_i8`` |

int8 layers round x to int8 per row on every CPU path and sum the int8 products exactly, so
``linear_int8`` gives a row the same bits whatever its batch, path (GEMV, GEMM, reference) or
threads. Where the CPU lacks the half-precision instructions (bf16: AVX512-BF16 or AMX, which
oneDNN emulates on other x86 CPUs 3-4x slower than widening), or numba is not installed, or
``GPT2_KERNELS=torch``, paths fall back to torch: half weights are converted to float32 for
the call, int8 goes through ``torch._int_mm`` with torch's own rounding and
rescaling. Float32 GEMMs go to oneDNN where torch's BLAS (MKL) does not run its AVX-512 code:
on AMD CPUs MKL's sgemm reached 140-200 GFLOP/s, oneDNN's 300-460 on a 2-core Zen 5
(docs/performance.md); ``GPT2_GEMM=onednn|blas`` chooses by hand. int8 layers of many rows
go to ``torch._int_mm`` where oneDNN has VNNI or AMX for it, to ``gemv_i8`` over all the rows
elsewhere (``int8_gemm_path``, ``GPT2_INT8_GEMM=int-mm|numba``): the same bits either way.
``set_enabled(False)`` turns every fast path off (the reference the tests compare with). CUDA
and autograd use ``F.linear`` (int8 weights dequantised).

The kernels are compiled once per process and cached on disk in the first writable one of
``NUMBA_CACHE_DIR`` and ``$XDG_CACHE_HOME/gpt2cli/numba`` (``~/.cache/...``); with neither
(a read-only install and home) they are compiled in memory, never failing. Loading a model
warms up only the kernels of its weight types (``warm_up``); others compile if ever called.

Inside ``torch.compile`` graphs the numba kernels run as custom ops (``torch.ops.gpt2cli.*``,
with fake implementations for tracing); eager calls skip the dispatcher (~10 us a call).

Threads: the numba kernels use as many threads as torch's intra-op pool
(``torch.set_num_threads``, ``--threads``, ``GPT2_THREADS``), fewer while other processes keep
cores busy (``cpuload.LoadWatch``; ``GPT2_ADAPTIVE_THREADS=0`` turns that off). One thread
runs ``gemv_serial`` in the calling thread; several use numba's OpenMP layer (first in
``THREADING_LAYERS``; ``NUMBA_THREADING_LAYER`` overrides). Measurements: docs/performance.md.
"""

from __future__ import annotations

import functools
import os
import platform
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.library import custom_op
from torch.utils.weak import WeakIdKeyDictionary

from gpt2cli import switches
from gpt2cli.cpuload import LoadWatch

SMALL_BATCH = 16
"""Up to this many rows the weight-streaming kernels beat GEMM: they read the weights once for all rows."""

THREADING_LAYERS = ["omp", "tbb", "workqueue"]
"""numba's layers in order of preference when NUMBA_THREADING_LAYER is unset. OpenMP launches a
region in microseconds where workqueue takes ~50 us (49 regions a token): on the 2-core
Sapphire Rapids machine workqueue decoded at half OpenMP's speed (fp32 14.9 vs 29.2 tok/s,
int8 26.3 vs 59.1; docs/performance.md)."""

OMP_SPINCOUNT = "10000"
"""GOMP_SPINCOUNT for numba's OpenMP pool (unless set): idle threads spin ~10 us, not ~0.3 ms,
beside torch's own pool (a second libgomp)."""

HALF = (torch.float16, torch.bfloat16)

ONEDNN_VENDORS = ("AuthenticAMD", "HygonGenuine")
"""CPU vendors whose float32 GEMMs go to oneDNN by default: MKL's sgemm takes its AVX2 code there
(2-3x slower than oneDNN's AVX-512 on Zen 5). Intel CPUs keep MKL, which runs its AVX-512 code
there (the Sapphire Rapids runs in docs/performance.md used it)."""

BLOCKS, ROWS, PREFETCHED_ROWS = 0, 1, 2
"""The decode GEMV's ``layout`` (``gemv_layout``): how ``gemv`` and ``gemv_i8`` read the weight for
a few rows of x: rows side by side in blocks, one row at a time, or one row at a time with each
row prefetched ``numba_kernels.PREFETCH_ROWS`` ahead."""

_nk: Any = None  # the gpt2cli.numba_kernels module, once compiled
_state = "unknown"  # unknown | ready | missing | off
_numba_threads = 0  # numba's thread count as last set
_watch = LoadWatch()
_launch = threading.Lock()  # held while a parallel numba kernel runs


# --- set-up ----------------------------------------------------------------------------------


def _build() -> bool:
    """Import and compile (or load from numba's disk cache) the kernels; False without numba."""
    global _nk, _state
    if _state != "unknown":
        return _state == "ready"
    if switches.choice(switches.KERNELS_ENV, switches.KERNEL_CHOICES) == "torch":
        _state = "missing"
        return False
    try:
        import numba

        if not os.environ.get("NUMBA_THREADING_LAYER"):
            numba.config.THREADING_LAYER_PRIORITY = THREADING_LAYERS  # type: ignore[attr-defined]
        from gpt2cli import numba_kernels
    except ImportError:
        _state = "missing"
        return False
    spin = os.environ.get("GOMP_SPINCOUNT")
    os.environ["GOMP_SPINCOUNT"] = spin or OMP_SPINCOUNT  # read once, when the pool starts
    try:
        numba_kernels.warm_up([np.float32])  # starts the OpenMP pool; other types at load (warm_up)
    finally:
        if spin is None:
            del os.environ["GOMP_SPINCOUNT"]
    _nk = numba_kernels
    _state = "ready"
    _watch.sample()
    return True


def cache_dirs() -> list[Path]:
    """Where compiled kernels may be kept, in order of preference."""
    dirs = [Path(os.environ["NUMBA_CACHE_DIR"])] if os.environ.get("NUMBA_CACHE_DIR") else []
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [*dirs, Path(base) / "gpt2cli" / "numba"]


def compiles_in_memory() -> bool:
    """Whether this process would compile the numba kernels without a disk cache to keep them
    (numba installed and wanted, none of ``cache_dirs`` writable)."""
    import importlib.util

    if switches.choice(switches.KERNELS_ENV, switches.KERNEL_CHOICES) == "torch":
        return False
    if importlib.util.find_spec("numba") is None:
        return False
    return writable_cache_dir() is None


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


def kernel_threads() -> int:
    """Threads for the next kernel call: torch's count, fewer while the machine is busy."""
    global _numba_threads
    n = torch.get_num_threads()
    if n > 1 and os.environ.get("GPT2_ADAPTIVE_THREADS", "1") != "0":
        n = _watch.threads(n)
    if n > 1 and n != _numba_threads:
        import numba

        n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        numba.set_num_threads(n)
        _numba_threads = n
    return n


@contextmanager
def parallel_slot() -> Iterator[bool]:
    """Whether the kernels called inside may run in parallel (the launch lock then held).

    False with one thread, or while another Python thread holds the lock: run serial twins.
    """
    parallel = kernel_threads() > 1 and _launch.acquire(blocking=False)
    try:
        yield parallel
    finally:
        if parallel:
            _launch.release()


def nk() -> Any:
    """The compiled ``gpt2cli.numba_kernels`` module (callers check ``is_enabled`` first)."""
    if not _build():
        raise RuntimeError("the numba kernels are not available")
    return _nk


def _kernel(name: str = "gemv") -> Callable[..., None]:
    """The numba kernel ``name``: parallel where ``parallel_slot`` allows, else its serial twin.

    One parallel launch at a time (numba's workqueue layer, the fallback, aborts on concurrent
    launches): a second Python thread calling meanwhile runs the serial twin instead of waiting.
    """

    def launch(*args: Any) -> None:
        with parallel_slot() as parallel:
            getattr(_nk, name if parallel else name + "_serial")(*args)

    return launch


def available() -> bool:
    """Whether the numba kernels can be used in this process."""
    return _build() if _state != "off" else _nk is not None


def set_enabled(enabled: bool) -> None:
    """Switch every fast path on or off for this process (tests compare both)."""
    global _state
    if not enabled:
        _state = "off"
    else:
        _state = "unknown" if _nk is None else "ready"
        _build()


def is_enabled() -> bool:
    """Whether the numba kernels are in use (built, and not switched off)."""
    return _state == "ready" or (_state == "unknown" and _build())


def warm_up(weight_dtypes: Iterable[torch.dtype] = ()) -> None:
    """Compile the kernels that weights of ``weight_dtypes`` take now (at load time), rather
    than in the first decode step. Not the others: compiled in memory, where no cache
    directory is writable, each kernel costs seconds (all of them: ~1-2 minutes)."""
    if _build():
        kinds = {d for d in weight_dtypes if d in _STORED_AS or d == torch.int8}
        # each as the kernels get it (gemv_operands): half precision as its raw 16 bits
        _nk.warm_up([torch.empty(0, dtype=_STORED_AS.get(d, d)).numpy().dtype for d in kinds])


@functools.cache
def _capabilities() -> frozenset[str]:
    """The half-precision GEMM paths this CPU and this torch build offer: bf16, f16."""
    caps = set()
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        if mkldnn is not None and mkldnn._is_mkldnn_bf16_supported() and _native_bf16():
            caps.add("bf16")
        if mkldnn is not None and mkldnn._is_mkldnn_fp16_supported():
            caps.add("f16")
    except (AttributeError, RuntimeError):
        pass
    return frozenset(caps)


def _native_bf16() -> bool:
    """Whether the CPU multiplies bf16 itself (AVX512-BF16 or AMX), not by oneDNN's emulation.

    oneDNN also reports bf16 on plain AVX-512 x86 CPUs and emulates it there: on an Ice Lake
    Xeon its bf16 GEMM ran at 54-59 GFLOP/s against 150-240 for the weight widened to float32
    per call (docs/performance.md). Elsewhere (aarch64) oneDNN's own answer stands.
    """
    if not on_x86():
        return True
    return any(_torch_cpu_has(name) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def on_x86() -> bool:
    """Whether this is an x86 machine (64- or 32-bit), by ``platform.machine()``."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _torch_cpu_has(check_name: str) -> bool:
    """torch.cpu's answer to one of its feature checks (False where this torch lacks it)."""
    check = getattr(torch.cpu, check_name, None)
    return check is not None and bool(check())


def _can(path: str) -> bool:
    return _state != "off" and path in _capabilities()


@functools.cache
def _cpu_vendor() -> str:
    """The CPU's vendor string on Linux (``vendor_id`` in /proc/cpuinfo), else ""."""
    return _cpuinfo_field("vendor_id")


def _cpuinfo_field(name: str) -> str:
    """The first CPU's ``name`` line in /proc/cpuinfo (Linux), else ""."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.partition(":")[0].strip() == name:
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


@functools.cache
def _has_onednn_linear() -> bool:
    """Whether this torch build has oneDNN's linear op (x86 and aarch64 wheels do)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def int8_gemm_path() -> str:
    """Where int8 layers of more than ``SMALL_BATCH`` rows go on CPU: "int-mm" or "numba".

    ``GPT2_INT8_GEMM`` (int-mm, numba) chooses; unset, auto or unknown: torch's ``_int_mm``
    (oneDNN) where the CPU has VNNI or AMX, or is not x86; the numba ``gemv_i8`` over all the
    rows elsewhere: on a 2-core AVX2-only Zen 4 VM ``_int_mm`` took 444 ms for 512 x 768 x 2304
    (its reference code) against 13-20 ms for the float32 GEMM and 10 ms for ``gemv_i8``, which
    was 1.2-1.5x the float32 GEMM at prefill's shapes (docs/performance.md). Both sum the same
    int8 products exactly: the same bits. Always "int-mm" with the fast paths off (the reference).
    """
    if not is_enabled():
        return "int-mm"
    choice = switches.choice(switches.INT8_GEMM_ENV, switches.INT8_GEMM_CHOICES)
    if choice != "auto":
        return choice
    return "int-mm" if _fast_int_mm() else "numba"


@functools.cache
def _fast_int_mm() -> bool:
    """Whether oneDNN multiplies int8 in hardware here: VNNI (AVX512 or AVX), AMX, or not x86."""
    if not on_x86():
        return True
    if _torch_cpu_has("_is_vnni_supported") or _torch_cpu_has("_is_amx_tile_supported"):
        return True
    return "avx_vnni" in _cpu_flags()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags on Linux (``flags`` in /proc/cpuinfo), else none."""
    return frozenset(_cpuinfo_field("flags").split())


def fp32_gemm_path() -> str:
    """Where float32 GEMMs of more than ``SMALL_BATCH`` rows go on CPU: "onednn" or "blas".

    ``GPT2_GEMM`` (onednn, blas) chooses; unset, auto or unknown: oneDNN on ``ONEDNN_VENDORS``'
    CPUs, torch's BLAS elsewhere. Always "blas" with the fast paths off (the reference) or
    without oneDNN in this torch.
    """
    if _state == "off" or not _has_onednn_linear():
        return "blas"
    choice = switches.choice(switches.GEMM_ENV, switches.GEMM_CHOICES)
    if choice != "auto":
        return choice
    return "onednn" if _cpu_vendor() in ONEDNN_VENDORS else "blas"


def gemv_layout(weight: Any) -> int:
    """How the decode GEMV reads ``weight`` (its numpy operand, as ``gemv_operands`` gives it) for
    a few rows of x: ``BLOCKS``, ``ROWS`` or ``PREFETCHED_ROWS``.

    ``GPT2_GEMV`` (rows, prefetched-rows, blocks) chooses; unset, auto or unknown: float32 in
    eight-row blocks; half and int8 weights one row at a time, each row prefetched a few rows
    ahead on Intel CPUs (Ice Lake: 1.06-1.08x the four-row blocks) and not on AMD's (Zen 4:
    float16 1.04-1.26x and bfloat16 1.01-1.06x the prefetched rows end to end; Zen 5: 1.18-1.30x
    the blocks), except half weights on CPUs with AMX (Sapphire Rapids and later), where
    four-row blocks streamed a step's matrices 1.11x as fast as the rows (docs/performance.md).
    """
    choice = switches.choice(switches.GEMV_ENV, switches.GEMV_CHOICES)
    if choice != "auto":
        return {"blocks": BLOCKS, "rows": ROWS, "prefetched-rows": PREFETCHED_ROWS}[choice]
    half = weight.dtype.itemsize == 2  # half kept as its raw 16 bits
    if weight.dtype == np.float32 or (half and _has_amx()):
        return BLOCKS
    return ROWS if _cpu_vendor() in ONEDNN_VENDORS else PREFETCHED_ROWS


@functools.cache
def _has_amx() -> bool:
    """Whether this x86 CPU has AMX tiles (Intel Sapphire Rapids and later), by torch's check."""
    return _torch_cpu_has("_is_amx_tile_supported")


# --- the entry points the model calls -----------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for x (..., in) and weight (out, in), on the fastest path here.

    The weight may be float32, float16 or bfloat16; on CPU x and the result are float32.
    """
    if x.device.type != "cpu" or x.requires_grad or weight.requires_grad:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    compiling = torch.compiler.is_compiling()
    if compiling and weight.dtype == torch.float32:
        # Inside a compiled graph torch's own float32 GEMV is as fast as ours (both at the memory
        # bus) and inductor fuses around it: 37.0 tok/s against 26.1 through the custom op.
        return F.linear(x, weight, bias)
    if rows <= SMALL_BATCH and x.dtype == torch.float32 and is_enabled():
        x2 = x.reshape(rows, x.shape[-1])
        y = torch.ops.gpt2cli.gemv(x2, weight, bias) if compiling else _gemv(x2, weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    if weight.dtype in HALF:
        return _half_linear(x, weight, bias)
    return _gemm(x, weight, bias)


def linear_int8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias`` for int8 qweight (out, in), float32 scale (out,).

    On CPU x is rounded to int8 per row and the int8 products summed exactly (``int8_gemm``'s
    arithmetic on every path); CUDA and half activations dequantise the weight instead.
    """
    rows = x.numel() // x.shape[-1]
    out_shape = (*x.shape[:-1], qweight.shape[0])
    if x.device.type == "cpu" and x.dtype == torch.float32:
        x2 = x.reshape(rows, x.shape[-1])
        if rows <= SMALL_BATCH and is_enabled():
            if torch.compiler.is_compiling():
                return torch.ops.gpt2cli.gemv_int8(x2, qweight, scale, bias).view(out_shape)
            return _gemv_int8(x2, qweight, scale, bias).view(out_shape)
        return int8_gemm(x2, qweight, scale, bias).view(out_shape)
    w = qweight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


def embedding_int8(ids: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (...,) of the int8 table (V, C) with per-row scales, as float32 (..., C)."""
    if ids.device.type == "cpu" and is_enabled() and not torch.compiler.is_compiling():
        flat = ids.reshape(-1).contiguous()
        out = torch.empty(flat.shape[0], qweight.shape[1])
        _nk.embed_i8(flat.numpy(), qweight.numpy(), scale.numpy(), out.numpy())
        return out.view(*ids.shape, qweight.shape[1])
    return qweight[ids].float() * scale[ids].unsqueeze(-1)


# --- implementations ----------------------------------------------------------------------------


@functools.cache
def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n)


@functools.cache
def _ones(n: int) -> torch.Tensor:
    return torch.ones(n)


def _bias(bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """The kernels' bias operand: float32, zeros where the layer has none."""
    return bias.detach().float() if bias is not None else _zeros(n)


_STORED_AS = {torch.float32: torch.float32, torch.bfloat16: torch.uint16, torch.float16: torch.int16}
"""How each weight dtype reaches numba: floats as they are, half precision as raw 16 bits."""


def gemv_operands(
    weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[Any, Any, Any, Any]:
    """(weight, per-row scale, bias, row sums) as numpy arrays the decode kernels read.

    weight (out, in): float32, bfloat16 or float16 (scale None: ones; no row sums), or int8
    with its scales (``gemv_i8``; row sums int32 (out,)).
    """
    n = weight.shape[0]
    if weight.dtype == torch.int8 and scale is not None:
        w, sums = weight.detach().contiguous(), _row_sums(weight)
    elif weight.dtype in _STORED_AS and scale is None:
        w, scale, sums = weight.detach().contiguous().view(_STORED_AS[weight.dtype]), _ones(n), _NO_SUMS
    else:
        raise TypeError(f"no decode kernel for {weight.dtype} weights")
    return w.numpy(), scale.detach().numpy(), _bias(bias, n).numpy(), sums


_NO_SUMS = np.zeros(0, np.int32)
_sums = WeakIdKeyDictionary()
"""Per int8 weight: (its address, its version, its row sums): a pass over the weight, done once."""


def _row_sums(qweight: torch.Tensor) -> Any:
    """sum(qweight[o, :]) for each row o, int32 (out,); recomputed if the weight changed."""
    try:
        version = qweight._version
    except RuntimeError:  # an inference-mode tensor has no version counter (nor in-place edits outside it)
        version = -1
    key = (qweight.data_ptr(), version)
    kept = _sums.get(qweight)
    if kept is not None and kept[:2] == key:
        return kept[2]
    # numpy widens in small buffers as it sums; torch's sum(dtype=int32) makes an int32 copy of
    # the whole matrix first (4 bytes a weight), and glibc kept those freed copies: +217 MiB of
    # RSS for the 124M model's blocks, 3.6x its int8 weights (docs/performance.md).
    sums = qweight.detach().numpy().sum(axis=1, dtype=np.int32)
    _sums[qweight] = (*key, sums)
    return sums


def _gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 float32 (B, in), weight float32/bfloat16/float16 (out, in) -> float32 (B, out)."""
    w, scale, b, _ = gemv_operands(weight, None, bias)
    return _run(x2, "gemv", w, scale, b)


def _gemv_int8(
    x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x2 float32 (B, in), int8 qweight (out, in), scale (out,) -> float32 (B, out), as ``int8_gemm``."""
    return _run(x2, "gemv_i8", *gemv_operands(qweight, scale, bias))


def _run(x2: torch.Tensor, kernel: str, *operands: Any) -> torch.Tensor:
    """The numba ``kernel`` on x2 and the weight's numpy operands (the weight first) -> (B, out)."""
    out = torch.empty(x2.shape[0], operands[0].shape[0])
    _kernel(kernel)(x2.contiguous().numpy(), *operands, out.numpy(), gemv_layout(operands[0]))
    return out


def _half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Half-precision weights, float32 activations, many rows (or no numba)."""
    if _can("bf16" if weight.dtype == torch.bfloat16 else "f16"):
        # torch hands half GEMMs to oneDNN (AVX512-BF16/AMX here: 4.5x the float32 GEMM) on
        # the weight as stored, no float32 copy; the bias is added in float32.
        y = F.linear(x.to(weight.dtype), weight).float()
        return y.add_(bias) if bias is not None else y
    if x.numel() == x.shape[-1]:  # one row: torch's half GEMV, as fast as any pure-torch path
        b = bias.to(weight.dtype) if bias is not None else None
        return F.linear(x.to(weight.dtype), weight, b).float()
    return _widened_gemm(x, weight, bias)


WIDEN_BLOCK_BYTES = 16 << 20
"""The float32 copy of a half weight that ``_widened_gemm`` holds at once (a block of its rows)."""


def _widened_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x float32 (..., in) @ half weight (out, in).T + bias, widened to float32 a block of rows at a
    time: never a float32 copy of the whole matrix (the 124M lm_head's is 154 MB, which also
    stayed in the process once freed), at the float32 GEMM's speed."""
    n_out, n_in = weight.shape
    b = bias.float() if bias is not None else None
    step = max(1, WIDEN_BLOCK_BYTES // (4 * n_in))
    if step >= n_out:
        return _gemm(x, weight.float(), b)
    x2 = x.reshape(-1, n_in)
    y = torch.empty(x2.shape[0], n_out)
    for o in range(0, n_out, step):
        y[:, o : o + step] = _gemm(
            x2, weight[o : o + step].float(), b[o : o + step] if b is not None else None
        )
    return y.view(*x.shape[:-1], n_out)


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x float32 (..., in) @ float32 weight (out, in).T + bias: oneDNN or BLAS (``fp32_gemm_path``)."""
    many_rows = x.numel() > SMALL_BATCH * x.shape[-1]
    if many_rows and x.dtype == weight.dtype == torch.float32 and fp32_gemm_path() == "onednn":
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The weight as stored (no packed copy: the same memory as BLAS); oneDNN gives a row the same
    # bits whatever the batch and the thread count (tests/test_kernels.py).
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def quantize_rows_dynamic(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 float32 (M, K) -> (int8 (M, K), float32 scale (M, 1)): symmetric, one scale per row."""
    if is_enabled():
        xq = torch.empty(x2.shape, dtype=torch.int8)
        xs = torch.empty(x2.shape[0], 1)
        _kernel("quantize_rows_i8")(x2.contiguous().numpy(), xq.numpy(), xs.view(-1).numpy())
        return xq, xs
    scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (M, 1)
    return torch.round(x2 / scale).to(torch.int8), scale


def int8_gemm(
    x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Prefill/scoring: x quantised to int8 per row, int8 x int8 -> int32 GEMM, rescaled.

    x2 float32 (M, K), qweight int8 (N, K), scale (N,) -> float32 (M, N). The int32 sums
    are exact; the error is x's rounding to 8 bits per row (as CTranslate2's int8). numba
    fuses the quantisation and the rescaling into one pass each (in torch they cost as much
    as the GEMM: ten passes over the output).
    """
    if int8_gemm_path() == "numba":  # the GEMV kernel over all M rows: the same sums
        return _gemv_int8(x2, qweight, scale, bias)
    xq, xs = quantize_rows_dynamic(x2)
    return _int8_rescale(torch._int_mm(xq, qweight.t()), xs, scale, bias)  # (M, N) int32 -> float32


class Int8Layer(Protocol):
    """What ``int8_mlp`` reads of a layer (quantize.QLinear)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None


def int8_mlp(x: torch.Tensor, fc: Any, proj: Any, activation: str) -> torch.Tensor | None:
    """An MLP of two int8 layers for many rows in three passes around two int8 GEMMs, or None
    where that path does not apply (then the caller runs the layers one by one).

    x float32 (..., C) -> float32 (..., C): quantise x per row, GEMM, one numba pass for bias,
    activation and the hidden rows' quantisation (the float32 hidden matrix is never written),
    GEMM, rescale with the bias. Same arithmetic as ``linear_int8`` twice, minus two passes and
    torch's GELU over the (rows, 4C) hidden matrix: in int8 scoring those took a fifth of the time.
    """
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or x.dtype != torch.float32 or rows <= SMALL_BATCH or x.requires_grad:
        return None
    if torch.compiler.is_compiling():  # numba is no graph op: the layers' own paths, one by one
        return None
    if not (hasattr(fc, "qweight") and hasattr(proj, "qweight") and is_enabled()):
        return None
    if int8_gemm_path() != "int-mm":
        return None  # the numba path: ``linear_int8`` per layer (its kernel rounds x itself)
    fc, proj = cast(Int8Layer, fc), cast(Int8Layer, proj)
    act = _nk.ACTIVATIONS.get(activation)
    if act is None:
        return None
    xq, xs = quantize_rows_dynamic(x.reshape(rows, x.shape[-1]))
    acc = torch._int_mm(xq, fc.qweight.t())  # (rows, 4C) int32
    hq, hs = torch.empty(acc.shape, dtype=torch.int8), torch.empty(rows)
    b = _bias(fc.bias, acc.shape[1])
    _kernel("activate_quantize")(
        acc.numpy(), xs.view(-1).numpy(), fc.scale.numpy(), b.numpy(), act, hq.numpy(), hs.numpy()
    )
    out = _int8_rescale(torch._int_mm(hq, proj.qweight.t()), hs, proj.scale, proj.bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def _int8_rescale(
    acc: torch.Tensor, xs: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """int32 sums (M, N), row scales xs (M,) or (M, 1), weight scales (N,) -> float32 + bias."""
    b = _bias(bias, acc.shape[1])
    if is_enabled():
        out = torch.empty(acc.shape)
        _kernel("dequantize_acc")(acc.numpy(), xs.view(-1).numpy(), scale.numpy(), b.numpy(), out.numpy())
        return out
    return acc.float().mul_(xs.view(-1, 1)).mul_(scale).add_(b)  # the order numba's epilogue keeps


# --- custom ops: the numba kernels inside torch.compile graphs -----------------------------------


@custom_op("gpt2cli::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _gemv(x, weight, bias)


@_gemv_op.register_fake
def _gemv_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@custom_op("gpt2cli::gemv_int8", mutates_args=())
def _gemv_int8_op(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _gemv_int8(x, qweight, scale, bias)


@_gemv_int8_op.register_fake
def _gemv_int8_fake(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)
