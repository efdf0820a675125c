"""The token-level generation loop: prefill once, decode one token per step, per-row EOS,
limits, and the window slide. It knows token ids only, never strings.

GPT-2 has learned absolute positions, so once the window (n_positions) is full the engine
keeps the most recent half of the tokens and prefills them again from position 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from gpt2cli.config import GenerationConfig
from gpt2cli.device import synchronize
from gpt2cli.kvcache import KVCache
from gpt2cli.model import GPT2
from gpt2cli.sampling import Sampler, make_sampler


@dataclass
class EngineStats:
    """Token counts and seconds of one generation (prefill = the prompt's forward pass)."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0  # tokens actually run (the rest came from the cache)
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    window_slides: int = 0
    draft_proposed: int = 0  # speculative decoding: draft tokens proposed / kept by the target
    draft_accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Fraction of draft tokens the target kept (None without a draft model)."""
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else None


@dataclass
class TokenStream:
    """An in-progress generation; iterate it for one list per step.

    Each list holds, per sample, the new token id, or None once that sample has finished.
    ``stop(i)`` ends sample i early (e.g. a stop string matched in its text).
    """

    engine: Engine
    prompt_ids: list[int]
    cfg: GenerationConfig
    eos_id: int | None
    generator: torch.Generator | None = None
    finish_reasons: list[str | None] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)

    def __post_init__(self) -> None:
        self.finish_reasons = [None] * self.cfg.num_samples
        self._sampler: Sampler = make_sampler(self.cfg)

    def stop(self, sample: int, reason: str = "stop") -> None:
        if self.finish_reasons[sample] is None:
            self.finish_reasons[sample] = reason

    def __iter__(self) -> Iterator[list[int | None]]:
        return self._run()

    def _run(self) -> Iterator[list[int | None]]:
        engine, cfg, n = self.engine, self.cfg, self.cfg.num_samples
        device = engine.device
        t0 = time.perf_counter()
        logits, cache = engine.start(self.prompt_ids, n, cfg.max_new_tokens)
        synchronize(device)
        self.stats.prompt_tokens = len(self.prompt_ids)
        self.stats.prefill_tokens = engine.last_prefill_tokens
        self.stats.prefill_seconds = time.perf_counter() - t0
        rows = list(range(n))  # batch row -> sample index, shrinks as samples finish
        prompt = torch.tensor(self.prompt_ids, device=device, dtype=torch.long)
        history = prompt.unsqueeze(0).expand(n, -1)  # (B, T) prompt + generated, for penalties
        t_decode = time.perf_counter()
        for step in range(cfg.max_new_tokens):
            with torch.inference_mode():
                next_ids = self._sampler(logits, history, self.generator)  # (B,)
            out: list[int | None] = [None] * n
            for row, token in enumerate(next_ids.tolist()):
                sample = rows[row]
                out[sample] = token
                if token == self.eos_id and not cfg.ignore_eos:
                    self.finish_reasons[sample] = "eos"
            self.stats.generated_tokens += len(rows)
            yield out
            if step == cfg.max_new_tokens - 1:
                break
            keep = [r for r, s in enumerate(rows) if self.finish_reasons[s] is None]
            if not keep:
                break
            history = torch.cat([history, next_ids.unsqueeze(1)], dim=1)
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.keep_rows(index)
                history, next_ids = history[index], next_ids[index]
                rows = [rows[r] for r in keep]
            logits = engine.step(next_ids, history, cache, self.stats)
        for s in range(n):
            if self.finish_reasons[s] is None:
                self.finish_reasons[s] = "length"
        synchronize(device)
        self.stats.decode_seconds = time.perf_counter() - t_decode
        engine.finish(cache, n)


class Engine:
    """Runs a GPT2 model over token ids, keeping the KV cache between calls.

    The cache of a single-sample run is kept with the ids it holds, so a later prompt that
    starts with those ids (the next REPL turn) pays only for its new tokens.
    """

    def __init__(self, model: GPT2) -> None:
        self.model = model
        self.window = model.config.n_positions
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []
        self.last_prefill_tokens = 0
        # One decode step: ids (B, 1) into the cache -> logits (B, vocab). fastpath may swap in
        # a compiled static-shape version.
        self.decode_one: Callable[[torch.Tensor, KVCache], torch.Tensor] = self._decode_eager

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    def generate(
        self,
        prompt_ids: list[int],
        cfg: GenerationConfig,
        *,
        eos_id: int | None,
        generator: torch.Generator | None = None,
    ) -> TokenStream:
        """Start generating after ``prompt_ids`` (at most one window long)."""
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if len(prompt_ids) > self.window:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds the window")
        return TokenStream(self, list(prompt_ids), cfg, eos_id, generator)

    @torch.inference_mode()
    def prefill(self, ids: list[int], extra_capacity: int = 0) -> torch.Tensor:
        """Run ``ids`` into the single-row cache, reusing its longest shared prefix.

        Returns the last position's logits (1, vocab).
        """
        common = 0
        if self.cache is None or len(self.cached_ids) != self.cache.length:
            self.cached_ids = []  # an interrupted step left them out of step with the cache
        limit = min(len(self.cached_ids), len(ids) - 1)  # feed at least one token
        while common < limit and self.cached_ids[common] == ids[common]:
            common += 1
        if self.cache is None or self.cache.batch != 1:
            self.cache = self.model.new_cache(1, len(ids) + extra_capacity)
        self.cache.truncate(common)
        self.cached_ids = []  # invalid until the forward pass has succeeded
        new = torch.tensor([ids[common:]], device=self.device, dtype=torch.long)
        logits = self.model(new, self.cache, last_only=True)
        self.cached_ids = list(ids)
        self.last_prefill_tokens = len(ids) - common
        return logits

    def start(self, ids: list[int], n: int, max_new: int) -> tuple[torch.Tensor, KVCache]:
        """Prefill once and fan out to ``n`` samples: (logits (n, vocab), cache of n rows)."""
        logits = self.prefill(ids, extra_capacity=max_new)
        assert self.cache is not None
        if n == 1:
            return logits, self.cache
        with torch.inference_mode():
            return logits.expand(n, -1), self.cache.expand(n)

    @torch.inference_mode()
    def step(
        self, next_ids: torch.Tensor, history: torch.Tensor, cache: KVCache, stats: EngineStats
    ) -> torch.Tensor:
        """Feed one token per row (B,); slide the window first when it is full."""
        if cache.length >= self.window:
            keep = self.window // 2
            recent = history[:, -keep:]
            cache.reset()
            stats.window_slides += 1
            logits = self.model(recent, cache, last_only=True)
            if cache is self.cache:
                self.cached_ids = history[0, -keep:].tolist()
            return logits
        logits = self.decode_one(next_ids.unsqueeze(1), cache)
        if cache is self.cache:
            self.cached_ids.append(int(next_ids[0]))
        return logits

    def _decode_eager(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model(ids, cache, last_only=True)

    def finish(self, cache: KVCache, n: int) -> None:
        """After a run: a multi-sample cache is dropped; the single-row one stays reusable."""
        if n == 1 and cache is not self.cache:
            self.cache, self.cached_ids = None, []

    def reset(self) -> None:
        self.cache, self.cached_ids = None, []
