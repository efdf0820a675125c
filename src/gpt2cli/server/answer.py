"""One request's plan, and the OpenAI-shaped answer built from its jobs' events.

``Plan`` is what a request asks of the engine; ``Answer`` accumulates the events of its jobs
into OpenAI choices and gives the stream chunks (``text_completion`` or
``chat.completion.chunk``), the usage chunk of ``stream_options.include_usage`` and the final
body, with ``usage.prompt_tokens_details.cached_tokens``.

Log-probabilities follow the text they belong to: a token is listed once the text sent covers
it (text held back because it may start a stop string holds its tokens back too), so a chunk's
tokens span its text; a stop string inside a token cuts its entry there.
``text_offset`` counts the text's characters: a token that is only part of a UTF-8 character
(emoji, CJK) is shown as ``bytes:\\xe2\\x80`` (OpenAI's form) and adds no character until the
token that completes it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gpt2cli.config import GenerationConfig
from gpt2cli.logprobs import TokenLogprob
from gpt2cli.server.batch import Done, Event, Piece, Scored, StopPiece
from gpt2cli.text import ReplyTrimmer
from gpt2cli.tokenizer import StreamDecoder, Tokenizer

Shown = tuple[TokenLogprob, str, int]
"""A token's log-probability entry, the token as shown, and the characters of text it completes."""


