"""The app's cross-cutting rules as small ASGI middlewares: API key, body limit, one log line.

``LogMiddleware`` also counts every answer in ``Metrics`` by status; an answer the client
left before it was complete (a stream it closed, a request it abandoned) is logged and
counted as 499, nginx's "client closed request", whatever status line had been sent.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2cli.server.metrics import Metrics
from gpt2cli.server.protocol import ApiError

Log = Callable[[str], None]
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer
OPEN_PATHS = ("/health",)  # answered without the API key


async def send_error(send: Send, exc: ApiError) -> None:
    """Answer ``exc`` directly from a middleware (no app below it runs)."""
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """With an API key, every route but /health needs ``Authorization: Bearer KEY`` (else 401).

    The scheme is case-insensitive (RFC 9110), so ``bearer KEY`` is accepted too.
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").strip()
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return await send_error(
                send,
                ApiError(
                    401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key"
                ),
            )
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body`` bytes with 413, by header or as they stream in."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(
            413, f"the request body is over the {self.max_body}-byte limit", code="body_too_large"
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await send_error(send, too_large)
        if length is not None:
            return await self.app(scope, receive, send)
        # No length given (chunked): read it all here, within the limit, then replay it.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await send_error(send, too_large)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


class LogMiddleware:
    """One line per request on the server's log: client, method, path, status, milliseconds."""

    def __init__(self, app: ASGIApp, log: Log, metrics: Metrics) -> None:
        self.app, self.log, self.metrics = app, log, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status, complete, left = [0], [False], [False]

        async def receive_watched() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not complete[0]:
                left[0] = True
            return message

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete[0] = not left[0]
            await send(message)

        crashed = False
        try:
            await self.app(scope, receive_watched, send_logged)
        except Exception:
            crashed = True  # uvicorn answers 500 if it still can
            raise
        finally:
            if complete[0] and status[0]:
                shown = status[0]
            else:
                shown = 500 if crashed and not left[0] else CLIENT_CLOSED
            client = scope.get("client") or ("-", 0)
            ms = (time.perf_counter() - t0) * 1000
            self.metrics.request(scope["path"], shown)
            self.log(f'{client[0]} "{scope["method"]} {scope["path"]}" {shown} {ms:.0f}ms')
