"""The one token-level generation engine: sequences that join and leave a running batch.

Every path that generates runs here: ``LM.stream`` (one request), ``LM.generate_many`` and
the server (many), speculative decoding (``speculative.py`` is this engine's token source
when a draft model is set) and the compiled decode step (``fastpath.StaticDecoder``, passed
in as ``decode``). The engine knows token ids only, never strings.

Shape of one engine (see docs/design.md):
- a ``KVCache`` of slots: rows [0, B) hold the B *active* sequences, in order; row B holds
  the request being prefilled, if any. A sequence that leaves is removed and the rows after it
  move up (a copy of their valid positions), so a decode step always runs over rows [0, B).
- ``submit`` queues a ``Request`` (one prompt, ``num_samples`` samples). ``step`` does one
  unit of work: prefill of the waiting requests, oldest first, up to ``chunk`` prompt tokens
  in all so that decoding rows are not stalled (when nothing is decoding: the first prompt
  whole and up to ``BURST_CHUNKS`` chunks in all), then one decode step over every active
  row. A request's prompt is prefilled once and its samples fan out into rows of their own.
- Each request keeps its own sampler, generator, limits and log-probability wishes; a failure
  in sampling fails that request alone.
- GPT-2's positions are learned and absolute: a sequence whose window is full keeps its most
  recent half and prefills it again from position 0 in its own row (the window slide).
- ``PromptCache``: a request may bring the caller's cache. Its longest shared prefix is
  reused, and at the end it holds sample 0's ids and new keys/values (the old ones are never
  written, so callers may share a cache's contents between requests). An engine made with
  ``kv=cache.kv`` works in that cache directly (no copies; ``LM.stream`` of one sample).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt2cli.config import GenerationConfig
from gpt2cli.device import make_generator, synchronize
from gpt2cli.kvcache import KVCache, PromptCache
from gpt2cli.logprobs import TokenLogprob, step_logprobs
from gpt2cli.model import GPT2
from gpt2cli.sampling import Sampler, make_sampler

BURST_CHUNKS = 4
"""Prompt chunks prefilled in a step that starts with nothing decoding (a burst on an idle engine)."""

# (ids (B, T), positions (B, T), cache) -> last-position logits (B, vocab); rows [0, B).
DecodeFn = Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor]


@dataclass
class EngineStats:
    """Token counts and seconds of one request (prefill = the prompt's forward passes)."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0  # tokens actually run (the rest came from a prompt cache)
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    window_slides: int = 0
    draft_proposed: int = 0  # speculative decoding: draft tokens proposed / kept by the target
    draft_accepted: int = 0
    compiled_steps: int = 0  # decode steps that ran through the compiled step (--compile)

    @property
    def acceptance_rate(self) -> float | None:
        """Fraction of draft tokens the target kept (None without a draft model)."""
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else None


class Sequence:
    """One sample of a request: its tokens, its row in the cache, and how it ended."""

    def __init__(self, request: Request, sample: int, prompt: list[int]) -> None:
        self.request = request
        self.sample = sample
        self.history = list(prompt)  # prompt + generated: what penalties look at
        self.generated: list[int] = []
        self.kv_ids: list[int] = []  # ids whose keys/values fill positions [0, len) of its row
        self.pending: int | None = None  # sampled, not yet fed
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason


@dataclass
class Request:
    """What a caller asks for: ``cfg.num_samples`` continuations of ``prompt`` (1..window ids).

    ``logprobs``: None for none, else how many top alternatives each token's entry carries.
    ``generator``: default one seeded from ``cfg.seed`` on the engine's device.
    """

    prompt: list[int]
    cfg: GenerationConfig
    eos_id: int | None = None
    logprobs: int | None = None
    cache: PromptCache | None = None
    generator: torch.Generator | None = None
    sequences: list[Sequence] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)
    error: BaseException | None = None
    prefilled: int = 0  # prompt tokens whose keys/values are in the prefill row
    _sampler: Sampler | None = field(default=None, repr=False)
    _t_first: float | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return bool(self.sequences) and all(s.finished for s in self.sequences)

    @property
    def rows(self) -> int:
        return self.cfg.num_samples


@dataclass
class TokenEvent:
    """A new token of ``seq`` (its ``finish_reason`` is set when this token ended it)."""

    seq: Sequence
    token: int
    logprob: TokenLogprob | None = None


