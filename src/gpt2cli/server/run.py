"""Running the app under uvicorn, and stopping it: SIGTERM or Ctrl-C is the normal end (exit 0).

On the signal the server stops accepting, the engine ends every running generation at its next
step (streams finish with ``finish_reason`` "length" and ``data: [DONE]``), waiting requests
get 503, and the process returns normally.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

from gpt2cli.api import LM
from gpt2cli.server.app import create_app

Log = Callable[[str], None]


class _Server(uvicorn.Server):
    """uvicorn's server, with signals that end the engine's work and never re-raise."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the captured signal after shutdown (exit 130 / killed by SIGTERM);
        # for a server stopping on request is the normal end, so we only handle it.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def make_server(
    lm: LM,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 8,
    log: Log = lambda line: None,
) -> uvicorn.Server:
    """A uvicorn server for ``lm``; ``server.run()`` blocks until it is told to stop."""
    app = create_app(lm, api_key=api_key, max_queue=max_queue, max_batch=max_batch, log=log)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,  # our own middleware logs one line per request
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    scheduler: Any = app.state.gpt2.scheduler
    return _Server(config, on_exit=scheduler.begin_close)


def serve(lm: LM, **options: Any) -> None:
    """Serve until SIGTERM or Ctrl-C, then return (options as in ``make_server``)."""
    make_server(lm, **options).run()
