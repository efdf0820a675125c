"""Configuration dataclasses: the model's architecture and a generation request's settings.

Stdlib only: the CLI validates options with these before torch is imported.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gpt2cli.errors import BadInputError, CorruptWeightsError, NotGPT2Error

# Activations GPT-2-architecture checkpoints use; "gelu_new" (the tanh approximation) is GPT-2's own.
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")


@dataclass(frozen=True)
class GPT2Config:
    """The architecture of a GPT-2 model, read from a Hugging Face ``config.json``."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> GPT2Config:
        """Build a config from a parsed ``config.json``; unknown keys are ignored.

        Raises:
            NotGPT2Error: the config names another ``model_type``.
            CorruptWeightsError: a value has the wrong type or is inconsistent.
        """
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise NotGPT2Error(f"{source} is a {model_type!r} model, not GPT-2 (model_type 'gpt2')")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        if "n_positions" not in values and isinstance(raw.get("n_ctx"), int):
            values["n_positions"] = raw["n_ctx"]
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        try:
            config = cls(**values)
        except TypeError as exc:
            raise CorruptWeightsError(f"{source}: {exc}") from exc
        config._check(source)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> GPT2Config:
        """Read ``config.json`` at ``path``.

        Raises:
            NotGPT2Error: missing file, or not a GPT-2 config.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise NotGPT2Error(f"{path.parent} has no config.json: not a model checkpoint") from exc
        except (OSError, ValueError) as exc:
            raise CorruptWeightsError(f"cannot read {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise CorruptWeightsError(f"{path} is not a JSON object")
        return cls.from_dict(raw, source=str(path))

    def _check(self, source: str) -> None:
        ints = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CorruptWeightsError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise CorruptWeightsError(f"{source}: n_embd {self.n_embd} is not divisible by n_head")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise NotGPT2Error(
                f"{source}: activation {self.activation_function!r} is not supported",
                hint=f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}",
            )

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` form (loads in transformers too)."""
        out: dict[str, Any] = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
        out.update(asdict(self))
        out["n_ctx"] = self.n_positions
        return out


@dataclass
class GenerationConfig:
    """Settings of one generation request, validated before any model is loaded."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = 0.95
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    num_samples: int = 1
    ignore_eos: bool = False

    def validate(self) -> GenerationConfig:
        """Check every value; returns self so calls chain.

        Raises:
            BadInputError: a value is out of range (exit code 2).
        """
        _finite("temperature", self.temperature)
        if self.temperature < 0:
            raise BadInputError(
                f"temperature must be >= 0, got {self.temperature}", hint="0 means greedy decoding"
            )
        if self.max_new_tokens < 1:
            raise BadInputError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.top_k is not None and self.top_k < 0:
            raise BadInputError(f"top-k must be >= 0, got {self.top_k}", hint="0 disables top-k")
        if self.top_p is not None:
            _finite("top-p", self.top_p)
            if not 0 < self.top_p <= 1:
                raise BadInputError(f"top-p must be in (0, 1], got {self.top_p}", hint="1 disables it")
        if self.min_p is not None:
            _finite("min-p", self.min_p)
            if not 0 <= self.min_p <= 1:
                raise BadInputError(f"min-p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None:
            _finite("repetition-penalty", self.repetition_penalty)
            if self.repetition_penalty <= 0:
                raise BadInputError(
                    f"repetition-penalty must be > 0, got {self.repetition_penalty}",
                    hint="1.0 means no penalty",
                )
        if self.num_samples < 1:
            raise BadInputError(f"num-samples must be at least 1, got {self.num_samples}")
        if any(s == "" for s in self.stop):
            raise BadInputError("a stop string cannot be empty")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInputError(f"{name} must be a finite number, got {value!r}")
