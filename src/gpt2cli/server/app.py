"""The FastAPI application: OpenAI's /v1/models, /v1/completions and /v1/chat/completions,
vLLM/llama.cpp's /tokenize and /detokenize, /health and Prometheus' /metrics.

Handlers only translate: request -> ``Job``s for the scheduler -> OpenAI-shaped responses
(JSON, or server-sent events ending with ``data: [DONE]``) built by ``answer.Answer``.
Cross-cutting rules (API key, body size limit, one log line per request) are the
middlewares of ``middleware.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gpt2cli.api import LM
from gpt2cli.chat import pick_template
from gpt2cli.config import GenerationConfig
from gpt2cli.errors import Gpt2Error
from gpt2cli.hub import ALIASES
from gpt2cli.server.answer import Answer, Plan
from gpt2cli.server.batch import Done, Event, Failed, Job
from gpt2cli.server.metrics import CONTENT_TYPE, Gauges, Metrics
from gpt2cli.server.middleware import CLIENT_CLOSED, AuthMiddleware, BodyLimitMiddleware, LogMiddleware
from gpt2cli.server.protocol import (
    API_NAMES,
    ApiError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_json,
    validation_error,
)
from gpt2cli.server.scheduler import QueueFull, Scheduler, ShuttingDown

Log = Callable[[str], None]
ModelT = TypeVar("ModelT", bound=BaseModel)
MAX_BODY_BYTES = 4 * 1024 * 1024
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks its client
DEFAULT_MAX_TOKENS = 256  # a chat request without max_tokens (`llm chat` sends none)
DEFAULT_CACHE_TOKENS = 4096  # prompt-cache budget: 4 full windows


@dataclass(frozen=True)
class ModelNames:
    """The names a request may give in ``model``; ``listed`` (by /v1/models) first."""

    listed: list[str]
    accepted: frozenset[str]


def model_names(lm: LM, served: Sequence[str] = ()) -> ModelNames:
    """``served`` (``--served-model-name``) or the model's own id, plus its other spellings.

    The own id is a local directory's name, or the spec as given with, for an alias, the
    repository it stands for. Also accepted: the spec as typed (a path, say), the repository
    id, and the alias of a repository that has one (lm-eval's tiktoken backend needs "gpt2").
    """
    spec = lm.resolved.spec
    if spec.local_dir is not None:
        own = [spec.local_dir.name]
        others = [spec.text, str(spec.local_dir)]
    else:
        own = [spec.text] + ([spec.repo_id] if spec.alias and spec.repo_id else [])
        others = [spec.repo_id or spec.text] + [a for a, repo in ALIASES.items() if repo == spec.repo_id]
    listed = list(dict.fromkeys(served or own))
    return ModelNames(listed, frozenset([*listed, *own, *others]))


@dataclass
class ServerState:
    lm: LM
    scheduler: Scheduler
    names: ModelNames
    metrics: Metrics
    log: Log
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    created: int = 0
    _token_texts: dict[int, str] = field(default_factory=dict)

    def token_text(self, token: int) -> str:
        """A token's text as shown in logprobs (cached: the same few thousand tokens recur)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.lm.tokenizer.decode([token])
        return text

    def gauges(self) -> Gauges:
        s, pool = self.scheduler.stats(), self.scheduler.pool.stats()
        return Gauges(
            waiting=s.waiting,
            running=s.running,
            active_rows=s.active_rows,
            active_rows_max=s.max_rows,
            steps=s.steps,
            batched_steps=s.batched_steps,
            cache_tokens=pool.tokens,
            cache_entries=pool.entries,
            cache_lookups=pool.lookups,
            cache_hits=pool.hits,
            cache_hit_tokens=pool.hit_tokens,
        )


def create_app(
    lm: LM,
    *,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 8,
    max_body: int = MAX_BODY_BYTES,
    cache_tokens: int = DEFAULT_CACHE_TOKENS,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    served_model_names: Sequence[str] = (),
    log: Log = lambda line: None,
) -> FastAPI:
    """The app serving ``lm``; its engine thread starts and stops with the app's lifespan."""
    metrics = Metrics()
    scheduler = Scheduler(
        lm, max_queue=max_queue, max_batch=max_batch, cache_tokens=cache_tokens, metrics=metrics, log=log
    )
    names = model_names(lm, served_model_names)
    state = ServerState(lm, scheduler, names, metrics, log, default_max_tokens, int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="gpt2cli", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gpt2 = state
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(AuthMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_body=max_body)
    app.add_middleware(LogMiddleware, log=log, metrics=metrics)
    return app


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
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(exc.headers or {})  # 405 carries Allow
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code, headers=headers))

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
            except ClientDisconnect:
                return Response(status_code=CLIENT_CLOSED)  # gone while sending its body
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
    lm = state.lm

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.names.listed[0], **vars(state.scheduler.stats())}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.gauges()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_obj(state, name) for name in state.names.listed]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return _model_obj(state, _check_model(state, model_id))

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

    @app.post("/tokenize")
    @guard
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await _parse(request, TokenizeRequest)
        if body.model is not None:
            _check_model(state, body.model)
        if body.messages is not None:
            text = _render_chat(lm, body.messages)
        elif body.prompt is not None or body.content is not None:
            text = body.prompt if body.prompt is not None else body.content or ""
        else:
            raise ApiError(400, "missing required field 'prompt'", param="prompt", code="missing_field")
        ids = lm.encode(text)
        tokens: list[Any] = list(ids)
        if body.with_pieces:
            tokens = [{"id": t, "piece": state.token_text(t)} for t in ids]
        return {"tokens": tokens, "count": len(ids), "max_model_len": lm.window}

    @app.post("/detokenize")
    @guard
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await _parse(request, DetokenizeRequest)
        if body.model is not None:
            _check_model(state, body.model)
        _check_ids(lm, body.tokens, "tokens")
        text = lm.tokenizer.decode(body.tokens)
        return {"prompt": text, "content": text}  # vLLM's key and llama.cpp's


