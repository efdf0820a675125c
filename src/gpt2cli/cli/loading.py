"""Loading a model for a command: resolve it (download progress, Hub notes), then load it with a
status line on a terminal's stderr, so 10-20 s of loading or compiling is not a blank screen."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from gpt2cli.cli.output import is_terminal, stderr_console, warn

if TYPE_CHECKING:
    from gpt2cli.api import LM


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    allow_pickle: bool = False,
    quantize: str | None = None,
    compile: bool = False,
) -> LM:
    """``api.load`` as the commands use it: notes on stderr, a status line while loading.

    Raises:
        Gpt2Error: any of its kinds.
    """
    from gpt2cli.api import load_resolved
    from gpt2cli.hub import resolve

    resolved = resolve(spec, offline=offline, allow_pickle=allow_pickle, progress=True, warn=warn)
    note_kernels_in_memory(device)
    with status(f"loading {resolved.name}"):
        return load_resolved(
            resolved,
            device=device,
            dtype=dtype,
            allow_pickle=allow_pickle,
            quantize=quantize,
            compile=compile,
        )


def note_kernels_in_memory(device: str) -> None:
    """Say so where this run compiles its CPU kernels in memory: a minute or more of every start."""
    from gpt2cli import kernels
    from gpt2cli.device import pick_device

    if pick_device(device).type == "cpu" and kernels.compiles_in_memory():
        warn(
            "no writable cache directory for the compiled CPU kernels (NUMBA_CACHE_DIR, "
            "$XDG_CACHE_HOME or ~/.cache): compiling them in memory, a minute or more at every "
            "start; set NUMBA_CACHE_DIR to a writable directory to keep them"
        )


def status(text: str) -> AbstractContextManager[Any]:
    """A spinner with ``text`` on stderr when it is a terminal; nothing otherwise."""
    if not is_terminal(sys.stderr):
        return nullcontext()
    return stderr_console().status(text)
