"""One batched generation: several requests' prompts of equal token length run as one batch.

Each request (a ``Job``) keeps its own sampler, seeded generator, stop strings and token limit,
so its result does not depend on what it was batched with. Rows leave the batch as they finish
or as their client goes away. Prompt plus ``max_new_tokens`` fit in the window (checked by the
caller), so no window slide is needed here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt2cli.config import GenerationConfig
from gpt2cli.device import make_generator
from gpt2cli.logprobs import TokenLogprob, sequence_logprobs, step_logprobs
from gpt2cli.model import GPT2
from gpt2cli.sampling import make_sampler
from gpt2cli.stopping import StopMatcher
from gpt2cli.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Piece:
    """New text of one sample, with the log-probabilities of the tokens that made it."""

    sample: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class SampleOutput:
    text: str
    finish_reason: str
    tokens: int


@dataclass
class Done:
    """A job has finished: every sample's text, and the prompt's own logprobs when echo asked."""

    samples: list[SampleOutput]
    prompt_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class Failed:
    message: str


Event = Piece | Done | Failed


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

    @property
    def scores_only(self) -> bool:
        """max_tokens=0: only the prompt's log-probabilities are wanted."""
        return self.cfg.max_new_tokens == 0


class _Sample:
    """The text side of one row: streaming UTF-8 decoder, stop matcher, pending logprobs."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.matcher = StopMatcher(stops)
        self.text = ""
        self.tokens = 0
        self.pending: list[TokenLogprob] = []
        self.finish: str | None = None
        self.closed = False

    def push(self, token: int, entry: TokenLogprob | None) -> str:
        self.tokens += 1
        if entry is not None:
            self.pending.append(entry)
        text, stopped = self.matcher.push(self.decoder.push(token))
        if stopped:
            self.finish = "stop"
        self.text += text
        return text

    def close(self, reason: str) -> str:
        """End of this sample: release held-back text (unless a stop string cut it)."""
        text, stopped = self.matcher.push(self.decoder.flush())
        if not stopped:
            text += self.matcher.flush()
        self.text += text
        self.finish = self.finish or reason
        return text


def run_scores(model: GPT2, job: Job) -> None:
    """A ``max_tokens=0`` job: the prompt's log-probabilities, no generation."""
    prompt_lp = sequence_logprobs(model, job.prompt, job.logprobs or 0)
    samples = [SampleOutput("", "length", 0) for _ in range(job.cfg.num_samples)]
    job.emit(Done(samples, len(job.prompt), prompt_lp))


class BatchRun:
    """Generate for ``jobs`` (equal prompt lengths) as one batch of sum(num_samples) rows."""

    def __init__(self, model: GPT2, tokenizer: Tokenizer, jobs: list[Job]) -> None:
        if len({len(j.prompt) for j in jobs}) != 1:
            raise ValueError("a batch needs prompts of equal length")
        self.model, self.tokenizer, self.jobs = model, tokenizer, jobs
        device = model.wte.weight.device
        self.samplers = [make_sampler(j.cfg) for j in jobs]
        self.generators = [make_generator(j.cfg.seed, device) for j in jobs]
        # row -> (job index, sample index); rows of one job are contiguous.
        self.rows = [(j, s) for j, job in enumerate(jobs) for s in range(job.cfg.num_samples)]
        self.texts = [[_Sample(tokenizer, job.cfg.stop) for _ in range(job.cfg.num_samples)] for job in jobs]
        self.open = [job.cfg.num_samples for job in jobs]  # samples still running per job

    @torch.inference_mode()
    def run(self) -> None:
        model, device = self.model, self.model.wte.weight.device
        prompt_lps = [
            sequence_logprobs(model, j.prompt, j.logprobs or 0) if j.echo else None for j in self.jobs
        ]
        prompts = torch.tensor([j.prompt for j in self.jobs], device=device)  # (J, T)
        max_new = max(j.cfg.max_new_tokens for j in self.jobs)
        cache = model.new_cache(len(self.jobs), prompts.shape[1] + max_new)
        logits = model(prompts, cache, last_only=True)  # (J, V)
        index = torch.tensor([j for j, _ in self.rows], device=device)
        cache.keep_rows(index)  # fan each prompt out to its samples: (R, ...) rows
        logits, history = logits[index], prompts[index]  # (R, V), (R, T)
        for step in range(max_new):
            next_ids = self._sample(logits, history)  # (R,)
            keep = self._push(step, logits, next_ids)
            if not keep:
                break
            history = torch.cat([history, next_ids.unsqueeze(1)], dim=1)
            if len(keep) < len(self.rows):
                kept = torch.tensor(keep, device=device)
                cache.keep_rows(kept)
                history, next_ids = history[kept], next_ids[kept]
                self.rows = [self.rows[r] for r in keep]
            logits = model(next_ids.unsqueeze(1), cache, last_only=True)
        for r in range(len(self.rows)):
            self._close_row(r, "length")
        for j, job in enumerate(self.jobs):
            if not job.cancelled.is_set():
                samples = [SampleOutput(s.text, s.finish or "length", s.tokens) for s in self.texts[j]]
                job.emit(Done(samples, len(job.prompt), prompt_lps[j]))

    def _sample(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Each job samples its own rows with its own settings and generator."""
        groups = self._job_rows()
        if len(groups) == 1:  # one job: no gather/scatter
            (j,) = groups
            return self.samplers[j](logits, history, self.generators[j])
        out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for j, rows in groups.items():
            idx = torch.tensor(rows, device=logits.device)
            out[idx] = self.samplers[j](logits[idx], history[idx], self.generators[j])
        return out

    def _job_rows(self) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for r, (j, _) in enumerate(self.rows):
            groups.setdefault(j, []).append(r)
        return groups

    def _push(self, step: int, logits: torch.Tensor, next_ids: torch.Tensor) -> list[int]:
        """Hand each row's token to its sample; return the rows that go on."""
        entries = self._logprobs(logits, next_ids)
        keep = []
        for r, token in enumerate(next_ids.tolist()):
            j, s = self.rows[r]
            job, sample = self.jobs[j], self.texts[j][s]
            if job.cancelled.is_set():
                continue
            if token == job.eos_id:
                self._close_row(r, "stop")
                continue
            text = sample.push(token, entries.get(r))
            if text:
                job.emit(Piece(s, text, sample.pending))
                sample.pending = []
            if sample.finish or sample.tokens >= job.cfg.max_new_tokens or job.stopping.is_set():
                self._close_row(r, "length")
            else:
                keep.append(r)
        return keep

    def _logprobs(self, logits: torch.Tensor, next_ids: torch.Tensor) -> dict[int, TokenLogprob]:
        rows = [r for r, (j, _) in enumerate(self.rows) if self.jobs[j].logprobs is not None]
        if not rows:
            return {}
        top = max(self.jobs[self.rows[r][0]].logprobs or 0 for r in rows)
        idx = torch.tensor(rows, device=logits.device)
        entries = step_logprobs(logits[idx], next_ids[idx], top)
        for r, entry in zip(rows, entries, strict=True):
            entry.top = entry.top[: self.jobs[self.rows[r][0]].logprobs or 0]
        return dict(zip(rows, entries, strict=True))

    def _close_row(self, r: int, reason: str) -> None:
        j, s = self.rows[r]
        job, sample = self.jobs[j], self.texts[j][s]
        if sample.closed or job.cancelled.is_set():
            return
        sample.closed = True
        text = sample.close(reason)
        if text or sample.pending:
            job.emit(Piece(s, text, sample.pending))
            sample.pending = []
