"""Scoring text under a GPT-2: per-token log-probabilities, perplexity, bits per byte.

One responsibility: the scoring method, streamed. The text is prefixed with ``<|endoftext|>``
so its first token is scored too. Windows of ``context`` input tokens start every ``stride``
tokens; a window's input position j predicts the token at j+1, and each window scores only the
targets no earlier window scored, so every text token is scored exactly once, with the left
context its window gives (stride == context: disjoint windows). Perplexity is
exp(total NLL / scored tokens); bits per byte and word perplexity are lm-evaluation-harness's.

``protocol="hf"`` is instead Hugging Face's perplexity guide, to the letter, so that its
published figures can be reproduced: no prefix (the text's first token is never predicted);
windows of ``context`` tokens start every ``stride`` tokens; each predicts the tokens after
the previous window's end (the first window ``context - 1`` of them), and its mean NLL counts
for one token fewer than its new tokens (the guide subtracts the label shift per window), so
perplexity = exp(sum of mean x (new - 1) / sum of (new - 1)). A window with nothing to predict
counts for nothing.

Input is read in chunks, decoded incrementally and tokenized at boundaries where tokenizing
the pieces equals tokenizing the whole, and windows are scored as they fill: memory stays
bounded however long the input is. Ctrl-C raises ``ScoreInterrupted`` with the result so far.
"""

from __future__ import annotations

import codecs
import heapq
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from gpt2cli import kernels
from gpt2cli.errors import BadInputError
from gpt2cli.model import GPT2
from gpt2cli.tokenizer import Tokenizer

READ_BYTES = 1 << 20  # bytes read from the input at a time
FORCE_CUT_CHARS = 16 << 20  # text without any safe boundary is cut here anyway (pathological input)
LOGIT_ELEMENTS = 1 << 23  # logits computed at once: rows x vocab (32 MiB in float32)
LOGIT_ELEMENTS_INT8 = 1 << 20
"""The same for an int8 lm_head, whose GEMM holds an int32 sum and a float32 copy per logit
besides the log-softmax's: at 8 Mi elements int8 scoring peaked 300-370 MiB over the loaded
124M model, at 1 Mi (20 rows of GPT-2's vocabulary, still the GEMM) 150-190 MiB, as fast
and the same bits (the int8 sums are exact; docs/performance.md)."""
CONTEXT_TOKENS = 12  # tokens of context shown either side of a --top token
CPU_BATCH_TOKENS = 2048
"""Tokens a CPU batch of windows holds by default (two windows of 1024): on a 2-core CPU one or
two windows of 1024 scored as fast as eight (0.98-1.19x) with half to a third of the extra
memory (docs/performance.md). GPUs keep ``GPU_BATCH_WINDOWS``: they want large batches."""
GPU_BATCH_WINDOWS = 8


def logit_rows(model: GPT2) -> int:
    """Rows of hidden states whose logits are made at once (never all rows x vocab).

    ``LOGIT_ELEMENTS_INT8`` only for an int8 lm_head on CPU going through ``torch._int_mm`` (its
    copies); the numba int8 path writes the logits alone (and ran 1.25x faster per row at 166
    rows than at 20), and elsewhere an int8 layer dequantises its weight per call, which smaller
    chunks would repeat.
    """
    on_cpu = model.lm_head_q is not None and model.lm_head_q[0].device.type == "cpu"
    int8_gemm = on_cpu and kernels.int8_gemm_path() == "int-mm"
    elements = LOGIT_ELEMENTS_INT8 if int8_gemm else LOGIT_ELEMENTS
    return max(1, elements // model.config.vocab_size)


def default_batch_size(context: int, device: torch.device) -> int:
    """Windows scored together unless the caller says: ``CPU_BATCH_TOKENS`` worth on CPU."""
    if device.type == "cpu":
        return max(1, CPU_BATCH_TOKENS // context)
    return GPU_BATCH_WINDOWS


_WORD_BREAK = re.compile(r"\s+")

Progress = Callable[[int, int], None]  # (bytes of text scored so far, tokens scored so far)
PROTOCOLS = ("lm-eval", "hf")  # the default reading, and Hugging Face's perplexity guide


class ScoreInputError(BadInputError):
    """An input to score cannot be read: missing, a directory, empty, or not UTF-8."""


class ScoreInterrupted(KeyboardInterrupt):
    """Ctrl-C while scoring: ``partial`` is the result of the text scored until then."""

    def __init__(self, partial: ScoreResult) -> None:
        super().__init__()
        self.partial = partial


@dataclass(frozen=True)
class TokenScore:
    """One scored token: its position in the text (0-based), id, text, log-probability, rank,
    and the entropy (nats) of the model's prediction for it.

    ``text`` holds the characters completed by this token (a character split over several
    tokens appears with the last of them), so the texts concatenate to the input.
    """

    position: int
    id: int
    text: str
    logprob: float
    rank: int
    entropy: float = math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "id": self.id,
            "text": self.text,
            "logprob": self.logprob,
            "rank": self.rank,
            "entropy": self.entropy,
        }


@dataclass
class Surprise:
    """A highly surprising token with the text around it (for ``--top``)."""

    token: TokenScore
    before: str
    after: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            **self.token.to_json(),
            "nll": -self.token.logprob,
            "before": self.before,
            "after": self.after,
        }


