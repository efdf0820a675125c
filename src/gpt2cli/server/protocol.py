"""The OpenAI wire format: request models (strictly typed) and the error shape.

Fields we do not know are ignored, as OpenAI-compatible servers do; fields we know are checked
for type (strict: no "5" for 5) and range, and every failure becomes an ``ApiError`` that the
app renders as ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20
MAX_N = 16
MAX_STOPS = 16


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    # Our extra sampling controls, as in `gpt2 generate`.
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise ApiError(400, "stop strings cannot be empty", param="stop")
        if len(stops) > MAX_STOPS:  # OpenAI allows 4; clients such as lm-eval may send a few more
            raise ApiError(400, f"at most {MAX_STOPS} stop sequences are allowed", param="stop")
        return tuple(stops)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


def validation_error(errors: list[Any]) -> ApiError:
    """FastAPI/pydantic validation errors -> one 400 naming the first bad field."""
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if kind == "missing":
        return ApiError(400, f"missing required field {param!r}", param=param, code="missing_field")
    if kind == "model_attributes_type":
        return ApiError(400, "the request body must be a JSON object", code="invalid_type")
    message = str(first.get("msg", "invalid value"))
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")
