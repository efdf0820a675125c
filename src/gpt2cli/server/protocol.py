"""The OpenAI wire format: request models (strictly typed, every value range-checked) and errors.

Fields we do not know are ignored, as OpenAI-compatible servers do; fields we know are checked
for type (strict: no "5" for 5) and range here, at the edge, so a value that could fail inside
the engine (a seed past 64 bits, a temperature so small that logits overflow, a penalty that
divides by almost zero, NaN) is a 400 naming its field. The ranges are those of
``GenerationConfig.validate`` (the CLI's), which the app still calls. Every failure becomes an
``ApiError`` that the app renders as ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpt2cli.config import (
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    RANDOM_SEED,
    SEED_MAX,
)

MAX_LOGPROBS = 20
MAX_N = 16
MAX_STOPS = 16
MAX_JSON_DEPTH = 64  # the deepest a request body may nest (OpenAI's deepest field is ~5)
# How GenerationConfig.validate should name the fields, were one to get past the models here.
API_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n"}


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


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, at most ``MAX_JSON_DEPTH`` levels deep.

    Raises:
        ApiError: not JSON, not an object, or nested too deeply (the field is named).
    """
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise _too_deep(None) from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    for key, value in obj.items():
        if _deeper_than(value, MAX_JSON_DEPTH - 1):
            raise _too_deep(str(key))
    return obj


def _too_deep(param: str | None) -> ApiError:
    where = f"{param} nests" if param else "the request body nests"
    return ApiError(400, f"{where} deeper than {MAX_JSON_DEPTH} levels", param=param, code="invalid_value")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` has containers nested more than ``limit`` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _allows_none(annotation: Any) -> bool:
    return annotation is None or type(None) in get_args(annotation)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI's API marks these options nullable: an explicit null (as clients that write
        every option send it) means the default, not a type error."""
        if not isinstance(data, dict):
            return data
        takes_none = {name for name, f in cls.model_fields.items() if _allows_none(f.annotation)}
        return {
            k: v for k, v in data.items() if v is not None or k in takes_none or k not in cls.model_fields
        }

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=RANDOM_SEED, le=SEED_MAX)  # -1: a random one
    # OpenAI's additive penalties: accepted at 0 (clients send their defaults), else refused.
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    # Our extra sampling controls, as in `gpt2 generate`.
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(
        default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _unsupported_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("is not supported (only 0); use repetition_penalty")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

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


class ChatMessage(_Strict):
    """One message; ``content`` is a string or a list of text parts (what the openai client sends)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None

    def text(self, index: int) -> str:
        """The content as one string (``developer`` is OpenAI's new name for ``system``).

        Raises:
            ApiError: content that is neither a string nor a list of text parts.
        """
        param = f"messages.{index}.content"
        content = self.content
        if content is None and self.role == "assistant":
            return ""  # an assistant turn that only called tools
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ApiError(400, f"{param} must be a string or a list of text parts", param=param)
        texts = []
        for j, part in enumerate(content):
            is_text = isinstance(part, dict) and part.get("type") == "text"
            if not is_text or not isinstance(part.get("text"), str):
                raise ApiError(
                    400,
                    f"{param}.{j} must be a text part {{'type': 'text', 'text': ...}}; "
                    "this model reads text only",
                    param=f"{param}.{j}",
                )
            texts.append(part["text"])
        return "".join(texts)

    @property
    def template_role(self) -> Literal["system", "user", "assistant"]:
        return "system" if self.role == "developer" else self.role


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Strict):
    """POST /tokenize: vLLM's shape (``prompt`` or ``messages``) or llama.cpp's (``content``)."""

    model: str | None = None
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = None
    with_pieces: bool = False  # llama.cpp: each token as {"id", "piece"}


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's and llama.cpp's shape)."""

    model: str | None = None
    tokens: list[int]


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
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")
