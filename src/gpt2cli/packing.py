"""Scoring many documents at once: their windows packed into shared batches.

One responsibility: throughput on many (often short) documents, with each document's numbers
those of ``scoring.Scorer`` on that text alone. Each document is cut into the method's windows
by ``scoring.windows`` (``<|endoftext|>`` prefix, ``context``, ``stride``); the windows of a
group of ``lookahead`` documents are sorted by length (longest first) and cut into batches of
at most ``batch_tokens`` padded tokens, so that a batch holds hundreds of short documents or a
few long windows and padding stays small. Results come back in input order, each as soon as
it and every document before it are done.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch

from gpt2cli.scoring import (
    ScoreInputError,
    Scorer,
    ScoreResult,
    TextStats,
    Window,
    _Tracker,
    windows,
)

DEFAULT_LOOKAHEAD = 256  # documents whose windows are sorted and packed together
MAX_PADDING, PADDING_TOKENS = 0.25, 64
"""A window padded by more than both (a share of its batch's longest, a token count) starts a
new batch; short documents still share a batch whatever their lengths. Padding costs
more than its share of tokens: attention grows with the square of the padded length, and a
300-token document padded to a 1024-token window made packed scoring slower than scoring one
document at a time (433 vs 541 tok/s on mixed lengths, benchmarks/batch_score.py)."""


@dataclass
class _Doc:
    """One document of a group: its windows, and each window's results once it has run."""

    name: str
    windows: list[Window]
    stats: TextStats
    logprobs: list[torch.Tensor | None] = field(default_factory=list)
    ranks: list[torch.Tensor | None] = field(default_factory=list)
    entropies: list[torch.Tensor | None] = field(default_factory=list)
    pending: int = 0


class PackedScorer:
    """Scores an iterable of texts with a ``Scorer``, packing their windows into batches."""

    def __init__(self, scorer: Scorer, *, lookahead: int = DEFAULT_LOOKAHEAD, batch_tokens: int = 0) -> None:
        """``batch_tokens`` (padded tokens per forward) defaults to the scorer's batch of full windows."""
        self.scorer = scorer
        self.lookahead = max(1, lookahead)
        self.batch_tokens = batch_tokens or scorer.batch_size * scorer.context

    def score_many(
        self, texts: Iterable[str | bytes], *, errors: str = "strict", per_token: bool = False
    ) -> Iterator[ScoreResult | ScoreInputError]:
        """One result per text, in input order (``file`` is ``<text N>``, N counting from 0).

        A text that cannot be scored (empty, or not UTF-8 with ``errors="strict"``) yields its
        ``ScoreInputError`` in its place, so one bad document does not end the iteration.
        """
        source = iter(texts)
        start = 0
        while group := list(islice(source, self.lookahead)):
            docs = [self._prepare(f"<text {start + i}>", text, errors) for i, text in enumerate(group)]
            yield from self._score_group(docs, per_token)
            start += len(group)

    def _prepare(self, name: str, text: str | bytes, errors: str) -> _Doc | ScoreInputError:
        """The document's windows, by exactly the path ``Scorer.score`` takes for one text."""
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        stats = TextStats()
        tokenizer, scorer = self.scorer.tokenizer, self.scorer
        try:
            cut = list(
                windows(tokenizer, io.BytesIO(data), name, errors, scorer.context, scorer.stride, stats, [0])
            )
        except ScoreInputError as exc:
            return exc
        if stats.bytes == 0:
            return ScoreInputError(f"{name} is empty", hint="give some text to score")
        n = len(cut)
        return _Doc(name, cut, stats, [None] * n, [None] * n, [None] * n, pending=n)

    def _score_group(
        self, docs: list[_Doc | ScoreInputError], per_token: bool
    ) -> Iterator[ScoreResult | ScoreInputError]:
        # (document, window) pairs, longest window first; the sort is stable, so it is deterministic.
        items = [(d, k) for d in docs if isinstance(d, _Doc) for k in range(len(d.windows))]
        items.sort(key=lambda item: -_length(item))
        done = 0  # documents yielded so far
        for batch in self._batches(items):
            scored = self.scorer.window_logprobs([d.windows[k] for d, k in batch], per_token)
            logprobs, ranks, entropies = scored
            sizes = [len(d.windows[k].ids) - d.windows[k].first for d, k in batch]
            lp_parts = logprobs.split(sizes)
            rank_parts = ranks.split(sizes) if ranks is not None else [None] * len(batch)
            ent_parts = entropies.split(sizes) if entropies is not None else [None] * len(batch)
            for (doc, k), lp, rank, ent in zip(batch, lp_parts, rank_parts, ent_parts, strict=True):
                doc.logprobs[k], doc.ranks[k], doc.entropies[k] = lp, rank, ent
                doc.pending -= 1
            while done < len(docs) and _ready(docs[done]):
                yield self._result(docs[done], per_token)
                done += 1
        for rest in docs[done:]:  # only errors (no windows) can be left
            yield self._result(rest, per_token)

    def _batches(self, items: list[tuple[_Doc, int]]) -> Iterator[list[tuple[_Doc, int]]]:
        """Runs of the length-sorted items whose padded size (rows x longest) fits the budget,
        none padded by more than ``MAX_PADDING`` of the longest and ``PADDING_TOKENS``."""
        batch: list[tuple[_Doc, int]] = []
        longest = 0
        for item in items:
            length = _length(item)
            too_big = (len(batch) + 1) * longest > self.batch_tokens
            padded = longest - length > max(PADDING_TOKENS, longest * MAX_PADDING)
            if batch and (too_big or padded):
                yield batch
                batch = []
            if not batch:
                longest = length
            batch.append(item)
        if batch:
            yield batch

    def _result(self, doc: _Doc | ScoreInputError, per_token: bool) -> ScoreResult | ScoreInputError:
        if isinstance(doc, ScoreInputError):
            return doc
        total_nll, tokens = 0.0, 0
        tracker = _Tracker(self.scorer.tokenizer, per_token, 0, None)
        for window, lp, rank, ent in zip(doc.windows, doc.logprobs, doc.ranks, doc.entropies, strict=True):
            assert lp is not None
            total_nll += -float(lp.double().sum())
            tokens += lp.numel()
            if per_token:
                assert rank is not None and ent is not None
                tracker.add_windows([window], lp, rank, ent)
        return ScoreResult(
            file=doc.name,
            tokens=tokens,
            bytes=doc.stats.bytes,
            words=doc.stats.words,
            total_nll=total_nll,
            context=self.scorer.context,
            stride=self.scorer.stride,
            token_scores=tracker.tokens,
        )


def _ready(doc: _Doc | ScoreInputError) -> bool:
    return isinstance(doc, ScoreInputError) or doc.pending == 0


def _length(item: tuple[_Doc, int]) -> int:
    """Input tokens of the window ``item`` names."""
    doc, k = item
    return len(doc.windows[k].ids)
