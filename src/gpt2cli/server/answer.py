"""One request's plan, and the OpenAI-shaped answer built from its jobs' events.

``Plan`` is what a request asks of the engine; ``Answer`` accumulates the events of its jobs
into OpenAI choices and gives the stream chunks (``text_completion`` or
``chat.completion.chunk``), the usage chunk of ``stream_options.include_usage`` and the final
body, with ``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpt2cli.config import GenerationConfig
from gpt2cli.logprobs import TokenLogprob
from gpt2cli.server.batch import Done, Event, Piece, StopPiece
from gpt2cli.text import ReplyTrimmer

Shown = tuple[TokenLogprob, str]  # a token's log-probability entry and its text as shown


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
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


class Answer:
    """Accumulates events into OpenAI choices; gives stream chunks and the final body.

    Args:
        token_text: a token's text as shown in logprobs.
    """

    def __init__(self, plan: Plan, token_text: Callable[[int], str], prompt_chars: list[int]) -> None:
        self.plan, self.token_text = plan, token_text
        n = plan.cfg.num_samples
        self.n = n
        count = len(plan.prompts) * n
        self.texts = [""] * count
        self.finish: list[str | None] = [None] * count
        self.tokens = [0] * count
        self.cached = [0] * len(plan.prompts)
        self.logprobs: list[list[Shown]] = [[] for _ in range(count)]
        self.prompt_lps: list[list[TokenLogprob] | None] = [None] * len(plan.prompts)
        self.chat = plan.kind == "chat.completion"
        self.cleaners = [ReplyTrimmer() for _ in range(count)] if self.chat else []
        self.prompt_chars = prompt_chars  # each prompt's length in characters (for text_offset)
        # text_offset of the next streamed token: generated text follows the prompt's text.
        self.stream_offsets = [prompt_chars[c // n] for c in range(count)] if plan.stream else [0] * count

    # one event -> stream chunks (also recorded for the final body)
    def add(self, i: int, ev: Event) -> list[dict[str, Any]]:
        if isinstance(ev, Piece):
            c = i * self.n + ev.sample
            self.texts[c] += ev.text
            shown = self._shown(c, ev.logprobs, isinstance(ev, StopPiece))
            self.logprobs[c].extend(shown)
            text = self.cleaners[c].push(ev.text) if self.chat else ev.text
            if not text and not shown:
                return []
            return [self._chunk(c, text, None, shown)]
        assert isinstance(ev, Done)
        self.prompt_lps[i] = ev.prompt_logprobs
        self.cached[i] = ev.cached_tokens
        chunks = []
        for s, sample in enumerate(ev.samples):
            c = i * self.n + s
            self.finish[c], self.tokens[c] = sample.finish_reason, sample.tokens
            chunks.append(self._chunk(c, "", sample.finish_reason, []))
        return chunks

    def _shown(self, c: int, entries: list[TokenLogprob], stopped: bool) -> list[Shown]:
        """Entries with their token texts; after a stop string, cut to end where the text ends."""
        shown = [(e, self.token_text(e.token)) for e in entries]
        if not stopped:
            return shown
        room = len(self.texts[c]) - sum(len(t) for _, t in self.logprobs[c])
        cut: list[Shown] = []
        for entry, text in shown:
            if room <= 0:
                break  # a token wholly inside the stop string: not part of the answer
            cut.append((entry, text[:room]))
            room -= len(text)
        return cut

    def opening_chunks(self) -> list[dict[str, Any]]:
        if self.chat:
            return [self._chunk(c, "", None, [], role=True) for c in range(len(self.texts))]
        if self.plan.echo:
            return [
                self._chunk(c, self.plan.prompt_texts[c // self.n], None, []) for c in range(len(self.texts))
            ]
        return []

    def _chunk(
        self, c: int, text: str, finish: str | None, lps: list[Shown], role: bool = False
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
                self.stream_offsets[c] += sum(len(t) for _, t in lps)
            obj = "text_completion"
        chunk = self._envelope(obj, [choice])
        if plan.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has the key; the last one has the numbers
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream with ``include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj, []), "usage": self.usage()}

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        plan = self.plan
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {
            "id": prefix + plan.id,
            "object": obj,
            "created": plan.created,
            "model": plan.model,
            "choices": choices,
        }

    def _logprobs_obj(self, lps: list[Shown], offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for _, text in lps:
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        top: list[dict[str, float] | None] = []
        for e, _ in lps:
            if e.logprob is None:
                top.append(None)
                continue
            alts: dict[str, float] = {}
            for tok, lp in e.top:
                alts.setdefault(self.token_text(tok), lp)
            # OpenAI's legacy completions always list the chosen token too (up to logprobs + 1
            # entries), as vLLM does; the best entry stays first, so "is it greedy" checks hold.
            alts.setdefault(self.token_text(e.token), e.logprob)
            top.append(alts)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e, _ in lps],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def usage(self) -> dict[str, Any]:
        prompt_tokens = sum(len(p) for p in self.plan.prompts)
        completion_tokens = sum(self.tokens)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached)},
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
                echoed = [(e, self.token_text(e.token)) for e in (self.prompt_lps[p] or [])]
                start = 0 if plan.echo else self.prompt_chars[p]
                choice["logprobs"] = self._logprobs_obj(echoed + self.logprobs[c], start)
            choices.append(choice)
        return {**self._envelope(plan.kind, choices), "usage": self.usage()}