@dataclass
class ScoreResult:
    """Scores of one input (or the total of several): sums, and the metrics derived from them."""

    file: str
    tokens: int
    bytes: int
    words: int
    total_nll: float
    context: int
    stride: int
    seconds: float = 0.0
    token_scores: list[TokenScore] = field(default_factory=list, repr=False)
    top: list[Surprise] = field(default_factory=list, repr=False)
    interrupted: bool = False  # Ctrl-C: the figures of the text scored until then

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per token, in nats."""
        return self.total_nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return _safe_exp(self.nll)

    @property
    def bits_per_byte(self) -> float:
        """lm-evaluation-harness: total NLL / bytes / ln 2."""
        return self.total_nll / self.bytes / math.log(2) if self.bytes else math.nan

    @property
    def word_perplexity(self) -> float:
        """lm-evaluation-harness: exp(total NLL / words), words = len(re.split(r"\\s+", text))."""
        return _safe_exp(self.total_nll / self.words) if self.words else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The ``--format json`` object (per-token and top lists only when they were asked for)."""
        obj: dict[str, Any] = {
            "file": self.file,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "words": self.words,
            "nll": self.nll,
            "total_nll": self.total_nll,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "word_perplexity": self.word_perplexity,
            "context": self.context,
            "stride": self.stride,
            "seconds": round(self.seconds, 6),
            "tokens_per_second": round(self.tokens_per_second, 3),
        }
        if self.interrupted:
            obj["interrupted"] = True
        if self.top:
            obj["top"] = [s.to_json() for s in self.top]
        if self.token_scores:
            obj["per_token"] = [t.to_json() for t in self.token_scores]
        return obj


