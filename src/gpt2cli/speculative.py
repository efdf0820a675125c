"""Speculative decoding: the engine's token source when a draft model is set.

A small draft model proposes k tokens; the target scores them all in one forward (the same
``GPT2.forward`` with positions that every other path uses) and keeps a prefix. Greedy: a
proposal is kept while it equals the target's argmax, so the output is exactly the target's
greedy output. Sampling: the standard rule (Leviathan et al. 2023, Chen et al. 2023): keep
proposal d with probability min(1, p(d)/q(d)); on the first rejection draw from
normalise(max(0, p - q)); when all k are kept, draw one bonus token from p. The tokens then
follow the target's (processed) distribution p exactly.

Each accepted token goes through ``Engine.accept`` one at a time, so EOS and the token limit
end a round where they fall, and a caller's stop (a stop string) ends the sequence before the
next round: never more than one round of target work past a stop. Rounds never propose past
the window's last position, and the window slides where and as the plain path slides it, so
greedy output equals plain greedy output also across slides (when the draft's window is
not the smaller one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gpt2cli.kvcache import KVCache, reusable_prefix
from gpt2cli.logprobs import TokenLogprob, step_logprobs
from gpt2cli.model import GPT2
from gpt2cli.sampling import first_argmax, process_logits

if TYPE_CHECKING:
    from gpt2cli.engine import DecodeFn, Engine, Request, Sequence, TokenEvent


class Speculator:
    """The draft model's cache and the draft-and-verify round of one engine (one sequence)."""

    def __init__(self, engine: Engine, draft: GPT2, k: int, decode: DecodeFn | None = None) -> None:
        if k < 1:
            raise ValueError("draft_tokens must be at least 1")
        self.engine = engine
        self.draft = draft
        self.k = k
        self.decode = decode
        self.window = min(engine.window, draft.config.n_positions)
        self.kv: KVCache | None = None
        self.kv_ids: list[int] = []  # ids whose keys/values the draft's cache holds

    def prefill(self, prompt: list[int], start: int, end: int) -> None:
        """The target has prefilled ``prompt[start:end]``: bring the draft up to ``end`` too."""
        self._sync(prompt[:end])

    def _sync(self, ids: list[int]) -> torch.Tensor | None:
        """Feed the draft whatever of ``ids`` its cache lacks; the last position's logits."""
        common = reusable_prefix(self.kv_ids, ids)
        del self.kv_ids[common:]
        feed = ids[common:]
        if self.kv is None or self.kv.capacity < len(ids):
            capacity = self.window if self.decode is not None else max(len(ids) * 2, 64)
            kv = self.draft.new_cache(1, capacity)
            if self.kv is not None:
                kv.copy_row(0, 0, common, source=self.kv)
            self.kv = kv
        device = self.engine.device
        x = torch.tensor([feed], device=device)
        pos = torch.arange(common, common + len(feed), device=device)[None, :]
        if self.decode is not None and len(feed) == 1:
            self.draft.forward_tokens += 1
            logits = self.decode(x, pos, self.kv)
            if self.engine.active and not getattr(self.decode, "failed", False):
                self.engine.active[0].request.stats.compiled_steps += 1
        else:
            logits = self.draft(x, pos, self.kv, last_only=True)  # (1, V)
        self.kv_ids.extend(feed)
        return logits[0]

    def round(self, seq: Sequence) -> list[TokenEvent]:
        """One draft-and-verify round for ``seq``: the tokens it accepts, in order."""
        engine, request = self.engine, seq.request
        if len(seq.kv_ids) >= self.window:  # where the plain path slides, and as it does
            engine.slide(seq, 0, self.window // 2)
            self.kv_ids = []  # the draft refills from the slid tokens below
        # No proposal may pass the window's last position: every token then sees the same
        # context as in plain decoding (a round of 0 proposals is one plain decode step).
        k = min(self.k, self.window - 1 - len(seq.kv_ids))
        assert seq.pending is not None
        kv = engine.reserve(len(seq.kv_ids) + k + 1)
        base = list(seq.kv_ids)
        proposals, q = self._propose(base + [seq.pending], seq.history, request, k)
        feed = [seq.pending, *proposals]
        device = engine.device
        pos = torch.arange(len(base), len(base) + k + 1, device=device)[None, :]
        p_logits = engine.model(torch.tensor([feed], device=device), pos, kv)[0]  # (k+1, V)
        accepted, nxt = self._verify(p_logits, proposals, q, seq.history, request)
        request.stats.draft_proposed += k
        request.stats.draft_accepted += accepted
        seq.kv_ids.extend(feed[: accepted + 1])  # the pending token and the kept proposals
        tokens = [*proposals[:accepted], nxt]
        entries: list[TokenLogprob | None] = [None] * len(tokens)
        if request.logprobs is not None:
            chosen = torch.tensor(tokens, device=device)
            entries = list(step_logprobs(p_logits[: len(tokens)], chosen, request.logprobs))
        events = []
        for token, entry in zip(tokens, entries, strict=True):
            events.append(engine.accept(seq, token, entry))
            if seq.finished:
                break
        return events

    def _propose(
        self, ids: list[int], history: list[int], request: Request, k: int
    ) -> tuple[list[int], list[torch.Tensor]]:
        """k draft tokens after ``ids`` (the target's tokens so far), with the draft's distributions."""
        proposals: list[int] = []
        q: list[torch.Tensor] = []
        context = list(ids)
        for _ in range(k):
            logits = self._sync(context)
            assert logits is not None
            probs = _probs(logits, history + proposals, request)
            d = _draw(probs, request)
            proposals.append(d)
            q.append(probs)
            context.append(d)
        return proposals, q

    def _verify(
        self,
        p_logits: torch.Tensor,
        proposals: list[int],
        q: list[torch.Tensor],
        history: list[int],
        request: Request,
    ) -> tuple[int, int]:
        """(number of proposals kept, the token that follows them)."""
        greedy = request.cfg.greedy
        for j, d in enumerate(proposals):
            p = _probs(p_logits[j], history + proposals[:j], request)
            if greedy:
                if _top(p) != d:
                    return j, _top(p)
                continue
            ratio = float(p[d] / q[j][d]) if float(q[j][d]) > 0 else 0.0
            u = float(torch.rand((), generator=request.generator, device=p.device))
            if u >= min(1.0, ratio):
                residual = (p - q[j]).clamp(min=0)
                total = float(residual.sum())
                return j, _draw(residual / total, request) if total > 0 else _draw(p, request)
        bonus = _probs(p_logits[len(proposals)], history + proposals, request)
        return len(proposals), _draw(bonus, request)


def _probs(logits: torch.Tensor, history: list[int], request: Request) -> torch.Tensor:
    """Processed next-token distribution (V,) given the tokens so far (greedy: one-hot)."""
    prev = torch.tensor([history], device=logits.device)
    out = process_logits(logits.float().reshape(1, -1), prev, request.cfg)[0]
    if request.cfg.greedy:
        return torch.nn.functional.one_hot(torch.tensor(_top(out), device=out.device), out.shape[-1]).float()
    return out.softmax(dim=-1)


def _draw(probs: torch.Tensor, request: Request) -> int:
    if request.cfg.greedy:
        return _top(probs)
    return int(torch.multinomial(probs, 1, generator=request.generator))


def _top(scores: torch.Tensor) -> int:
    """The first index of the largest of ``scores`` (V,), as the plain greedy step picks it."""
    return int(first_argmax(scores.reshape(1, -1))[0])
