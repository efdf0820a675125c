"""The one place that knows about devices: picking one, its dtype, seeded generators, clocks."""

from __future__ import annotations

import resource
import sys

import torch

from gpt2cli import switches
from gpt2cli.errors import BadInputError, DeviceUnavailableError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a device that exists here.

    Raises:
        DeviceUnavailableError: the device is not present on this machine.
        BadInputError: the spec is not a device name.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise BadInputError(f"unknown device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("CUDA was requested but no CUDA GPU is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailableError(f"{spec} was requested but this machine has {count} CUDA device(s)")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise DeviceUnavailableError(
                "MPS was requested but is not available on this machine",
                hint="use --device auto or cpu; MPS needs Apple silicon, macOS 12.3+ and an MPS torch",
            )
        return device
    raise BadInputError(f"unsupported device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps")


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU, bfloat16 on CUDA when supported (else float16), float16 on MPS.

    Raises:
        BadInputError: unknown dtype name.
        DeviceUnavailableError: bfloat16 on a GPU without it.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if spec not in DTYPES:
        raise BadInputError(f"unknown dtype {spec!r}", hint="use auto, float32, float16 or bfloat16")
    dtype = DTYPES[spec]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailableError("this GPU does not support bfloat16", hint="use --dtype float16")
    return dtype


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (random seed when None)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that a clock read measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocator memory on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def configure_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (default: torch's own choice, or GPT2_THREADS)."""
    if threads is None:
        threads = switches.threads()
    if threads:
        torch.set_num_threads(threads)
