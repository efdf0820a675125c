"""Running the app under uvicorn, and stopping it: SIGTERM or Ctrl-C is the normal end (exit 0).

On the signal the server stops accepting, the engine ends every running generation at its next
step (a stream gets an error event with code ``shutting_down``, then ``data: [DONE]``; a
non-streamed request gets 503 ``shutting_down``, as do waiting ones), and the process returns
normally. HTTP runs on ``http.protocol_class``: uvicorn's h11 protocol with header, body and
write deadlines.
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
from gpt2cli.server.http import Timeouts, protocol_class

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
    timeouts: Timeouts | None = None,
    log: Log = lambda line: None,
    **app_options: Any,
) -> uvicorn.Server:
    """A uvicorn server for ``lm``; ``server.run()`` blocks until it is told to stop.

    ``app_options`` are ``create_app``'s (api_key, max_queue, max_batch, cache_tokens, ...).
    """
    timeouts = timeouts or Timeouts()
    app = create_app(lm, log=log, **app_options)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(timeouts, log),
        log_level="warning",
        access_log=False,  # our own middleware logs one line per request
        lifespan="on",
        timeout_keep_alive=timeouts.keep_alive,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=10,
    )
    scheduler: Any = app.state.gpt2.scheduler
    return _Server(config, on_exit=scheduler.begin_close)


def serve(lm: LM, **options: Any) -> None:
    """Serve until SIGTERM or Ctrl-C, then return (options as in ``make_server``)."""
    make_server(lm, **options).run()
