"""Running `gpt2 serve`'s app in a thread on a free 127.0.0.1 port, for tests."""

from __future__ import annotations

import threading
import time
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
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
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

    def stop(self) -> None:
        self.scheduler.begin_close()
        self.server.should_exit = True
        self.thread.join(30)
