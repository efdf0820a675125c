"""Two models over the same tokens: per-token Δlogprob, KL(A‖B), top-1 agreement, cross-perplexity.

One responsibility: the comparison, read over ``gpt2 score``'s windows (the same
``<|endoftext|>`` prefix, context and stride, so every token is compared exactly once, with the
same left context under both models). Per token, with p_A and p_B the two next-token
distributions: Δlogprob = log p_B(token) - log p_A(token), KL(A‖B) = Σ p_A (log p_A - log p_B),
cross-entropy H(A, B) = -Σ p_A log p_B. Totals: mean KL, both perplexities, their difference
and ratio, the fraction of positions with the same top-1 token, the cross-perplexity
X-PPL = exp(mean H(A, B)) and Binoculars' score log PPL_A / log X-PPL (Hans et al., 2024).
Definitions and references: docs/inspect.md.
"""

from __future__ import annotations

import codecs
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from gpt2cli.errors import BadInputError
from gpt2cli.model import GPT2
from gpt2cli.scoring import (
    Progress,
    ScoreInputError,
    TextStats,
    Window,
    check_windows,
    logit_rows,
    open_source,
    windows,
)
from gpt2cli.tokenizer import Tokenizer


def check_same_tokenizer(
    a: Tokenizer, b: Tokenizer, a_vocab: int, b_vocab: int, names: tuple[str, str]
) -> None:
    """Two models can be compared only over one tokenization and one output vocabulary.

    Raises:
        BadInputError: different tokenizers or lm_head sizes.
    """
    same = a.n_vocab == b.n_vocab and a_vocab == b_vocab
    same = same and all(a.token_bytes(i) == b.token_bytes(i) for i in range(a.n_vocab))
    if not same:
        raise BadInputError(
            f"{names[0]} and {names[1]} have different vocabularies "
            f"({a.n_vocab} and {b.n_vocab} tokens, lm_head {a_vocab} and {b_vocab})",
            hint="compare models that share GPT-2's tokenizer (the GPT-2 family and its fine-tunes)",
        )


@dataclass(frozen=True)
class TokenDiff:
    """One token under both models: log-probabilities, KL(A‖B) and each model's top-1 token."""

    position: int
    id: int
    text: str
    logprob_a: float
    logprob_b: float
    kl: float
    top1_a: int
    top1_b: int

    @property
    def delta_logprob(self) -> float:
        """log p_B - log p_A of the actual token: positive where B finds it likelier."""
        return self.logprob_b - self.logprob_a

    @property
    def same_top1(self) -> bool:
        return self.top1_a == self.top1_b

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "id": self.id,
            "text": self.text,
            "logprob_a": self.logprob_a,
            "logprob_b": self.logprob_b,
            "delta_logprob": self.delta_logprob,
            "kl": self.kl,
            "top1_a": self.top1_a,
            "top1_b": self.top1_b,
            "same_top1": self.same_top1,
        }


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass
class CompareResult:
    """Sums over the compared tokens of one input (or several), and the totals derived from them."""

    file: str
    model_a: str
    model_b: str
    tokens: int
    total_nll_a: float
    total_nll_b: float
    total_kl: float
    total_cross_entropy: float  # Σ H(A, B) = Σ -p_A · log p_B
    same_top1: int
    context: int
    stride: int
    seconds: float = 0.0
    token_diffs: list[TokenDiff] = field(default_factory=list, repr=False)

    def _mean(self, total: float) -> float:
        return total / self.tokens if self.tokens else math.nan

    @property
    def mean_kl(self) -> float:
        return self._mean(self.total_kl)

    @property
    def perplexity_a(self) -> float:
        return _exp(self._mean(self.total_nll_a))

    @property
    def perplexity_b(self) -> float:
        return _exp(self._mean(self.total_nll_b))

    @property
    def delta_perplexity(self) -> float:
        """PPL_B - PPL_A."""
        return self.perplexity_b - self.perplexity_a

    @property
    def perplexity_ratio(self) -> float:
        """PPL_B / PPL_A = exp(mean NLL_B - mean NLL_A)."""
        return _exp(self._mean(self.total_nll_b - self.total_nll_a))

    @property
    def same_top1_fraction(self) -> float:
        return self.same_top1 / self.tokens if self.tokens else math.nan

    @property
    def cross_perplexity(self) -> float:
        """X-PPL_{A,B} = exp(mean over positions of -Σ p_A log p_B)."""
        return _exp(self._mean(self.total_cross_entropy))

    @property
    def binoculars(self) -> float:
        """log PPL_A / log X-PPL_{A,B}: Binoculars' score with A as the observer's log-perplexity."""
        return self.total_nll_a / self.total_cross_entropy if self.total_cross_entropy else math.nan

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "file": self.file,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "tokens": self.tokens,
            "mean_kl": self.mean_kl,
            "perplexity_a": self.perplexity_a,
            "perplexity_b": self.perplexity_b,
            "delta_perplexity": self.delta_perplexity,
            "perplexity_ratio": self.perplexity_ratio,
            "same_top1": self.same_top1_fraction,
            "cross_perplexity": self.cross_perplexity,
            "binoculars": self.binoculars,
            "nll_a": self._mean(self.total_nll_a),
            "nll_b": self._mean(self.total_nll_b),
            "context": self.context,
            "stride": self.stride,
            "seconds": round(self.seconds, 6),
        }
        if self.token_diffs:
            obj["per_token"] = [t.to_json() for t in self.token_diffs]
        return obj


