"""A signal handler set for the length of a ``with`` block, and the previous one put back after."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Handler = Callable[[int, Any], Any] | int | signal.Handlers | None


@contextmanager
def handled(signum: int, handler: Handler) -> Iterator[None]:
    """``handler`` (a function, ``signal.SIG_IGN`` ...) for ``signum`` inside the block.

    Only the main thread may set handlers (and only it receives signals), so elsewhere the
    block runs with the handlers as they are.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)