class Engine:
    """Continuous batching over one model: submit requests, call ``step`` until ``idle``.

    Args:
        model: the network (never mutated by the engine).
        max_rows: most sequences decoding at once; a request waits until its samples fit.
        capacity: positions per row to start with (grows up to the window on demand).
        chunk: most prompt tokens prefilled in one step while other rows are decoding.
        kv: work in this cache (a ``PromptCache``'s); it needs one row per sample.
        decode: the decode-step function (``fastpath.StaticDecoder`` for ``--compile``).
        draft: a draft model for speculative decoding (``speculative.py``), one sequence only.
    """

    def __init__(
        self,
        model: GPT2,
        *,
        max_rows: int = 1,
        capacity: int | None = None,
        chunk: int = 256,
        kv: KVCache | None = None,
        decode: DecodeFn | None = None,
        draft: GPT2 | None = None,
        draft_tokens: int = 4,
        draft_decode: DecodeFn | None = None,
    ) -> None:
        self.model = model
        self.window = model.config.n_positions
        self.max_rows = max_rows
        self.capacity = min(capacity or self.window, self.window)
        self.chunk = max(1, chunk)
        self.kv = kv
        self.decode_fn = decode
        self.active: list[Sequence] = []
        self.waiting: deque[Request] = deque()
        self.speculator = None
        if draft is not None:
            from gpt2cli.speculative import Speculator

            self.speculator = Speculator(self, draft, draft_tokens, draft_decode)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting

    # --- requests ----------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue ``request``; its samples join the batch once prefilled."""
        if not request.prompt:
            raise ValueError("a request needs at least one prompt token")
        if len(request.prompt) > self.window:
            raise ValueError(f"prompt of {len(request.prompt)} tokens exceeds the window")
        if request.rows > self.max_rows:
            raise ValueError(f"{request.rows} samples exceed the engine's {self.max_rows} rows")
        if self.speculator is not None and (request.rows != 1 or self.waiting or self.active):
            raise ValueError("speculative decoding runs one sequence at a time")
        request.sequences = [Sequence(request, i, request.prompt) for i in range(request.rows)]
        request.stats.prompt_tokens = len(request.prompt)
        request._sampler = make_sampler(request.cfg)
        if request.generator is None:
            request.generator = make_generator(request.cfg.seed, self.device)
        self.waiting.append(request)
        return request

    def stop(self, seq: Sequence, reason: str = "stop") -> None:
        """End ``seq`` (a stop string matched, say); it leaves the batch at the next step."""
        seq.finish(reason)

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        """End every sample of ``request`` now; a waiting request is dropped from the queue."""
        for seq in request.sequences:
            seq.finish(reason)
        if request in self.waiting:
            self.waiting.remove(request)
            self._close(request)

    # --- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One chunk of prefill (waiting requests that fit, in order), then one decode step of every row."""
        self.release()
        decoding = len(self.active)
        events = self._prefill(stall_ok=decoding == 0)
        if decoding:
            if self.speculator is not None:
                events += self.speculator.round(self.active[0])
            else:
                events += self._decode(decoding)
        self.release()
        return events

    def release(self) -> None:
        """Drop finished rows, moving the later rows (and the prefill row) up over them.

        ``step`` calls it first and last; a caller that stops sequences after its last step
        calls it to settle their requests (timings, prompt caches).
        """
        if all(not s.finished for s in self.active):
            return
        survivors = [(row, s) for row, s in enumerate(self.active) if not s.finished]
        left = [s for s in self.active if s.finished]
        moves = [row for row, _ in survivors]
        if self.waiting and self.waiting[0].prefilled:
            moves.append(len(self.active))  # the prefill row follows the active ones
            lengths = [len(s.kv_ids) for _, s in survivors] + [self.waiting[0].prefilled]
        else:
            lengths = [len(s.kv_ids) for _, s in survivors]
        assert self.kv is not None
        for row, seq in enumerate(self.active):
            if seq.finished and seq.sample == 0:
                self._save(seq, row)  # before its row is overwritten
        for target, (source, length) in enumerate(zip(moves, lengths, strict=True)):
            self.kv.copy_row(source, target, length)  # sources only ever move up: safe in order
        self.active = [s for _, s in survivors]
        for request in {id(s.request): s.request for s in left}.values():
            if request.done:
                self._close(request)

    def _close(self, request: Request) -> None:
        """A request has ended: its decode time."""
        if request._t_first is not None:
            request.stats.decode_seconds = time.perf_counter() - request._t_first

    def _save(self, seq: Sequence, row: int) -> None:
        """Sample 0 has ended: copy its ids and keys/values (in ``row``) to the request's prompt cache.

        The cache gets new keys/values rather than having its old ones overwritten: a caller
        may share one cache's contents between requests (the server's pool does), and a
        request that only read them must not change them under the others.
        """
        cache = seq.request.cache
        if cache is None or cache.kv is self.kv:
            return  # no cache, or it works in place
        assert self.kv is not None
        length = len(seq.kv_ids)
        kv = self.model.new_cache(1, length)
        kv.copy_row(row, 0, length, source=self.kv)
        cache.kv, cache.ids = kv, list(seq.kv_ids)

    # --- prefill -----------------------------------------------------------------------------

    def reserve(self, capacity: int) -> KVCache:
        """The engine's cache, with room for the rows in use and at least ``capacity`` positions.

        Rows [0, B) are active and rows from B on take the request being prefilled and its
        samples; a request is admitted only while its samples fit in ``max_rows``. Rows are
        added as needed (doubling), so a server sized for many rows starts small.
        """
        needed = len(self.active) + (self.waiting[0].rows if self.waiting else 0)
        rows = max(1, needed)
        if self.kv is not None and rows > self.kv.rows:
            rows = min(self.max_rows, max(rows, 2 * self.kv.rows))
        if self.decode_fn is not None:
            rows = max(rows, batch_bucket(rows))
            capacity = self.window  # one shape for the compiled step: never grows
        if self.kv is None:
            self.kv = self.model.new_cache(rows, max(capacity, self.capacity))
        else:
            target = capacity if capacity <= self.kv.capacity else min(self.window, 2 * capacity)
            self.kv.ensure(rows, max(target, capacity))
        return self.kv

    def _prefill(self, *, stall_ok: bool) -> list[TokenEvent]:
        """Prefill waiting requests, oldest first, up to ``chunk`` prompt tokens in all.

        Short prompts that arrive together all join in one step instead of one a step (each
        step also decodes every row), so a burst's time to first token is its prefill work.
        With nothing decoding (``stall_ok``) no row waits on the prefill: the first prompt
        runs whole and the others get ``BURST_CHUNKS`` chunks, so a burst of requests on an
        idle engine is not cut by decode steps of the first ones to join.
        """
        events: list[TokenEvent] = []
        budget: int | None = None if stall_ok else self.chunk  # prompt tokens left this step
        while self.waiting and len(self.active) + self.waiting[0].rows <= self.max_rows:
            request = self.waiting[0]
            ran = request.stats.prefill_tokens
            events += self._prefill_chunk(request, limit=budget)
            ran = request.stats.prefill_tokens - ran
            budget = (BURST_CHUNKS * self.chunk if budget is None else budget) - ran
            still_waiting = bool(self.waiting) and self.waiting[0] is request
            if budget <= 0 or still_waiting or self.speculator is not None:
                break
        return events

    def _prefill_chunk(self, request: Request, *, limit: int | None) -> list[TokenEvent]:
        """Run up to ``limit`` (None: all) more prompt tokens into the prefill row; at the end, fan out."""
        row = len(self.active)
        prompt = request.prompt
        t0 = time.perf_counter()
        if request.prefilled == 0:
            self.reserve(len(prompt) + request.cfg.max_new_tokens)
            request.prefilled = self._reuse(request, row)
        kv = self.reserve(len(prompt))
        start = request.prefilled
        end = len(prompt) if limit is None else min(len(prompt), start + limit)
        ids = torch.tensor([prompt[start:end]], device=self.device)
        pos = torch.arange(start, end, device=self.device)[None, :]
        try:
            logits = self.model(ids, pos, kv, rows=slice(row, row + 1), last_only=True)  # (1, V)
        except BaseException:
            if request.cache is not None and request.cache.kv is self.kv:
                request.cache.ids = prompt[:start]  # what is certainly in the caller's cache
            raise
        if self.speculator is not None:
            self.speculator.prefill(prompt, start, end)
        request.prefilled = end
        request.stats.prefill_tokens += end - start
        synchronize(self.device)
        request.stats.prefill_seconds += time.perf_counter() - t0
        if end < len(prompt):
            return []
        return self._join(request, row, logits)

    def _reuse(self, request: Request, row: int) -> int:
        """Prompt tokens already in ``request.cache``: copied into ``row`` (or used in place)."""
        cache = request.cache
        if cache is None:
            return 0
        common = cache.common_prefix(request.prompt)
        assert self.kv is not None
        if cache.kv is not self.kv and cache.kv is not None and common:
            self.kv.copy_row(0, row, common, source=cache.kv)
        if cache.kv is self.kv:
            del cache.ids[common:]  # what follows is about to be overwritten
        return common

    def _join(self, request: Request, row: int, logits: torch.Tensor) -> list[TokenEvent]:
        """The prompt is in ``row``: copy it to one row per sample, sample each first token."""
        assert self.kv is not None
        self.waiting.popleft()
        for i, seq in enumerate(request.sequences):
            self.kv.copy_row(row, row + i, len(request.prompt))
            seq.kv_ids = list(request.prompt)
        if request.cache is not None and request.cache.kv is self.kv:
            request.cache.ids = request.sequences[0].kv_ids  # the same list: it follows the row
        request._t_first = time.perf_counter()
        self.active.extend(request.sequences)
        return self._sample(request.sequences, logits.expand(request.rows, -1))

    # --- decode ------------------------------------------------------------------------------

    def _decode(self, rows: int) -> list[TokenEvent]:
        """Feed every active row's pending token; sample the next one of each."""
        assert self.kv is not None
        seqs = self.active[:rows]
        for seq in seqs:
            if len(seq.kv_ids) >= self.window:
                self.slide(seq, self.active.index(seq))
        longest = max(len(s.kv_ids) for s in seqs) + 1
        kv = self.reserve(longest)
        ids = torch.tensor([[s.pending] for s in seqs], device=self.device)  # (B, 1)
        pos = torch.tensor([[len(s.kv_ids)] for s in seqs], device=self.device)  # (B, 1)
        if self.decode_fn is not None:
            self.model.forward_tokens += rows
            logits = self.decode_fn(ids, pos, kv)
            if not getattr(self.decode_fn, "failed", False):
                for request in {id(s.request): s.request for s in seqs}.values():
                    request.stats.compiled_steps += 1
        else:
            logits = self.model(ids, pos, kv, rows=slice(0, rows), last_only=True)  # (B, V)
        for seq in seqs:
            assert seq.pending is not None
            seq.kv_ids.append(seq.pending)
        return self._sample(seqs, logits)

    def slide(self, seq: Sequence, row: int, keep: int | None = None) -> None:
        """The window is full: prefill the newest half of ``seq``'s tokens again from position 0.

        The pending token is fed by the next step, so ``keep - 1`` tokens are prefilled here.
        """
        keep = self.window // 2 if keep is None else keep
        recent = seq.history[-keep:]  # ends with the pending token
        del seq.kv_ids[:]
        ids = torch.tensor([recent[:-1]], device=self.device)
        assert self.kv is not None
        self.model(ids, None, self.kv, rows=slice(row, row + 1), last_only=True)
        seq.kv_ids.extend(recent[:-1])
        seq.request.stats.window_slides += 1

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        """Each request samples its own rows of ``logits`` (B, V) with its own settings."""
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(id(seq.request), []).append(i)
        events: list[TokenEvent] = []
        for index in groups.values():
            request = seqs[index[0]].request
            rows = logits if len(index) == len(seqs) else logits[torch.tensor(index, device=logits.device)]
            try:
                tokens, entries = self._choose(request, [seqs[i] for i in index], rows)
            except Exception as exc:  # noqa: BLE001 - one request's bad values must not fail the others
                request.error = exc
                for i in index:
                    seqs[i].finish("error")
                continue
            for i, token, entry in zip(index, tokens, entries, strict=True):
                events.append(self.accept(seqs[i], token, entry))
        return events

    def _choose(
        self, request: Request, seqs: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Next ids of ``seqs`` from their logits (B, V), and their log-probabilities if wanted."""
        assert request._sampler is not None
        previous = None
        if request.cfg.repetition_penalty not in (None, 1.0):
            previous = torch.tensor([s.history for s in seqs], device=logits.device)  # (B, T)
        chosen = request._sampler(logits, previous, request.generator)  # (B,)
        entries: list[TokenLogprob | None] = [None] * len(seqs)
        if request.logprobs is not None:
            entries = list(step_logprobs(logits, chosen, request.logprobs))
        return chosen.tolist(), entries

    def accept(self, seq: Sequence, token: int, entry: TokenLogprob | None = None) -> TokenEvent:
        """Record ``token`` as ``seq``'s next; end it at EOS or its token limit."""
        request = seq.request
        seq.history.append(token)
        seq.generated.append(token)
        seq.pending = token
        request.stats.generated_tokens += 1
        if token == request.eos_id and not request.cfg.ignore_eos:
            seq.finish("eos")
        elif len(seq.generated) >= request.cfg.max_new_tokens:
            seq.finish("length")
        return TokenEvent(seq, token, entry)


def batch_bucket(rows: int) -> int:
    """The compiled step's batch size for ``rows`` rows: the next power of two."""
    size = 1
    while size < rows:
        size *= 2
    return size
