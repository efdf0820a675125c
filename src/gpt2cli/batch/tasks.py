"""What a batch job does to a chunk of records with a loaded model: score them, or generate.

Settings are small picklable dataclasses; each process that runs a chunk (this one, a
``--workers`` process, a Ray actor) builds its own model and task from them, and every one of
them turns a chunk into the same output lines through ``run_chunk``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from gpt2cli.batch.jsonl import Line, Outcome, Record, error_outcome, parse_line, skipped_outcome, to_line
from gpt2cli.config import GenerationConfig
from gpt2cli.errors import BadInputError

if TYPE_CHECKING:
    from gpt2cli.api import LM

# The fields of a score line (after "id"), in order: gpt2 score --format json's per-file numbers.
SCORE_FIELDS = (
    "tokens",
    "bytes",
    "words",
    "nll",
    "total_nll",
    "perplexity",
    "bits_per_byte",
    "word_perplexity",
)
# Sampling fields a generate line may set for itself, and the JSON types each accepts.
OVERRIDES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "min_p": (int, float),
    "repetition_penalty": (int, float),
    "seed": (int,),
    "stop": (str, list),
    "ignore_eos": (bool,),
}


@dataclass(frozen=True)
class ModelSettings:
    """How each process loads its copy of the model."""

    spec: str
    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    allow_pickle: bool = False
    quantize: str | None = None
    threads: int | None = None  # torch threads in that process (None: torch's choice or GPT2_THREADS)

    def load(self) -> LM:
        from gpt2cli.api import load
        from gpt2cli.device import configure_threads

        configure_threads(self.threads)
        return load(
            self.spec,
            device=self.device,
            dtype=self.dtype,
            offline=self.offline,
            allow_pickle=self.allow_pickle,
            quantize=self.quantize,
            progress=False,
        )


class Task(Protocol):
    input_field: str

    def run(self, records: list[Record]) -> Iterator[Outcome]:
        """One outcome per record, in order (records in ``error`` give their error line)."""
        ...


@dataclass(frozen=True)
class ScoreSettings:
    """``gpt2 score --jsonl``: each document scored as ``gpt2 score`` scores it alone."""

    input_field: str = "text"
    context: int | None = None
    stride: int | None = None
    batch_size: int | None = None  # scoring.default_batch_size
    per_token: bool = False

    def build(self, lm: LM) -> Task:
        return ScoreTask(lm, self)


@dataclass(frozen=True)
class GenerateSettings:
    """``gpt2 generate --jsonl``: one sample per prompt; a line may set its own sampling fields."""

    config: GenerationConfig = field(default_factory=GenerationConfig)
    input_field: str = "prompt"

    def build(self, lm: LM) -> Task:
        return GenerateTask(lm, self)


TaskSettings = ScoreSettings | GenerateSettings


def run_chunk(task: Task, lines: list[Line], id_field: str, done: set[str]) -> Iterator[Outcome]:
    """The outcomes of a chunk of input lines in order; ids in ``done`` are skipped."""
    records = [parse_line(line, id_field, task.input_field) for line in lines]
    todo = [r for r in records if r.key not in done]
    outcomes = task.run(todo)
    for record in records:
        yield skipped_outcome(record) if record.key in done else next(outcomes)


def _with_bad(records: list[Record], good: Iterable[Outcome]) -> Iterator[Outcome]:
    """Error outcomes for the records in ``error``, the others from ``good``, in input order."""
    results = iter(good)
    for record in records:
        yield error_outcome(record) if record.error is not None else next(results)


class ScoreTask:
    def __init__(self, lm: LM, settings: ScoreSettings) -> None:
        self.lm, self.settings = lm, settings
        self.input_field = settings.input_field

    def run(self, records: list[Record]) -> Iterator[Outcome]:
        s = self.settings
        good = [r for r in records if r.error is None]
        results = self.lm.score_many(
            (r.fields[self.input_field] for r in good),
            context=s.context,
            stride=s.stride,
            batch_size=s.batch_size,
            lookahead=max(1, len(good)),
            per_token=s.per_token,
        )
        return _with_bad(records, (self._outcome(r, res) for r, res in zip(good, results, strict=True)))

    def _outcome(self, record: Record, result: Any) -> Outcome:
        if isinstance(result, BadInputError):  # unscoreable after all (parse_line catches the usual cases)
            return error_outcome(replace(record, error=f"line {record.number}: {result.message}"))
        full = result.to_json()
        obj = {"id": record.id, **{key: full[key] for key in SCORE_FIELDS}}
        if self.settings.per_token:
            obj["per_token"] = full.get("per_token", [])
        return Outcome(
            record.number,
            record.end,
            to_line(obj),
            tokens=result.tokens,
            bytes=result.bytes,
            total_nll=result.total_nll,
        )


class GenerateTask:
    def __init__(self, lm: LM, settings: GenerateSettings) -> None:
        self.lm, self.settings = lm, settings
        self.input_field = settings.input_field

    def run(self, records: list[Record]) -> Iterator[Outcome]:
        checked = [self._with_config(r) for r in records]
        good = [(r, cfg) for r, cfg in checked if cfg is not None]
        results = self.lm.generate_many((r.fields[self.input_field], cfg) for r, cfg in good)
        outcomes = (self._outcome(r, res) for (r, _), res in zip(good, results, strict=True))
        return _with_bad([r for r, _ in checked], outcomes)

    def _with_config(self, record: Record) -> tuple[Record, GenerationConfig | None]:
        if record.error is not None:
            return record, None
        try:
            return record, line_config(self.settings.config, record.fields)
        except BadInputError as exc:
            return replace(record, error=f"line {record.number}: {exc.message}"), None

    def _outcome(self, record: Record, result: Any) -> Outcome:
        sample = result.samples[0]
        obj = {
            "id": record.id,
            "text": sample.text,
            "tokens": sample.tokens,
            "finish_reason": sample.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "seed": result.seed,  # the line's seed, drawn when neither it nor --seed gave one
        }
        size = len(sample.text.encode("utf-8", "surrogatepass"))
        return Outcome(record.number, record.end, to_line(obj), tokens=sample.tokens, bytes=size)


def line_config(base: GenerationConfig, line: dict[str, Any]) -> GenerationConfig:
    """``base`` with the sampling fields a line sets (``OVERRIDES``), validated; one sample.

    Raises:
        BadInputError: a field of the wrong type or out of range.
    """
    changes: dict[str, Any] = {}
    for name, types in OVERRIDES.items():
        if name not in line or line[name] is None:
            continue
        value = line[name]
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            raise BadInputError(f'"{name}" has the wrong type: {json.dumps(value)}')
        changes[name] = _stop_strings(value) if name == "stop" else value
    cfg = replace(base, **changes, num_samples=1)
    return cfg.validate()


def _stop_strings(value: Any) -> tuple[str, ...]:
    stops = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(s, str) for s in stops):
        raise BadInputError('"stop" must be a string or a list of strings')
    return stops