def _window_sums(logprobs: torch.Tensor, counts: list[int]) -> list[float]:
    """The sum (in float64) of each window's slice of the batch's log-probabilities."""
    return [float(part.double().sum()) for part in torch.split(logprobs, counts)]


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of log-probabilities (..., V) -> (...); 0 log 0 counts as 0."""
    finite = logprobs.clamp(min=torch.finfo(logprobs.dtype).min)  # -inf where p = 0: the product is 0
    return -(logprobs.exp() * finite).sum(-1)


# GLTR's rank buckets (Gehrmann et al., 2019): top-10, top-100, top-1000, beyond.
RANK_BUCKETS = (10, 100, 1000)


def rank_bucket(rank: int) -> int:
    """0 for a top-10 token, 1 for top-100, 2 for top-1000, 3 beyond (GLTR's buckets)."""
    return next((i for i, limit in enumerate(RANK_BUCKETS) if rank <= limit), len(RANK_BUCKETS))


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def total(results: list[ScoreResult], name: str = "total") -> ScoreResult:
    """The pooled result of several inputs: sums of tokens, bytes, words and NLL."""
    first = results[0] if results else None
    return ScoreResult(
        file=name,
        tokens=sum(r.tokens for r in results),
        bytes=sum(r.bytes for r in results),
        words=sum(r.words for r in results),
        total_nll=sum(r.total_nll for r in results),
        context=first.context if first else 0,
        stride=first.stride if first else 0,
        seconds=sum(r.seconds for r in results),
    )


def check_windows(context: int, stride: int, window: int, protocol: str = "lm-eval") -> None:
    """Validate the window settings (and the protocol) against the model's window.

    Raises:
        BadInputError: context outside 1..window, stride outside 1..context, unknown protocol.
    """
    if protocol not in PROTOCOLS:
        raise BadInputError(f"unknown protocol {protocol!r}", hint=f"use one of {', '.join(PROTOCOLS)}")
    if context < 1 or context > window:
        raise BadInputError(
            f"--context {context} is outside 1..{window} (the model's window)",
            hint=f"use --context {window} or less",
        )
    if stride < 1:
        raise BadInputError(f"--stride {stride} is below 1", hint="use a stride between 1 and --context")
    if stride > context:
        raise BadInputError(
            f"--stride {stride} is larger than --context {context}: tokens between windows would go unscored",
            hint=f"use --stride {context} (disjoint windows) or less",
        )


# --- reading and tokenizing in a stream ---------------------------------------------------------


def open_source(source: os.PathLike[str] | IO[bytes]) -> tuple[IO[bytes], str, bool]:
    """``(binary stream, display name, whether we opened it)`` for a path or a binary stream.

    Raises:
        ScoreInputError: the file is missing, a directory, or unreadable.
    """
    if not isinstance(source, os.PathLike):
        shown = getattr(source, "name", None)
        return source, shown if isinstance(shown, str) else "<stream>", False
    path = Path(source)
    name = str(source)
    if path.is_dir():
        raise ScoreInputError(f"{name} is a directory", hint="give a text file, or '-' for stdin")
    try:
        return open(path, "rb"), name, True  # noqa: SIM115 - closed by the caller
    except FileNotFoundError as exc:
        raise ScoreInputError(f"{name}: no such file", hint="check the path") from exc
    except OSError as exc:
        raise ScoreInputError(f"{name}: cannot read it ({exc.strerror or exc})") from exc


def decoded_chunks(
    stream: IO[bytes], name: str, errors: str = "strict", read_bytes: int | None = None
) -> Iterator[tuple[str, int]]:
    """UTF-8 text of ``stream`` in pieces (``read_bytes`` at a time), with the bytes each consumed.

    Raises:
        ScoreInputError: invalid UTF-8 with ``errors="strict"`` (naming the byte offset), or a
            read failure.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset = 0  # bytes handed to the decoder so far
    while True:
        try:
            data = stream.read(read_bytes or READ_BYTES)
        except OSError as exc:
            raise ScoreInputError(f"{name}: cannot read it ({exc.strerror or exc})") from exc
        held = len(decoder.getstate()[0])  # bytes of an incomplete character carried over
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise ScoreInputError(
                f"{name} is not valid UTF-8 text (invalid byte at offset {offset - held + exc.start})",
                hint="pass --errors replace to score it with invalid bytes replaced by U+FFFD",
            ) from exc
        offset += len(data)
        if text or data:
            yield text, len(data)
        if not data:
            return


def safe_cut(text: str) -> int:
    """The last index where ``text`` can be cut so that the pieces tokenize as the whole does.

    GPT-2's pre-tokenizer never joins ``"X\\n"`` to a following ``"Y"`` (X, Y not whitespace),
    nor ``"X"`` to a following ``" Y"``: cutting after such a newline, or before such a space,
    is exact. Returns 0 when there is no such place.
    """
    for pattern in ("\n", " "):
        i = text.rfind(pattern, 0, len(text) - 1)
        while i > 0:
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                return i + 1 if pattern == "\n" else i
            i = text.rfind(pattern, 0, i)
    return 0


@dataclass
class TextStats:
    """Bytes and lm-eval words of the text seen so far (given in pieces cut anywhere)."""

    bytes: int = 0
    breaks: int = 0  # runs of whitespace; lm-eval's words = len(re.split(r"\s+", text)) = breaks + 1
    _in_space: bool = False  # the last piece ended inside a whitespace run

    @property
    def words(self) -> int:
        return self.breaks + 1 if self.bytes else 0

    def add(self, piece: str) -> None:
        if not piece:
            return
        self.bytes += len(piece.encode("utf-8", "surrogatepass"))
        self.breaks += len(_WORD_BREAK.findall(piece))
        if self._in_space and piece[0].isspace():
            self.breaks -= 1  # a run split between two pieces is one run
        self._in_space = piece[-1].isspace()


def token_chunks(
    tokenizer: Tokenizer, pieces: Iterable[tuple[str, int]], stats: TextStats, progress_bytes: list[int]
) -> Iterator[list[int]]:
    """Token ids of the decoded pieces, tokenized a safe chunk at a time (``<|endoftext|>`` special)."""
    pending = ""
    for text, raw in pieces:
        progress_bytes[0] += raw
        pending += text
        cut = safe_cut(pending) if len(pending) < FORCE_CUT_CHARS else len(pending)
        if cut:
            head, pending = pending[:cut], pending[cut:]
            stats.add(head)
            yield tokenizer.encode(head, allow_special=True)
    if pending:
        stats.add(pending)
        yield tokenizer.encode(pending, allow_special=True)


# --- windows ------------------------------------------------------------------------------------


@dataclass
class Window:
    """Model input ``ids`` (starting at absolute position ``begin``) scoring targets from ``first``.

    Input row j predicts absolute token ``begin + j + 1``; rows ``first..len(ids)-1`` are scored.
    ``weight``: the tokens its mean NLL counts for (None: as many as it scores).
    """

    begin: int
    ids: list[int]
    targets: list[int]
    first: int
    weight: int | None = None


class WindowCutter:
    """Cuts the growing sequence ``<|endoftext|> + text ids`` into the method's windows.

    Keeps only the ids from the next window's start on, so memory is bounded by one window
    plus one chunk of tokens.
    """

    def __init__(self, prefix: int, context: int, stride: int) -> None:
        self.context, self.stride = context, stride
        self.buf: list[int] = [prefix]  # ids from absolute position self.begin on
        self.begin = 0  # absolute start of the next window's input
        self.scored = 0  # last absolute position scored (0: the prefix, never a target)

    def push(self, ids: list[int]) -> Iterator[Window]:
        """Add ids; yield every full window that is now known (it needs its last target)."""
        self.buf.extend(ids)
        while len(self.buf) > self.context:
            yield self._take(self.context)

    def finish(self) -> Iterator[Window]:
        """End of input: the last, shorter window, if any target is left."""
        last = self.begin + len(self.buf) - 1
        if last > self.scored:
            yield self._take(len(self.buf) - 1)

    def _take(self, length: int) -> Window:
        ids, targets = self.buf[:length], self.buf[1 : length + 1]
        window = Window(self.begin, ids, targets, first=self.scored - self.begin)
        self.scored = self.begin + length
        drop = min(self.stride, len(self.buf))
        self.begin += drop
        del self.buf[:drop]
        return window


class HFWindowCutter:
    """Hugging Face's perplexity guide: windows [k*stride, k*stride + context) of the text's own ids.

    Each window predicts the tokens after the previous window's end (``trg_len`` of them; the
    first window, from position 0, predicts ``context - 1``) and counts for ``trg_len - 1``.
    """

    def __init__(self, context: int, stride: int) -> None:
        self.context, self.stride = context, stride
        self.buf: list[int] = []  # ids from absolute position self.begin on
        self.begin = 0
        self.prev_end = 0

    def push(self, ids: list[int]) -> Iterator[Window]:
        self.buf.extend(ids)
        while len(self.buf) >= self.context:
            yield from self._take(self.context)

    def finish(self) -> Iterator[Window]:
        while self.prev_end < self.begin + len(self.buf):
            yield from self._take(len(self.buf))

    def _take(self, length: int) -> Iterator[Window]:
        end = self.begin + length
        trg_len = end - self.prev_end
        ids = self.buf[:length]
        first = max(0, self.prev_end - self.begin - 1)  # input row predicting the first new token
        if length >= 2:  # one token predicts nothing: the guide's loss would be empty
            yield Window(self.begin, ids[:-1], ids[1:], first, weight=trg_len - 1)
        self.prev_end = end
        drop = min(self.stride, len(self.buf))
        self.begin += drop
        del self.buf[:drop]


def windows(
    tokenizer: Tokenizer,
    stream: IO[bytes],
    name: str,
    errors: str,
    context: int,
    stride: int,
    stats: TextStats,
    read: list[int],
    protocol: str = "lm-eval",
) -> Iterator[Window]:
    """The method's (or ``protocol``'s) windows over ``stream``, as the text is read (bounded memory).

    ``stats`` and ``read[0]`` (bytes read) are updated as it goes.
    """
    cutter: WindowCutter | HFWindowCutter
    if protocol == "hf":
        cutter = HFWindowCutter(context, stride)
    else:
        cutter = WindowCutter(tokenizer.eot_id, context, stride)
    for ids in token_chunks(tokenizer, decoded_chunks(stream, name, errors), stats, read):
        yield from cutter.push(ids)
    yield from cutter.finish()


# --- the scorer ---------------------------------------------------------------------------------


class _Tracker:
    """Collects per-token scores, the most surprising tokens and their context."""

    def __init__(
        self, tokenizer: Tokenizer, keep_tokens: bool, top: int, on_token: Callable[[TokenScore], None] | None
    ) -> None:
        self.tokenizer = tokenizer
        self.keep_tokens, self.top_n, self.on_token = keep_tokens, top, on_token
        self.active = keep_tokens or top > 0 or on_token is not None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens: list[TokenScore] = []
        self.heap: list[tuple[float, int, Surprise]] = []  # min-heap on NLL: the top N so far
        self.recent: deque[str] = deque(maxlen=CONTEXT_TOKENS)
        self.waiting: list[tuple[Surprise, int]] = []  # (entry, tokens of right context still wanted)

    def add(self, position: int, token: int, logprob: float, rank: int, entropy: float) -> None:
        text = self.decoder.decode(self.tokenizer.token_bytes(token))
        score = TokenScore(position, token, text, logprob, rank, entropy)
        if self.keep_tokens:
            self.tokens.append(score)
        if self.on_token is not None:
            self.on_token(score)
        if self.top_n:
            self._right_context(text)
            self._maybe_top(score)
        self.recent.append(text)

    def add_windows(
        self,
        windows: list[Window],
        logprobs: torch.Tensor,
        ranks: torch.Tensor,
        entropies: torch.Tensor,
        shift: int = 0,
    ) -> None:
        """Add the scored targets of ``windows`` (flat scores, as ``Scorer.window_logprobs`` gives).

        Input row j predicts token begin + j + 1: text position j after lm-eval's prefix
        (``shift`` 0), or j + 1 under the hf protocol, whose windows have no prefix (``shift`` 1).
        """
        positions = [w.begin + j + shift for w in windows for j in range(w.first, len(w.ids))]
        targets = [t for w in windows for t in w.targets[w.first :]]
        scores = zip(positions, targets, logprobs.tolist(), ranks.tolist(), entropies.tolist(), strict=True)
        for pos, tok, lp, rank, ent in scores:
            self.add(pos, tok, lp, rank, ent)

    def _right_context(self, text: str) -> None:
        still = []
        for entry, wanted in self.waiting:
            entry.after += text
            if wanted > 1:
                still.append((entry, wanted - 1))
        self.waiting = still

    def _maybe_top(self, score: TokenScore) -> None:
        nll = -score.logprob
        if len(self.heap) >= self.top_n and nll <= self.heap[0][0]:
            return
        entry = Surprise(score, before="".join(self.recent))
        item = (nll, -score.position, entry)  # ties: the earlier token ranks higher
        if len(self.heap) < self.top_n:
            heapq.heappush(self.heap, item)
        else:
            heapq.heapreplace(self.heap, item)
        self.waiting.append((entry, CONTEXT_TOKENS))

    def top(self) -> list[Surprise]:
        return [entry for _, _, entry in sorted(self.heap, key=lambda item: (-item[0], -item[1]))]


class _Scored:
    """Sums over the targets scored so far: the NLL (windows weighted), tokens, and their text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.nll = 0.0
        self.tokens = 0
        self.text = TextStats()  # bytes and words of the scored targets (progress, partial results)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, nll: float, tokens: int, targets: list[int]) -> None:
        self.nll += nll
        self.tokens += tokens
        self.text.add(self.decoder.decode(b"".join(self.tokenizer.token_bytes(t) for t in targets)))


