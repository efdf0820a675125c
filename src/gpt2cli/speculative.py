"""Speculative decoding: a small draft model proposes k tokens, the target verifies them in one pass.

Greedy: a proposal is kept while it equals the target's argmax, so the output is exactly the
target's greedy output. Sampling: the standard rule (Leviathan et al. 2023, Chen et al. 2023):
keep proposal d with probability min(1, p(d)/q(d)); on the first rejection draw from
normalise(max(0, p - q)); when all k are kept, draw one bonus token from p. The tokens then
follow the target's (processed) distribution p exactly. One sample (batch 1) only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gpt2cli.config import GenerationConfig
from gpt2cli.device import synchronize
from gpt2cli.engine import Engine, EngineStats
from gpt2cli.kvcache import KVCache
from gpt2cli.sampling import process_logits


@dataclass
class SpeculativeStream:
    """Same interface as engine.TokenStream (iterate for one list per token; ``stop``)."""

    target: Engine
    draft: Engine
    prompt_ids: list[int]
    cfg: GenerationConfig
    eos_id: int | None
    k: int = 4
    generator: torch.Generator | None = None
    finish_reasons: list[str | None] = field(default_factory=lambda: [None])
    stats: EngineStats = field(default_factory=EngineStats)

    def stop(self, sample: int, reason: str = "stop") -> None:
        if self.finish_reasons[sample] is None:
            self.finish_reasons[sample] = reason

    def __iter__(self) -> Iterator[list[int | None]]:
        return self._run()

    def _probs(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """Processed next-token distribution (V,) given the tokens so far (greedy: one-hot)."""
        prev = torch.tensor([history], device=logits.device)
        out = process_logits(logits.float().reshape(1, -1), prev, self.cfg)[0]
        if self.cfg.greedy:
            return torch.nn.functional.one_hot(out.argmax(), out.shape[-1]).float()
        return out.softmax(dim=-1)

    def _draw(self, probs: torch.Tensor) -> int:
        if self.cfg.greedy:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _emit(self, token: int) -> bool:
        """Account one generated token; True when generation must end after it."""
        self.stats.generated_tokens += 1
        if token == self.eos_id and not self.cfg.ignore_eos:
            self.finish_reasons[0] = "eos"
        return self.finish_reasons[0] is not None or self.stats.generated_tokens >= self.cfg.max_new_tokens

    @torch.inference_mode()
    def _run(self) -> Iterator[list[int | None]]:
        cfg, k, device = self.cfg, self.k, self.target.device
        t0 = time.perf_counter()
        extra = cfg.max_new_tokens + k + 1
        target_logits = self.target.prefill(self.prompt_ids, extra_capacity=extra)
        draft_logits = self.draft.prefill(self.prompt_ids, extra_capacity=extra)
        synchronize(device)
        self.stats.prompt_tokens = len(self.prompt_ids)
        self.stats.prefill_tokens = self.target.last_prefill_tokens
        self.stats.prefill_seconds = time.perf_counter() - t0
        tcache, dcache = self.target.cache, self.draft.cache
        assert tcache is not None and dcache is not None
        history = list(self.prompt_ids)
        t_decode = time.perf_counter()
        x = self._draw(self._probs(target_logits, history))  # not yet in either cache
        pending = [x]  # tokens the draft has not consumed yet
        done = self._emit(x)
        yield [x]
        del draft_logits
        while not done:
            history.append(x)
            proposals, q = self._propose(pending, history, dcache, k)
            base = tcache.length
            feed = torch.tensor([[x, *proposals]], device=device)
            p_logits = self.target.model(feed, tcache)[0]  # (k+1, V)
            accepted, nxt = self._verify(p_logits, proposals, q, history)
            self.stats.draft_proposed += k
            self.stats.draft_accepted += accepted
            tcache.truncate(base + 1 + accepted)  # x and the kept proposals
            # The draft consumed x, d1..d(k-1); keep what the target kept.
            dcache.truncate(min(dcache.length, base + 1 + accepted))
            new = [*proposals[:accepted], nxt]
            pending = [nxt] if accepted < k else [proposals[-1], nxt]
            for token in new:
                done = self._emit(token)
                yield [token]
                if done:
                    break
                history.append(token)
            history.pop()  # the last token is fed as x next round
            x = new[-1]
        synchronize(device)
        self.stats.decode_seconds = time.perf_counter() - t_decode
        self.target.reset()  # the caches no longer match cached_ids
        self.draft.reset()

    def _propose(
        self, pending: list[int], history: list[int], dcache: KVCache, k: int
    ) -> tuple[list[int], list[torch.Tensor]]:
        """k draft tokens after ``history``, and the draft's distribution for each."""
        proposals: list[int] = []
        q: list[torch.Tensor] = []
        feed = pending
        for _ in range(k):
            logits = self.draft.model(torch.tensor([feed], device=self.target.device), dcache, last_only=True)
            probs = self._probs(logits[0], history + proposals)
            d = self._draw(probs)
            proposals.append(d)
            q.append(probs)
            feed = [d]
        return proposals, q

    def _verify(
        self, p_logits: torch.Tensor, proposals: list[int], q: list[torch.Tensor], history: list[int]
    ) -> tuple[int, int]:
        """(number of proposals kept, the token that follows them)."""
        for j, d in enumerate(proposals):
            p = self._probs(p_logits[j], history + proposals[:j])
            if self.cfg.greedy:
                if int(p.argmax()) != d:
                    return j, int(p.argmax())
                continue
            ratio = float(p[d] / q[j][d]) if float(q[j][d]) > 0 else 0.0
            u = float(torch.rand((), generator=self.generator, device=p.device))
            if u >= min(1.0, ratio):
                residual = (p - q[j]).clamp(min=0)
                total = float(residual.sum())
                return j, self._draw(residual / total) if total > 0 else self._draw(p)
        bonus = self._probs(p_logits[len(proposals)], history + proposals)
        return len(proposals), self._draw(bonus)