def shown_token(raw: bytes) -> str:
    """A token as log-probabilities show it: its text, or ``bytes:\\xe2\\x80`` where its bytes
    are only part of a UTF-8 character (OpenAI's form; U+FFFD would merge distinct tokens)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _shown(tokenizer: Tokenizer, decoder: StreamDecoder, entry: TokenLogprob) -> Shown:
    """``entry`` as shown, with the characters of text its token completes in the sequence that
    ``decoder`` reads (the text's own decoder: a split character counts once, at its last token)."""
    return entry, shown_token(tokenizer.token_bytes(entry.token)), len(decoder.push(entry.token))


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
        tokenizer: the model's (tokens as logprobs show them).
        prompt_chars: each prompt's length in characters (generated text's offsets follow it).
    """

    def __init__(self, plan: Plan, tokenizer: Tokenizer, prompt_chars: list[int]) -> None:
        self.plan, self.tokenizer = plan, tokenizer
        n = plan.cfg.num_samples
        self.n = n
        count = len(plan.prompts) * n
        self.texts = [""] * count
        self.finish: list[str | None] = [None] * count
        self.tokens = [0] * count
        self.cached = [0] * len(plan.prompts)
        self.logprobs: list[list[Shown]] = [[] for _ in range(count)]  # sent (or to be, in the body)
        self.held: list[list[Shown]] = [[] for _ in range(count)]  # their text not sent yet
        self.covered = [0] * count  # characters of text[c] that self.logprobs[c] spans
        self.decoders = [StreamDecoder(tokenizer) for _ in range(count)]
        self.prompt_lps: list[list[Shown]] = [[] for _ in plan.prompts]
        self.chat = plan.kind == "chat.completion"
        self.cleaners = [ReplyTrimmer() for _ in range(count)] if self.chat else []
        self.prompt_chars = prompt_chars
        # text_offset of the next streamed token: generated text follows the prompt's text.
        self.stream_offsets = [prompt_chars[c // n] for c in range(count)] if plan.stream else [0] * count

    # one event -> stream chunks (also recorded for the final body)
    def add(self, i: int, ev: Event) -> list[dict[str, Any]]:
        if isinstance(ev, Scored):
            return self._scored(i, ev)
        if isinstance(ev, Piece):
            c = i * self.n + ev.sample
            self.texts[c] += ev.text
            self.held[c].extend(_shown(self.tokenizer, self.decoders[c], e) for e in ev.logprobs)
            shown = self._release(c, stopped=isinstance(ev, StopPiece))
            text = self.cleaners[c].push(ev.text) if self.chat else ev.text
            if not text and not shown:
                return []
            return [self._chunk(c, text, None, shown)]
        assert isinstance(ev, Done)
        self.cached[i] = ev.cached_tokens
        chunks = []
        for s, sample in enumerate(ev.samples):
            c = i * self.n + s
            self.finish[c], self.tokens[c] = sample.finish_reason, sample.tokens
            chunks.append(
                self._chunk(c, "", sample.finish_reason, self._release(c, stopped=False, flush=True))
            )
        return chunks

    def _scored(self, i: int, ev: Scored) -> list[dict[str, Any]]:
        """The prompt's log-probabilities: kept for the body; a stream's echo chunks carry them."""
        decoder = StreamDecoder(self.tokenizer)
        self.prompt_lps[i] = [_shown(self.tokenizer, decoder, e) for e in ev.logprobs]
        if not (self.plan.stream and self.plan.echo and self.plan.logprobs is not None) or self.chat:
            return []
        text = self.plan.prompt_texts[i]
        return [self._chunk(c, text, None, self.prompt_lps[i], offset=0) for c in self._choices(i)]

    def _choices(self, i: int) -> range:
        return range(i * self.n, (i + 1) * self.n)

    def _release(self, c: int, stopped: bool, flush: bool = False) -> list[Shown]:
        """The held entries that the text received covers now, in order; after a stop string, the
        rest cut where the text ends; ``flush``: every one (the sample is done)."""
        room = len(self.texts[c]) - self.covered[c]
        held, out = self.held[c], []
        while held:
            entry, token, chars = held[0]
            if stopped and room <= 0:
                break  # a token wholly inside the stop string: not part of the answer
            if chars > room and not flush:
                if not stopped:
                    break  # its text is held back (it may start a stop string): so is the token
                token, chars = token[:room], room  # the stop string starts inside this token
            out.append((entry, token, chars))
            room -= chars
            held.pop(0)
        if stopped or flush:
            held.clear()
        self.covered[c] += sum(chars for _, _, chars in out)
        self.logprobs[c].extend(out)
        return out

    def opening_chunks(self) -> list[dict[str, Any]]:
        if self.chat:
            return [self._chunk(c, "", None, [], role=True) for c in range(len(self.texts))]
        if self.plan.echo and self.plan.logprobs is None:  # with logprobs: sent once scored
            return [
                self._chunk(c, self.plan.prompt_texts[c // self.n], None, []) for c in range(len(self.texts))
            ]
        return []

    def _chunk(
        self,
        c: int,
        text: str,
        finish: str | None,
        lps: list[Shown],
        role: bool = False,
        offset: int | None = None,
    ) -> dict[str, Any]:
        """One stream chunk of choice ``c``; ``offset``: the text_offset of ``lps[0]`` (default:
        where the generated text streamed so far ends)."""
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
                if offset is None:
                    offset = self.stream_offsets[c]
                    self.stream_offsets[c] += sum(chars for _, _, chars in lps)
                choice["logprobs"] = self._logprobs_obj(lps, offset)
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
        for _, token, chars in lps:
            tokens.append(token)
            offsets.append(offset)
            offset += chars
        top: list[dict[str, float] | None] = []
        for e, _, _ in lps:
            if e.logprob is None:
                top.append(None)
                continue
            alts: dict[str, float] = {}
            for alt, lp in e.top:
                alts.setdefault(shown_token(self.tokenizer.token_bytes(alt)), lp)
            # OpenAI's legacy completions always list the chosen token too (up to logprobs + 1
            # entries), as vLLM does; the best entry stays first, so "is it greedy" checks hold.
            # (A token cut by a stop string is listed under its whole text among the others.)
            alts.setdefault(shown_token(self.tokenizer.token_bytes(e.token)), e.logprob)
            top.append(alts)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e, _, _ in lps],
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
                generated = self._logprobs_obj(self.logprobs[c], self.prompt_chars[p])
                if plan.echo:  # the prompt's entries first, its text from offset 0
                    echoed = self._logprobs_obj(self.prompt_lps[p], 0)
                    generated = {key: echoed[key] + generated[key] for key in generated}
                choice["logprobs"] = generated
            choices.append(choice)
        return {**self._envelope(plan.kind, choices), "usage": self.usage()}
