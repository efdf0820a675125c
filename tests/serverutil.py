"""Running `gpt2 serve`'s app in a thread on a free 127.0.0.1 port, for tests; and a gate that
holds its engine thread between steps, so a test can line up requests without racing it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx


class ServerThread:
    """A uvicorn server for ``lm`` on 127.0.0.1 (port chosen by the OS), with its log lines kept."""

    def __init__(self, lm: Any, **options: Any) -> None:
        from gpt2cli.server.run import make_server

        self.lines: list[str] = []
        self.server = make_server(lm, host="127.0.0.1", port=0, log=self.lines.append, **options)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive())
        if not self.thread.is_alive():
            raise RuntimeError("the test server did not start")
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scheduler(self) -> Any:
        return self.server.config.app.state.gpt2.scheduler

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health").json()

    def queued(self) -> int:
        """Prompts the server holds: waiting, or admitted to the (possibly held) engine."""
        health = self.health()
        return health["waiting"] + health["running"]

    def metrics(self) -> dict[str, float]:
        """``GET /metrics`` parsed: sample name (with its labels) -> value."""
        text = httpx.get(self.url + "/metrics").text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    def stop(self) -> None:
        self.scheduler.begin_close()
        self.server.should_exit = True
        self.thread.join(30)


class EngineGate:
    """Holds the engine thread before its next step while closed (a test hook on one scheduler).

    ``close()`` then ``held.wait()``: the engine thread is parked between two steps, requests
    queue up behind it; ``open()`` lets it go on.
    """

    def __init__(self, scheduler: Any) -> None:
        self._open = threading.Event()
        self._open.set()
        self.held = threading.Event()
        step = scheduler._step

        def gated_step() -> None:
            if not self._open.is_set():
                self.held.set()
                self._open.wait()
                self.held.clear()
            step()

        scheduler._step = gated_step

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()


class Background(threading.Thread):
    """Runs ``fn`` in a thread at once; ``result()`` joins it and returns (or raises) its outcome."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self.error = exc

    def result(self, timeout: float = 300) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "timed out"
        if self.error is not None:
            raise self.error
        return self.value


def together(srv: ServerThread, gate: EngineGate, fns: list[Callable[[], Any]]) -> list[Any]:
    """Call ``fns`` (one request each) at once, the engine held until every request is queued,
    so they start in one batch; their results, in order."""
    gate.close()
    try:
        calls = [Background(fn) for fn in fns]
        wait_for(lambda: srv.queued() == len(fns))
    finally:
        gate.open()
    return [call.result() for call in calls]


def free_port() -> int:
    """A 127.0.0.1 port free now (for a server started in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Any, timeout: float = 120) -> None:
    """Poll ``predicate`` until true; the timeout only stops a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
