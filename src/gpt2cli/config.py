"""Configuration dataclasses: the model's architecture and a generation request's settings.

Stdlib only: the CLI validates options with these before torch is imported.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
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
        if raw.get("tie_word_embeddings") is False:  # transformers would use a separate lm_head.weight
            raise NotGPT2Error(
                f"{source} sets tie_word_embeddings: false (an lm_head apart from wte): not supported",
                hint="gpt2cli runs GPT-2 checkpoints whose lm_head is the embedding matrix, as GPT-2's own",
            )
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
            raise CorruptWeightsError(f"cannot read {path}: {exc}", hint=_repair_hint(path)) from exc
        if not isinstance(raw, dict):
            raise CorruptWeightsError(f"{path} is not a JSON object", hint=_repair_hint(path))
        try:
            return cls.from_dict(raw, source=str(path))
        except CorruptWeightsError as exc:
            exc.hint = _repair_hint(path)
            raise

    def _check(self, source: str) -> None:
        ints = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CorruptWeightsError(f"{source}: {name} must be a positive integer, got {value!r}")
        eps = self.layer_norm_epsilon
        if not isinstance(eps, int | float) or isinstance(eps, bool) or not 0 < eps < 1:
            raise CorruptWeightsError(f"{source}: layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
        inner = self.n_inner
        if inner is not None and (not isinstance(inner, int) or isinstance(inner, bool) or inner < 1):
            raise CorruptWeightsError(f"{source}: n_inner must be a positive integer or null, got {inner!r}")
        for flag in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise CorruptWeightsError(f"{source}: {flag} must be true or false, got {value!r}")
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


def _repair_hint(path: Path) -> str:
    """How to fix a bad config.json: re-download it from the Hub cache, or fix the directory's."""
    parts = path.parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            repo = "/".join(part.split("--")[1:])
            return f"re-download it: `gpt2 models verify {repo} --repair`"
    return f"fix {path}, or copy config.json from the model this directory came from"


# The ranges every front end enforces (generate, repl /set, bench, finetune, the server).
MIN_TEMPERATURE = 1e-3  # below it, logits / T overflows float32 into inf and nan
MAX_NUM_SAMPLES = 64  # samples of one request share a batch; more is an allocation, not a request
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 1e2
RANDOM_SEED = -1  # llama.cpp's convention: draw a seed (and report it)
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds

# How a field is named in messages: on the command line, or as `/set` takes it.
CLI_NAMES = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "seed": "--seed",
    "num_samples": "--num-samples",
    "stop": "--stop",
}


@dataclass
class GenerationConfig:
    """Settings of one generation request, validated before any model is loaded.

    ``seed`` None (or -1) means a random seed: ``with_seed`` draws one, so it can be reported.
    """

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

    def validate(self, names: dict[str, str] | None = None) -> GenerationConfig:
        """Check every value against its range; returns self so calls chain.

        ``names`` maps field names to the names the user typed them under (default: the
        command-line options, ``CLI_NAMES``); the REPL passes the ``/set`` names.

        Raises:
            BadInputError: a value is out of range (exit code 2); the message gives the range.
        """

        def name(key: str) -> str:
            return (CLI_NAMES if names is None else names).get(key, key)

        _finite(name("temperature"), self.temperature)
        if self.temperature != 0 and not self.temperature >= MIN_TEMPERATURE:
            raise BadInputError(
                f"{name('temperature')} must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, "
                f"got {self.temperature:g}",
                hint="0 decodes greedily",
            )
        _integer(name("max_new_tokens"), self.max_new_tokens, 1)
        if self.top_k is not None:
            _integer(name("top_k"), self.top_k, 0, hint="0 disables top-k")
        if self.top_p is not None:
            _finite(name("top_p"), self.top_p)
            if not 0 < self.top_p <= 1:
                raise BadInputError(
                    f"{name('top_p')} must be in (0, 1], got {self.top_p:g}", hint="1 disables it"
                )
        if self.min_p is not None:
            _finite(name("min_p"), self.min_p)
            if not 0 <= self.min_p <= 1:
                raise BadInputError(
                    f"{name('min_p')} must be in [0, 1], got {self.min_p:g}", hint="0 disables it"
                )
        if self.repetition_penalty is not None:
            _finite(name("repetition_penalty"), self.repetition_penalty)
            if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
                raise BadInputError(
                    f"{name('repetition_penalty')} must be between {MIN_REPETITION_PENALTY:g} and "
                    f"{MAX_REPETITION_PENALTY:g}, got {self.repetition_penalty:g}",
                    hint="1.0 means no penalty",
                )
        self.seed = check_seed(self.seed, name("seed"))
        _integer(name("num_samples"), self.num_samples, 1, MAX_NUM_SAMPLES)
        if any(s == "" for s in self.stop):
            raise BadInputError(f"a stop string ({name('stop')}) cannot be empty")
        return self

    def with_seed(self) -> GenerationConfig:
        """This config with a concrete seed: its own, or a freshly drawn one when it has none."""
        if self.seed is not None:
            return self
        return replace(self, seed=random_seed())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def random_seed() -> int:
    """A fresh seed, small enough to read back and type (32 bits, as llama.cpp's)."""
    return secrets.randbits(32)


def check_seed(seed: int | None, name: str = "--seed", *, allow_random: bool = True) -> int | None:
    """The seed to use: ``seed`` itself, or None (random) for None or -1.

    Raises:
        BadInputError: not an integer in 0..2**64-1 (or -1 for random, when allowed).
    """
    if seed is None or (allow_random and seed == RANDOM_SEED):
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        low = "-1 (random) or " if allow_random else ""
        raise BadInputError(f"{name} must be {low}an integer from 0 to {SEED_MAX}, got {seed!r}")
    return seed


def _integer(name: str, value: int, low: int, high: int | None = None, hint: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInputError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        what = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise BadInputError(f"{name} must be {what}, got {value}", hint=hint)


def _finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInputError(f"{name} must be a finite number, got {value!r}")
