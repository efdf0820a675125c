"""uvicorn's HTTP/1.1 protocol (h11) with the read and write deadlines it lacks.

uvicorn closes a keep-alive connection idle for ``--timeout-keep-alive`` seconds, but waits
forever for the headers of a request (a slow-header "slowloris" client holds a connection
open indefinitely), for a body shorter than its ``Content-Length``, and for a client that reads
nothing of its response. ``Timeouts`` adds, as nginx has them:

- ``header``: a request's headers must be complete within this many seconds of the
  connection (or of the first byte after a keep-alive pause); else 408 and close.
- ``body``: the body may pause this long between reads; else 408 and close.
- ``write``: with output waiting (the socket's send buffer, fixed at ``SEND_BUFFER`` rather
  than left to grow to the kernel's maximum of several MiB, and the transport's 64 KiB full),
  a client that reads nothing for this long is disconnected, which cancels its generation as
  any disconnect does. So a slow reader makes the server hold at most those buffers plus its
  own request's remaining tokens (bounded by ``max_tokens`` and ``n``), and only for this long.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

Log = Callable[[str], None]
SEND_BUFFER = 128 * 1024  # bytes per connection (Linux doubles it); a stream's chunks are small


@dataclass(frozen=True)
class Timeouts:
    """Seconds; see the module docstring."""

    keep_alive: float = 5.0
    header: float = 10.0
    body: float = 30.0
    write: float = 60.0


def _timeout_response(message: str) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": "request_timeout"}
    body = json.dumps({"error": error}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def protocol_class(timeouts: Timeouts, log: Log) -> type[H11Protocol]:
    """An ``H11Protocol`` subclass enforcing ``timeouts`` (uvicorn's ``http=`` setting)."""

    class TimedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None
        _read_kind: str | None = None
        _write_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            self._arm_read("header", timeouts.header)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_read()
            if self._write_timer is not None:
                self._write_timer.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            their = self.conn.their_state
            if their is h11.IDLE:  # headers still coming: one deadline for all of them
                if self._read_kind != "header":
                    self._arm_read("header", timeouts.header)
            elif their is h11.SEND_BODY:  # each read restarts the body's deadline
                self._arm_read("body", timeouts.body)
            else:
                self._cancel_read()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(timeouts.write, self._write_timeout)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _arm_read(self, kind: str, seconds: float) -> None:
            self._cancel_read()
            self._read_kind = kind
            self._read_timer = self.loop.call_later(seconds, self._read_timeout, kind, seconds)

        def _cancel_read(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer, self._read_kind = None, None

        def _read_timeout(self, kind: str, seconds: float) -> None:
            self._read_timer, self._read_kind = None, None
            if self.transport.is_closing():
                return
            what = "request headers" if kind == "header" else "request body"
            log(f"{self._peer()} dropped: the {what} did not arrive within {seconds:g} s")
            cycle = self.cycle if self.cycle is not None and not self.cycle.response_complete else None
            if cycle is not None:  # a body was being read: the app's receive() reports a disconnect
                cycle.disconnected = True
                cycle.message_event.set()
            if cycle is None or not cycle.response_started:
                self.transport.write(_timeout_response(f"the {what} did not arrive within {seconds:g} s"))
            self.transport.close()

        def _write_timeout(self) -> None:
            self._write_timer = None
            if not self.transport.is_closing():
                log(f"{self._peer()} dropped: it read nothing of its response for {timeouts.write:g} s")
                self.transport.abort()

        def _peer(self) -> str:
            return self.client[0] if self.client else "-"

    return TimedH11Protocol
