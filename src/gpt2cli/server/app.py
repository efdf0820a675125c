"""The FastAPI application: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, /health.

Handlers only translate: request -> ``Job``s for the scheduler -> OpenAI-shaped responses
(JSON, or server-sent events ending with ``data: [DONE]``). Cross-cutting rules (API key, body
size limit, one log line per request) are small ASGI middlewares.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2cli.api import LM
from gpt2cli.chat import pick_template
from gpt2cli.config import GenerationConfig
from gpt2cli.errors import Gpt2Error
from gpt2cli.logprobs import TokenLogprob
from gpt2cli.server.batch import Done, Event, Failed, Job, Piece
from gpt2cli.server.protocol import ApiError, ChatRequest, CompletionRequest, validation_error
from gpt2cli.server.scheduler import QueueFull, Scheduler, ShuttingDown
from gpt2cli.text import ReplyTrimmer

Log = Callable[[str], None]
RequestT = TypeVar("RequestT", CompletionRequest, ChatRequest)
MAX_BODY_BYTES = 4 * 1024 * 1024
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks its client
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer


@dataclass
class ServerState:
    lm: LM
    scheduler: Scheduler
    model_ids: list[str]
    log: Log
    created: int = field(default_factory=lambda: int(time.time()))
    _token_texts: dict[int, str] = field(default_factory=dict)

    def token_text(self, token: int) -> str:
        """A token's text as shown in logprobs (cached: the same few thousand tokens recur)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.lm.tokenizer.decode([token])
        return text


def create_app(
    lm: LM,
    *,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 8,
    max_body: int = MAX_BODY_BYTES,
    log: Log = lambda line: None,
) -> FastAPI:
    """The app serving ``lm``; its engine thread starts and stops with the app's lifespan."""
    scheduler = Scheduler(lm, max_queue=max_queue, max_batch=max_batch, log=log)
    state = ServerState(lm, scheduler, served_ids(lm), log)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="gpt2cli", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gpt2 = state
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(_AuthMiddleware, api_key=api_key)
    app.add_middleware(_BodyLimitMiddleware, max_body=max_body)
    app.add_middleware(_LogMiddleware, log=log)
    return app


def served_ids(lm: LM) -> list[str]:
    """The model's id as the user named it, plus the repository an alias stands for."""
    spec = lm.resolved.spec
    ids = [spec.text]
    if spec.alias and spec.repo_id and spec.repo_id not in ids:
        ids.append(spec.repo_id)
    return ids


# --- errors -------------------------------------------------------------------------------------


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return _error_response(exc)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _error_response(validation_error(list(exc.errors())))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _guard(state: ServerState) -> Callable[..., Any]:
    """Turn our library errors into 400 and anything unexpected into a 500 without a traceback."""

    def wrap(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(handler)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return await handler(*args, **kwargs)
            except (ApiError, asyncio.CancelledError):
                raise
            except Gpt2Error as exc:
                raise ApiError(400, exc.message) from exc
            except Exception as exc:  # noqa: BLE001 - logged here, never shown to the client
                state.log(f"internal error: {type(exc).__name__}: {exc}")
                raise ApiError(500, "internal server error", type="server_error") from exc

        return guarded

    return wrap


# --- routes -------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, state: ServerState) -> None:
    guard = _guard(state)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_ids[0], **vars(state.scheduler.stats())}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {"id": i, "object": "model", "created": state.created, "owned_by": "gpt2cli"}
            for i in state.model_ids
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", response_model=None)
    @guard
    async def completions(request: Request) -> Any:
        body = await _parse(request, CompletionRequest)
        return await _respond(state, request, _completion_plan(state, body))

    @app.post("/v1/chat/completions", response_model=None)
    @guard
    async def chat(request: Request) -> Any:
        body = await _parse(request, ChatRequest)
        return await _respond(state, request, _chat_plan(state, body))


async def _parse(request: Request, model: type[RequestT]) -> RequestT:
    """The body as JSON (whatever the content type says), validated against ``model``."""
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None


# --- planning: request -> jobs ------------------------------------------------------------------


@dataclass
class Plan:
    """What one request asks of the engine, and how to answer it."""

    kind: str  # "text_completion" or "chat.completion"
    model: str
    prompts: list[list[int]]
    cfg: GenerationConfig
    stream: bool
    logprobs: int | None = None
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _check_model(state: ServerState, name: str) -> str:
    if name not in state.model_ids:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {', '.join(state.model_ids)}",
            param="model",
            code="model_not_found",
        )
    return name