def _model_obj(state: ServerState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "gpt2cli"}


async def _parse(request: Request, model: type[ModelT]) -> ModelT:
    """The body as JSON (whatever the content type says), validated against ``model``."""
    obj = parse_json(await request.body())
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None


# --- planning: request -> jobs ------------------------------------------------------------------


def _check_model(state: ServerState, name: str) -> str:
    if name not in state.names.accepted:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {', '.join(state.names.listed)}",
            param="model",
            code="model_not_found",
        )
    return name


def _check_ids(lm: LM, ids: list[int], param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < lm.tokenizer.n_vocab), None)
    if bad is not None:
        raise ApiError(
            400, f"token id {bad} is not in the vocabulary (size {lm.tokenizer.n_vocab})", param=param
        )


def _prompt_ids(lm: LM, prompt: Any) -> list[list[int]]:
    """OpenAI's four prompt forms -> token id lists (nothing prefixed).

    An empty prompt, as text or as token ids, means ``<|endoftext|>`` (unconditional generation).
    """
    if isinstance(prompt, str) or not prompt or all(isinstance(p, int) for p in prompt):
        items: list[Any] = [prompt]
    else:
        items = list(prompt)
    out = []
    for item in items:
        ids = lm.encode(item) if isinstance(item, str) else list(item)
        _check_ids(lm, ids, "prompt")
        out.append(ids or [lm.tokenizer.eot_id])
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


def _check_queue(state: ServerState, prompts: list[list[int]]) -> None:
    """A request with more prompts than the queue holds could never be queued: 400, not 503."""
    limit = state.scheduler.max_queue
    if len(prompts) > limit:
        raise ApiError(
            400,
            f"the request has {len(prompts)} prompts; this server takes at most {limit} per request "
            "(--max-queue): send them in smaller requests",
            param="prompt",
            code="too_many_prompts",
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
        cfg.validate(API_NAMES)  # the CLI's rules (-1 becomes a random seed); the models checked each range
    return cfg


def _completion_plan(state: ServerState, body: CompletionRequest) -> Plan:
    lm = state.lm
    model = _check_model(state, body.model)
    prompts = _prompt_ids(lm, body.prompt)
    _check_queue(state, prompts)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens")
    _check_window(lm, prompts, max_tokens)
    cfg = _generation_config(body, max_tokens, body.stops())
    texts = [lm.tokenizer.decode(p) for p in prompts] if body.echo else []
    return Plan(
        "text_completion",
        model,
        prompts,
        cfg,
        body.stream,
        body.logprobs,
        body.echo,
        texts,
        include_usage=body.include_usage,
    )


def _render_chat(lm: LM, messages: list[ChatMessage]) -> str:
    template = pick_template(lm.name)
    return template.render([{"role": m.template_role, "content": m.text(i)} for i, m in enumerate(messages)])


def _chat_plan(state: ServerState, body: ChatRequest) -> Plan:
    lm = state.lm
    model = _check_model(state, body.model)
    if body.logprobs or body.top_logprobs:
        raise ApiError(400, "logprobs are supported on /v1/completions only", param="logprobs")
    prompt = lm.encode(_render_chat(lm, body.messages))
    limit = body.max_completion_tokens or body.max_tokens
    if limit == 0:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    room = lm.window - len(prompt)
    max_tokens = limit if limit is not None else max(1, min(state.default_max_tokens, room))
    _check_window(lm, [prompt], max_tokens)
    cfg = _generation_config(body, max_tokens, pick_template(lm.name).stop + body.stops())
    return Plan("chat.completion", model, [prompt], cfg, body.stream, include_usage=body.include_usage)


# --- running: jobs -> responses -----------------------------------------------------------------


def _failure(ev: Failed) -> ApiError:
    status = 503 if ev.code == "shutting_down" else 500
    return ApiError(status, ev.message, type="server_error", code=ev.code)


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
    prompt_chars = [0] * len(plan.prompts)
    if plan.logprobs is not None:
        prompt_chars = [len(state.lm.tokenizer.decode(p)) for p in plan.prompts]
    answer = Answer(plan, state.lm.tokenizer, prompt_chars)
    if plan.stream:
        return StreamingResponse(
            _sse(state, jobs, events, answer),
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
    request: Request, jobs: list[Job], events: asyncio.Queue[tuple[int, Event]], answer: Answer
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
            raise _failure(ev)
        answer.add(i, ev)
        if isinstance(ev, Done):
            jobs[i].done = True
            pending -= 1
    return True


async def _sse(
    state: ServerState, jobs: list[Job], events: asyncio.Queue[tuple[int, Event]], answer: Answer
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece, the finish reasons (or an error), then ``[DONE]``."""
    try:
        for chunk in answer.opening_chunks():
            yield _data(chunk)
        pending = len(jobs)
        while pending:
            i, ev = await events.get()
            if isinstance(ev, Failed):
                yield _data(_failure(ev).body())
                break
            for chunk in answer.add(i, ev):
                yield _data(chunk)
            if isinstance(ev, Done):
                jobs[i].done = True
                pending -= 1
        if not pending and answer.plan.include_usage:
            yield _data(answer.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        state.scheduler.cancel([j for j in jobs if not j.done])


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
