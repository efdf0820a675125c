"""The one text layer above the engine: token ids of one sample in, text pieces out.

``SampleText`` is a sample's streaming UTF-8 decoder, its stop matcher and the
log-probabilities of tokens whose text is still held back; ``RequestTexts`` holds one per
sample of an engine request and ends a sample at its stop string. ``LM.stream``,
``LM.generate_many``, the REPL and the server all use them. ``ReplyTrimmer`` streams a chat
reply without the whitespace that opens or closes it (what ``ChatTemplate.clean_reply`` does
to a whole reply).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpt2cli.logprobs import TokenLogprob
from gpt2cli.stopping import StopMatcher
from gpt2cli.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from gpt2cli.engine import Engine, Request, TokenEvent


@dataclass
class Piece:
    """New text of one sample, with the log-probabilities of the tokens that completed it."""

    sample: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class SampleText:
    """Turns one sample's tokens into text, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], sample: int = 0) -> None:
        self.sample = sample
        self.decoder = StreamDecoder(tokenizer)
        self.matcher = StopMatcher(stops)
        self.text = ""
        self.ids: list[int] = []  # the sample's tokens, EOS excluded
        self.pending: list[TokenLogprob] = []
        self.stopped = False  # a stop string matched
        self.closed = False

    def push(self, token: int, entry: TokenLogprob | None = None, *, is_eos: bool = False) -> Piece | None:
        """Add a generated token; the text it completes (None when there is none yet)."""
        if self.closed:
            return None
        if entry is not None:
            self.pending.append(entry)
        if is_eos:
            return self.close()
        self.ids.append(token)
        text, self.stopped = self.matcher.push(self.decoder.push(token))
        return self._piece(text)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """Why the sample ended: "stop" when a stop string cut its text, even where the engine
        had already ended it at its token limit on that same token; else the engine's reason."""
        return "stop" if self.stopped else engine_reason

    def close(self) -> Piece | None:
        """End of the sample: release held-back text (unless a stop string cut it)."""
        if self.closed:
            return None
        self.closed = True
        text, stopped = self.matcher.push(self.decoder.flush())
        self.stopped = self.stopped or stopped
        if not stopped:
            text += self.matcher.flush()
        return self._piece(text)

    def _piece(self, text: str) -> Piece | None:
        self.text += text
        if not text and not (self.pending and (self.closed or self.stopped)):
            return None
        piece = Piece(self.sample, text, self.pending)
        self.pending = []
        return piece


class RequestTexts:
    """The text side of one engine request: a ``SampleText`` per sample, stop strings acted on."""

    def __init__(self, tokenizer: Tokenizer, request: Request) -> None:
        self.request = request
        self.eos = None if request.cfg.ignore_eos else request.eos_id  # the engine's own EOS rule
        self.samples = [SampleText(tokenizer, request.cfg.stop, i) for i in range(request.rows)]

    def push(self, engine: Engine, event: TokenEvent) -> Piece | None:
        """A token of one sample into its text; a matched stop string ends that sample."""
        text = self.samples[event.seq.sample]
        if text.stopped or text.closed:
            return None  # tokens of a round that ran past the stop (speculative): never shown
        piece = text.push(event.token, event.logprob, is_eos=event.token == self.eos)
        if text.stopped:
            engine.stop(event.seq, "stop")
        return piece

    def close(self) -> Iterator[Piece]:
        for text in self.samples:
            piece = text.close()
            if piece is not None and (piece.text or piece.logprobs):
                yield piece


class ReplyTrimmer:
    """Streams a reply with no leading or trailing whitespace.

    Leading whitespace is dropped; trailing whitespace is held back until more text follows it.
    """

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body) :]
        return body


def trimmed(pieces: Iterable[str]) -> Iterator[str]:
    """``pieces`` of a reply, streamed through a ``ReplyTrimmer``."""
    trimmer = ReplyTrimmer()
    for piece in pieces:
        text = trimmer.push(piece)
        if text:
            yield text