def total(results: list[CompareResult], name: str = "total") -> CompareResult:
    """The pooled comparison of several inputs."""
    first = results[0]
    return CompareResult(
        file=name,
        model_a=first.model_a,
        model_b=first.model_b,
        tokens=sum(r.tokens for r in results),
        total_nll_a=sum(r.total_nll_a for r in results),
        total_nll_b=sum(r.total_nll_b for r in results),
        total_kl=sum(r.total_kl for r in results),
        total_cross_entropy=sum(r.total_cross_entropy for r in results),
        same_top1=sum(r.same_top1 for r in results),
        context=first.context,
        stride=first.stride,
        seconds=sum(r.seconds for r in results),
    )


@dataclass
class _Sums:
    tokens: int = 0
    nll_a: float = 0.0
    nll_b: float = 0.0
    kl: float = 0.0
    cross_entropy: float = 0.0
    same_top1: int = 0


class Comparer:
    """Runs two models over the same windows of a text and compares them token by token."""

    def __init__(
        self,
        model_a: GPT2,
        model_b: GPT2,
        tokenizer: Tokenizer,
        *,
        names: tuple[str, str],
        context: int,
        stride: int,
    ) -> None:
        check_windows(context, stride, min(model_a.config.n_positions, model_b.config.n_positions))
        self.a, self.b, self.tokenizer, self.names = model_a, model_b, tokenizer, names
        self.context, self.stride = context, stride

    def compare(
        self,
        source: os.PathLike[str] | IO[bytes],
        *,
        name: str | None = None,
        errors: str = "strict",
        per_token: bool = False,
        on_token: Callable[[TokenDiff], None] | None = None,
        progress: Progress | None = None,
    ) -> CompareResult:
        """Compare the two models over a file or a binary stream.

        Args:
            per_token: keep every token's ``TokenDiff`` in ``result.token_diffs``.
            on_token: called with each token's diff, in order, as it is computed.
            progress: called with (bytes read, tokens compared) after each window.

        Raises:
            ScoreInputError: unreadable, empty or invalid-UTF-8 input.
        """
        if errors not in ("strict", "replace"):
            raise BadInputError(f"unknown --errors {errors!r}", hint="use strict or replace")
        stream, shown, opened = open_source(source)
        name = name or shown
        t0 = time.perf_counter()
        stats, read, sums = TextStats(), [0], _Sums()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        kept: list[TokenDiff] = []
        try:
            for window in windows(
                self.tokenizer, stream, name, errors, self.context, self.stride, stats, read
            ):
                for diff in self._window(window, sums, decoder):
                    if per_token:
                        kept.append(diff)
                    if on_token is not None:
                        on_token(diff)
                if progress:
                    progress(read[0], sums.tokens)
        finally:
            if opened:
                stream.close()
        if stats.bytes == 0:
            raise ScoreInputError(f"{name} is empty", hint="give some text to compare")
        return CompareResult(
            file=name,
            model_a=self.names[0],
            model_b=self.names[1],
            tokens=sums.tokens,
            total_nll_a=sums.nll_a,
            total_nll_b=sums.nll_b,
            total_kl=sums.kl,
            total_cross_entropy=sums.cross_entropy,
            same_top1=sums.same_top1,
            context=self.context,
            stride=self.stride,
            seconds=time.perf_counter() - t0,
            token_diffs=kept,
        )

    @torch.inference_mode()
    def _window(self, window: Window, sums: _Sums, decoder: codecs.IncrementalDecoder) -> list[TokenDiff]:
        """Compare the scored rows of one window; add them to ``sums``."""
        ids = torch.tensor([window.ids], dtype=torch.long)  # (1, T)
        h_a = self.a.hidden(ids.to(self.a.device))[0, window.first :]  # (n, C)
        h_b = self.b.hidden(ids.to(self.b.device))[0, window.first :]
        targets = torch.tensor(window.targets[window.first :], dtype=torch.long, device=self.a.device)
        rows = compare_rows(self.a, self.b, h_a, h_b, targets)
        diffs = []
        for j, (lp_a, lp_b, kl, xent, top_a, top_b) in enumerate(
            zip(*(r.tolist() for r in rows), strict=True)
        ):
            token = window.targets[window.first + j]
            text = decoder.decode(self.tokenizer.token_bytes(token))
            diffs.append(
                TokenDiff(window.begin + window.first + j, token, text, lp_a, lp_b, kl, top_a, top_b)
            )
            sums.nll_a -= lp_a
            sums.nll_b -= lp_b
            sums.kl += kl
            sums.cross_entropy += xent
            sums.same_top1 += top_a == top_b
        sums.tokens += len(diffs)
        return diffs


def compare_rows(
    a: GPT2, b: GPT2, h_a: torch.Tensor, h_b: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Per row of the hidden states (n, C) of both models, on the CPU, each (n,):
    (log p_A(target), log p_B(target), KL(A‖B), H(A, B), argmax p_A, argmax p_B).

    Logits are made a few rows at a time (never n x vocab at once), in float32.
    """
    step = min(logit_rows(a), logit_rows(b))
    parts: list[list[torch.Tensor]] = [[] for _ in range(6)]
    for i in range(0, h_a.shape[0], step):
        la = a.logits(h_a[i : i + step]).float().log_softmax(-1)  # (n, V)
        lb = b.logits(h_b[i : i + step]).float().log_softmax(-1).to(la.device)
        p = la.exp()
        tgt = targets[i : i + step, None]
        finite_b = lb.clamp(min=torch.finfo(lb.dtype).min)  # -inf under B: a huge finite penalty
        kl = torch.where(p > 0, p * (la - finite_b), 0.0).sum(-1)
        xent = -(p * finite_b).sum(-1)
        values = (la.gather(1, tgt)[:, 0], lb.gather(1, tgt)[:, 0], kl, xent, la.argmax(-1), lb.argmax(-1))
        for part, value in zip(parts, values, strict=True):
            part.append(value.cpu())
    return tuple(torch.cat(part) for part in parts)