def _prompt_ids(lm: LM, prompt: Any) -> list[list[int]]:
    """OpenAI's four prompt forms -> token id lists (nothing prefixed; "" means <|endoftext|>)."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    out = []
    for item in items:
        ids = (lm.encode(item) or [lm.tokenizer.eot_id]) if isinstance(item, str) else list(item)
        if not ids:
            raise ApiError(400, "a token-id prompt must not be empty", param="prompt")
        bad = next((t for t in ids if not 0 <= t < lm.tokenizer.n_vocab), None)
        if bad is not None:
            raise ApiError(
                400, f"token id {bad} is not in the vocabulary (size {lm.tokenizer.n_vocab})", param="prompt"
            )
        out.append(ids)
    return out


def _check_window(lm: LM, prompts: list[list[int]], max_tokens: int) -> None:
    for ids in prompts:
        if len(ids) > lm.window:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens, longer than the model's {lm.window}-token context window",
                param="prompt",
                code="context_length_exceeded",
            )
        if len(ids) + max_tokens > lm.window:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                f"{lm.window}-token context window",
                param="max_tokens",
                code="context_length_exceeded",
            )


def _generation_config(
    body: CompletionRequest | ChatRequest, max_tokens: int, stops: tuple[str, ...]
) -> GenerationConfig:
    cfg = GenerationConfig(
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_k=body.top_k or 0,
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=stops,
        num_samples=body.n,
    )
    if max_tokens > 0:
        cfg.validate()
    return cfg


def _completion_plan(state: ServerState, body: CompletionRequest) -> Plan:
    lm = state.lm
    model = _check_model(state, body.model)
    prompts = _prompt_ids(lm, body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens")
    _check_window(lm, prompts, max_tokens)
    cfg = _generation_config(body, max_tokens, body.stops())
    texts = [lm.tokenizer.decode(p) for p in prompts] if body.echo else []
    return Plan("text_completion", model, prompts, cfg, body.stream, body.logprobs, body.echo, texts)


def _chat_plan(state: ServerState, body: ChatRequest) -> Plan:
    lm = state.lm
    model = _check_model(state, body.model)
    if body.logprobs or body.top_logprobs:
        raise ApiError(400, "logprobs are supported on /v1/completions only", param="logprobs")
    template = pick_template(lm.name)
    text = template.render([{"role": m.role, "content": m.content} for m in body.messages])
    prompt = lm.encode(text)
    limit = body.max_completion_tokens or body.max_tokens
    if limit == 0:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    max_tokens = limit if limit is not None else max(1, lm.window - len(prompt))
    _check_window(lm, [prompt], max_tokens)
    cfg = _generation_config(body, max_tokens, template.stop + body.stops())
    return Plan("chat.completion", model, [prompt], cfg, body.stream)


# --- running: jobs -> responses -----------------------------------------------------------------


async def _respond(state: ServerState, request: Request, plan: Plan) -> Any:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def emitter(i: int) -> Callable[[Event], None]:
        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (i, ev))

        return emit

    jobs = [
        Job(ids, plan.cfg, emitter(i), plan.logprobs, plan.echo, state.lm.tokenizer.eot_id)
        for i, ids in enumerate(plan.prompts)
    ]
    try:
        state.scheduler.submit(jobs)
    except QueueFull:
        raise ApiError(
            503,
            "the server is busy: its queue is full, retry shortly",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except ShuttingDown:
        raise ApiError(
            503, "the server is shutting down", type="server_error", code="shutting_down"
        ) from None
    answer = _Answer(state, plan)
    if plan.stream:
        return StreamingResponse(
            _sse(state, plan, jobs, events, answer),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        finished = await _collect(request, jobs, events, answer)
    finally:
        state.scheduler.cancel([j for j in jobs if not j.done])
    if not finished:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the log line shows 499
    return answer.final()


async def _collect(
    request: Request, jobs: list[Job], events: asyncio.Queue[tuple[int, Event]], answer: _Answer
) -> bool:
    """Wait for every job; False if the client disconnected first (the caller cancels)."""
    clock = asyncio.get_running_loop().time
    next_check = clock() + DISCONNECT_POLL_S
    pending = len(jobs)
    while pending:
        try:
            i, ev = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            ev = None
        if clock() >= next_check:  # by the clock: events may keep coming without a pause
            if await request.is_disconnected():
                return False
            next_check = clock() + DISCONNECT_POLL_S
        if ev is None:
            continue
        if isinstance(ev, Failed):
            raise ApiError(503 if "shutting down" in ev.message else 500, ev.message, type="server_error")
        answer.add(i, ev)
        if isinstance(ev, Done):
            jobs[i].done = True
            pending -= 1
    return True


async def _sse(
    state: ServerState, plan: Plan, jobs: list[Job], events: asyncio.Queue[tuple[int, Event]], answer: _Answer
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece, the finish reasons, then ``[DONE]``."""
    try:
        for chunk in answer.opening_chunks():
            yield _data(chunk)
        pending = len(jobs)
        while pending:
            i, ev = await events.get()
            if isinstance(ev, Failed):
                yield _data(ApiError(500, ev.message, type="server_error").body())
                break
            for chunk in answer.add(i, ev):
                yield _data(chunk)
            if isinstance(ev, Done):
                jobs[i].done = True
                pending -= 1
        yield "data: [DONE]\n\n"
    finally:
        state.scheduler.cancel([j for j in jobs if not j.done])


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Answer:
    """Accumulates events into OpenAI choices; gives stream chunks and the final body."""

    def __init__(self, state: ServerState, plan: Plan) -> None:
        self.state, self.plan = state, plan
        n = plan.cfg.num_samples
        self.n = n
        count = len(plan.prompts) * n
        self.texts = [""] * count
        self.finish: list[str | None] = [None] * count
        self.tokens = [0] * count
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(count)]
        self.prompt_lps: list[list[TokenLogprob] | None] = [None] * len(plan.prompts)
        self.chat = plan.kind == "chat.completion"
        self.cleaners = [ReplyTrimmer() for _ in range(count)] if self.chat else []
        # text_offset of the next streamed token: generated text follows the prompt's text.
        self.stream_offsets = [0] * count
        if plan.logprobs is not None and plan.stream:
            lengths = [len(state.lm.tokenizer.decode(p)) for p in plan.prompts]
            self.stream_offsets = [lengths[c // n] for c in range(count)]

    # one event -> stream chunks (also recorded for the final body)
    def add(self, i: int, ev: Event) -> list[dict[str, Any]]:
        if isinstance(ev, Piece):
            c = i * self.n + ev.sample
            self.texts[c] += ev.text
            self.logprobs[c].extend(ev.logprobs)
            text = self.cleaners[c].push(ev.text) if self.chat else ev.text
            if not text and not ev.logprobs:
                return []
            return [self._chunk(c, text, None, ev.logprobs)]
        assert isinstance(ev, Done)
        self.prompt_lps[i] = ev.prompt_logprobs
        chunks = []
        for s, sample in enumerate(ev.samples):
            c = i * self.n + s
            self.finish[c], self.tokens[c] = sample.finish_reason, sample.tokens
            chunks.append(self._chunk(c, "", sample.finish_reason, []))
        return chunks

    def opening_chunks(self) -> list[dict[str, Any]]:
        if self.chat:
            return [self._chunk(c, "", None, [], role=True) for c in range(len(self.texts))]
        if self.plan.echo:
            return [
                self._chunk(c, self.plan.prompt_texts[c // self.n], None, []) for c in range(len(self.texts))
            ]
        return []

    def _chunk(
        self, c: int, text: str, finish: str | None, lps: list[TokenLogprob], role: bool = False
    ) -> dict[str, Any]:
        plan = self.plan
        if self.chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            )
            choice: dict[str, Any] = {"index": c, "delta": delta, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": c, "text": text, "finish_reason": finish, "logprobs": None}
            if plan.logprobs is not None and lps:
                choice["logprobs"] = self._logprobs_obj(lps, self.stream_offsets[c])
                self.stream_offsets[c] += sum(len(t) for t in choice["logprobs"]["tokens"])
            obj = "text_completion"
        return {
            "id": self._id(),
            "object": obj,
            "created": plan.created,
            "model": plan.model,
            "choices": [choice],
        }

    def _id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.plan.id

    def _logprobs_obj(self, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        decode = self.state.token_text
        tokens, offsets = [], []
        for e in lps:
            tokens.append(decode(e.token))
            offsets.append(offset)
            offset += len(tokens[-1])
        top: list[dict[str, float] | None] = []
        for e in lps:
            if e.logprob is None:
                top.append(None)
                continue
            alts: dict[str, float] = {}
            for tok, lp in e.top:
                alts.setdefault(decode(tok), lp)
            top.append(alts)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in lps],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def final(self) -> dict[str, Any]:
        plan = self.plan
        choices = []
        for c, text in enumerate(self.texts):
            p = c // self.n
            if self.chat:
                message = {"role": "assistant", "content": text.strip()}
                choices.append(
                    {"index": c, "message": message, "finish_reason": self.finish[c], "logprobs": None}
                )
                continue
            prefix = plan.prompt_texts[p] if plan.echo else ""
            choice: dict[str, Any] = {
                "index": c,
                "text": prefix + text,
                "finish_reason": self.finish[c],
                "logprobs": None,
            }
            if plan.logprobs is not None:
                lps = (self.prompt_lps[p] or []) if plan.echo else []
                start = 0 if plan.echo else len(self.state.lm.tokenizer.decode(plan.prompts[p]))
                choice["logprobs"] = self._logprobs_obj(lps + self.logprobs[c], start)
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in plan.prompts)
        completion_tokens = sum(self.tokens)
        return {
            "id": self._id(),
            "object": plan.kind,
            "created": plan.created,
            "model": plan.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


# --- middlewares --------------------------------------------------------------------------------


async def _send_error(send: Send, exc: ApiError) -> None:
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _AuthMiddleware:
    """With an API key, every route but /health needs ``Authorization: Bearer KEY`` (else 401)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is None or scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        expected = f"Bearer {self.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return await _send_error(
                send,
                ApiError(
                    401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key"
                ),
            )
        return await self.app(scope, receive, send)


class _BodyLimitMiddleware:
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
            return await _send_error(send, too_large)
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
                return await _send_error(send, too_large)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


class _LogMiddleware:
    """One line per request on the server's log: client, method, path, status, milliseconds."""

    def __init__(self, app: ASGIApp, log: Log) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client") or ("-", 0)
            ms = (time.perf_counter() - t0) * 1000
            shown = status[0] or "disconnected"
            self.log(f'{client[0]} "{scope["method"]} {scope["path"]}" {shown} {ms:.0f}ms')
