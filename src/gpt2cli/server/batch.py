"""A request's prompt as the server's engine thread sees it: a ``Job``, and the events it emits.

Each job becomes one engine ``Request`` with its own sampler, seeded generator, stop strings,
token limit and prompt-cache lease, so its result does not depend on what it runs beside. The
job's text side is the shared text layer (``text.SampleText`` per sample); this module only
turns engine events into the server's events (``Scored``, ``Piece``, ``Done``, ``Failed``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpt2cli.config import GenerationConfig
from gpt2cli.engine import Engine, Request, TokenEvent
from gpt2cli.kvcache import PromptCache
from gpt2cli.logprobs import TokenLogprob, sequence_logprobs
from gpt2cli.model import GPT2
from gpt2cli.text import Piece, RequestTexts
from gpt2cli.tokenizer import Tokenizer

# The OpenAI finish reasons for the engine's: EOS and stop strings are both "stop". A sample
# cancelled by a server shutdown is no finish at all: the job fails with "shutting_down".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
SHUTTING_DOWN = "the server is shutting down"


@dataclass
class SampleOutput:
    text: str
    finish_reason: str
    tokens: int


@dataclass
class StopPiece(Piece):
    """The last piece of a sample that a stop string ended: its text stops inside the last
    token's text, or before it (the log-probabilities still list every token it took)."""


@dataclass
class Scored:
    """The prompt's own log-probabilities (echo with logprobs), before any generated piece."""

    logprobs: list[TokenLogprob]


@dataclass
class Done:
    """A job has finished: every sample's text."""

    samples: list[SampleOutput]
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache, not prefilled


@dataclass
class Failed:
    message: str
    code: str | None = None  # "shutting_down", or None for an internal error


Event = Scored | Piece | Done | Failed


@dataclass
class Job:
    """One prompt of one request. ``emit`` is called on the engine thread, in order."""

    prompt: list[int]
    cfg: GenerationConfig
    emit: Callable[[Event], None]
    logprobs: int | None = None  # top-N alternatives wanted (0 = only the chosen token's), None: none
    echo: bool = False
    eos_id: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)  # client gone: emit nothing more
    stopping: threading.Event = field(default_factory=threading.Event)  # server stopping: finish now
    done: bool = False
    request: Request | None = field(default=None, repr=False)
    texts: RequestTexts | None = field(default=None, repr=False)
    cache: PromptCache | None = field(default=None, repr=False)  # the prompt-cache lease
    queued_at: float = field(default_factory=time.perf_counter)
    token_at: list[float] = field(default_factory=list, repr=False)  # each sample's latest token

    @property
    def scores_only(self) -> bool:
        """max_tokens=0: only the prompt's log-probabilities are wanted."""
        return self.cfg.max_new_tokens == 0

    @property
    def rows(self) -> int:
        return self.cfg.num_samples

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the engine did not prefill (they came from the prompt cache)."""
        if self.request is None or self.request.prefilled < len(self.prompt):
            return 0
        stats = self.request.stats
        return stats.prompt_tokens - stats.prefill_tokens

    def start(
        self, engine: Engine, model: GPT2, tokenizer: Tokenizer, cache: PromptCache | None = None
    ) -> None:
        """Submit this job to ``engine`` (after scoring the prompt when echo and logprobs ask).

        ``cache``: a prompt-cache lease whose prefix the engine reuses and which holds sample
        0's ids and keys/values at the end.
        """
        if self.echo and self.logprobs is not None:  # echo alone needs only the prompt's text
            self.emit(Scored(sequence_logprobs(model, self.prompt, self.logprobs)))
        self.cache = cache
        request = Request(self.prompt, self.cfg, self.eos_id, self.logprobs, cache)
        self.request = engine.submit(request)
        self.texts = RequestTexts(tokenizer, self.request)

    def push(self, engine: Engine, event: TokenEvent) -> None:
        """One token of one of this job's samples: emit the text it completes."""
        assert self.texts is not None
        if self.cancelled.is_set():
            return
        piece = self.texts.push(engine, event)
        if piece is not None:
            stopped = self.texts.samples[event.seq.sample].stopped
            self.emit(StopPiece(piece.sample, piece.text, piece.logprobs) if stopped else piece)

    def finish(self) -> None:
        """The engine is done with this job: flush every sample and emit ``Done`` (or ``Failed``)."""
        assert self.request is not None
        if self.cancelled.is_set():
            return
        if self.request.error is not None:
            self.emit(Failed(f"internal error: {type(self.request.error).__name__}"))
            return
        if any(seq.finish_reason == "cancelled" for seq in self.request.sequences):
            self.emit(Failed(SHUTTING_DOWN, "shutting_down"))  # only a shutdown cancels a live job
            return
        assert self.texts is not None
        for piece in self.texts.close():
            self.emit(piece)
        samples = [
            SampleOutput(
                t.text,
                FINISH_REASONS.get(t.finish_reason(seq.finish_reason) or "length", "length"),
                len(t.ids),
            )
            for t, seq in zip(self.texts.samples, self.request.sequences, strict=True)
        ]
        self.emit(Done(samples, len(self.prompt), self.cached_tokens))


def run_scores(model: GPT2, job: Job) -> None:
    """A ``max_tokens=0`` job: the prompt's log-probabilities (if asked for), no generation."""
    if job.logprobs is not None:
        job.emit(Scored(sequence_logprobs(model, job.prompt, job.logprobs)))
    samples = [SampleOutput("", "length", 0) for _ in range(job.cfg.num_samples)]
    job.emit(Done(samples, len(job.prompt)))