class Scorer:
    """Scores token streams with one model: batches full windows, lm_head on scored rows only."""

    def __init__(
        self,
        model: GPT2,
        tokenizer: Tokenizer,
        *,
        context: int,
        stride: int,
        batch_size: int | None = None,
        protocol: str = "lm-eval",
    ) -> None:
        check_windows(context, stride, model.config.n_positions, protocol)
        if batch_size is not None and batch_size < 1:
            raise BadInputError(f"--batch-size {batch_size} is below 1", hint="use 1 or more")
        self.model, self.tokenizer = model, tokenizer
        self.device = model.wte.weight.device
        if batch_size is None:
            batch_size = default_batch_size(context, self.device)
        self.context, self.stride, self.batch_size = context, stride, batch_size
        self.protocol = protocol

    def score(
        self,
        source: os.PathLike[str] | IO[bytes],
        *,
        name: str | None = None,
        errors: str = "strict",
        per_token: bool = False,
        top: int = 0,
        on_token: Callable[[TokenScore], None] | None = None,
        progress: Progress | None = None,
    ) -> ScoreResult:
        """Score a file or a binary stream by the module's method.

        Args:
            source: a path or a binary stream (text is passed as ``io.BytesIO``).
            name: the name reported (default: the path or the stream's name).
            errors: ``strict`` refuses invalid UTF-8; ``replace`` scores it as U+FFFD.
            per_token: keep every token's score in ``result.token_scores``.
            top: keep the ``top`` most surprising tokens with context in ``result.top``.
            on_token: called with each token's score, in order, as it is scored.
            progress: called with (bytes of text scored, tokens scored) after each batch.

        Returns:
            The file's ``ScoreResult``.

        Raises:
            ScoreInputError: unreadable, empty or invalid-UTF-8 input.
            ScoreInterrupted: Ctrl-C; its ``partial`` holds the text scored until then.
        """
        if errors not in ("strict", "replace"):
            raise BadInputError(f"unknown --errors {errors!r}", hint="use strict or replace")
        stream, shown, opened = open_source(source)
        shown = name or shown
        try:
            return self._score_stream(stream, shown, errors, per_token, top, on_token, progress)
        finally:
            if opened:
                stream.close()

    def _score_stream(
        self,
        stream: IO[bytes],
        name: str,
        errors: str,
        per_token: bool,
        top: int,
        on_token: Callable[[TokenScore], None] | None,
        progress: Progress | None,
    ) -> ScoreResult:
        t0 = time.perf_counter()
        stats, read = TextStats(), [0]
        tracker = _Tracker(self.tokenizer, per_token, top, on_token)
        scored = _Scored(self.tokenizer)

        def result(text: TextStats, interrupted: bool = False) -> ScoreResult:
            return ScoreResult(
                file=name,
                tokens=scored.tokens,
                bytes=text.bytes,
                words=text.words,
                total_nll=scored.nll,
                context=self.context,
                stride=self.stride,
                seconds=time.perf_counter() - t0,
                token_scores=tracker.tokens,
                top=tracker.top(),
                interrupted=interrupted,
            )

        try:
            self._score_windows(stream, name, errors, stats, read, tracker, scored, progress)
        except KeyboardInterrupt:
            # the figures of the text scored until then (bytes and words of the scored tokens)
            raise ScoreInterrupted(result(scored.text, interrupted=True)) from None
        if stats.bytes == 0:
            raise ScoreInputError(f"{name} is empty", hint="give some text to score")
        if progress:
            progress(stats.bytes, scored.tokens)
        return result(stats)

    def _score_windows(
        self,
        stream: IO[bytes],
        name: str,
        errors: str,
        stats: TextStats,
        read: list[int],
        tracker: _Tracker,
        scored: _Scored,
        progress: Progress | None,
    ) -> None:
        batch: list[Window] = []
        source = windows(
            self.tokenizer, stream, name, errors, self.context, self.stride, stats, read, self.protocol
        )
        for window in source:
            # Full windows share a length and batch together; only the last may be shorter.
            if batch and len(window.ids) != len(batch[0].ids):
                self._run(batch, tracker, scored)
                batch = []
            batch.append(window)
            if len(batch) == self.batch_size:
                self._run(batch, tracker, scored)
                batch = []
                if progress:
                    progress(scored.text.bytes, scored.tokens)
        if batch:
            self._run(batch, tracker, scored)

    def _run(self, windows: list[Window], tracker: _Tracker, scored: _Scored) -> None:
        """Score a batch of windows; add to ``scored`` and the tracker."""
        logprobs, ranks, entropies = self.window_logprobs(windows, tracker.active)
        counts = [len(w.ids) - w.first for w in windows]
        targets = [t for w in windows for t in w.targets[w.first :]]
        nll, counted = 0.0, 0
        for w, n, total in zip(windows, counts, _window_sums(logprobs, counts), strict=True):
            weight = n if w.weight is None else w.weight
            nll -= total if weight == n else total / n * weight  # hf: the window's mean x its weight
            counted += weight
        scored.add(nll, counted, targets)
        if tracker.active:
            assert ranks is not None and entropies is not None
            shift = 1 if self.protocol == "hf" else 0
            tracker.add_windows(windows, logprobs, ranks, entropies, shift=shift)

    @torch.inference_mode()
    def window_logprobs(
        self, windows: list[Window], want_ranks: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-probabilities (and ranks and entropies) of the scored targets of a batch of windows.

        Windows may differ in length: shorter ones are right-padded, and since attention is
        causal no real position sees a pad, so each window scores as it would alone.

        Returns:
            Flat CPU tensors, window after window, each window's targets ``first..`` in order.
        """
        T = max(len(w.ids) for w in windows)
        pad = self.tokenizer.eot_id
        rows_in = [w.ids + [pad] * (T - len(w.ids)) for w in windows]
        ids = torch.tensor(rows_in, dtype=torch.long, device=self.device)  # (B, T)
        hidden = self.model.hidden(ids).reshape(-1, self.model.config.n_embd)  # (B*T, C)
        rows = [b * T + j for b, w in enumerate(windows) for j in range(w.first, len(w.ids))]
        targets = [t for w in windows for t in w.targets[w.first :]]
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        targets_t = torch.tensor(targets, dtype=torch.long, device=self.device)
        return self._logprobs(hidden.index_select(0, rows_t), targets_t, want_ranks)

    def _logprobs(
        self, hidden: torch.Tensor, targets: torch.Tensor, want_ranks: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-probability (and rank and entropy) of each target under the lm_head, a few rows at a time.

        hidden: (N, C), targets: (N,). The logits (rows x vocab) are never all materialised.
        """
        step = logit_rows(self.model)
        logprobs, ranks, entropies = [], [], []
        for i in range(0, hidden.shape[0], step):
            logits = self.model.logits(hidden[i : i + step]).float()  # (n, V), log-softmax in fp32
            tgt = targets[i : i + step, None]
            picked = logits.gather(1, tgt)  # (n, 1)
            norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
            logprobs.append((picked - norm).squeeze(1))
            if want_ranks:
                ranks.append((logits > picked).sum(dim=1) + 1)
                entropies.append(entropy(logits - norm))
        lp = torch.cat(logprobs).cpu()
        if not want_ranks:
            return lp, None, None
        return lp, torch.cat(ranks).cpu(), torch.cat(entropies).cpu()
