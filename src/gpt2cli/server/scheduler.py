"""The bounded queue in front of the one engine, and the engine thread that drives it.

Requests are split into ``Job``s (one per prompt). One thread runs an ``engine.Engine`` with
continuous batching: between steps, waiting jobs join the running batch while their samples
fit in ``max_batch`` rows (each is prefilled in chunks beside the rows that decode), and
finished, cancelled or stopped ones leave. Each job borrows the prompt pool's entry sharing
the longest prefix with its prompt and gives back what it saved (``promptpool.py``). A full
queue refuses at once (the server answers 503); a cancelled job leaves at the next step;
closing ends running jobs at the next step and fails them and the waiting ones with
"shutting_down". A failure while sampling one job fails that job alone; a failure of the
forward pass fails the jobs of that step. Timings and token counts go to ``metrics.Metrics``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gpt2cli.api import LM
from gpt2cli.engine import Engine, TokenEvent
from gpt2cli.server.batch import SHUTTING_DOWN, Failed, Job, run_scores
from gpt2cli.server.metrics import Metrics
from gpt2cli.server.promptpool import PromptPool
from gpt2cli.server.protocol import MAX_N


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs already."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


@dataclass
class SchedulerStats:
    waiting: int = 0
    running: int = 0
    active_rows: int = 0  # rows decoding after the latest step
    steps: int = 0  # engine steps run
    batched_steps: int = 0  # steps that decoded rows of more than one job
    max_rows: int = 0  # the most rows that decoded in one step
    completed: int = 0
    cancelled: int = 0


class Scheduler:
    """Feeds waiting jobs into one continuously batching engine, on a background thread."""

    def __init__(
        self,
        lm: LM,
        *,
        max_queue: int = 64,
        max_batch: int = 8,
        cache_tokens: int = 0,
        metrics: Metrics | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.lm = lm
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.pool = PromptPool(cache_tokens)
        self.metrics = metrics or Metrics()
        self._log = log or (lambda line: None)
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stats = SchedulerStats()
        self._thread = threading.Thread(target=self._loop, name="gpt2-engine", daemon=True)
        self._engine = self._new_engine()

    def start(self) -> None:
        self._thread.start()

    def stats(self) -> SchedulerStats:
        with self._cond:
            self._stats.waiting = len(self._waiting)
            self._stats.running = len(self._running)
            return SchedulerStats(**vars(self._stats))

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (all or none).

        Raises:
            QueueFull: they do not fit in the queue.
            ShuttingDown: the scheduler is closed.
        """
        with self._cond:
            if self._closed:
                raise ShuttingDown
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull
            self._waiting.extend(jobs)
            self._cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client went away: drop waiting jobs, stop running ones at the next step."""
        with self._cond:
            for job in jobs:
                if job.cancelled.is_set() or job.done:
                    continue
                job.cancelled.set()
                self._stats.cancelled += 1
                if job in self._waiting:
                    self._waiting.remove(job)

    def close(self, timeout: float = 10.0) -> None:
        """Stop: running jobs end now with what they have, waiting ones fail; wait for the thread."""
        self.begin_close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def begin_close(self) -> None:
        """Refuse new jobs, end running ones at their next step, fail waiting ones; do not wait."""
        with self._cond:
            self._closed = True
            for job in self._running:
                job.stopping.set()
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify()
        for job in waiting:
            job.emit(Failed(SHUTTING_DOWN, "shutting_down"))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting and not self._running:
                    return
                admitted = self._admit()
            for job in admitted:
                self._start(job)
            self._step()

    def _new_engine(self) -> Engine:
        # Rows for max_batch, or for one request with more samples than that (it runs alone).
        rows = max(self.max_batch, MAX_N)
        return Engine(self.lm.model, max_rows=rows, decode=self.lm.decoder)

    def _admit(self) -> list[Job]:
        """Waiting jobs whose samples fit beside the running ones, oldest first (lock held).

        A job with more samples than ``max_batch`` runs once nothing else does.
        """
        rows = sum(job.rows for job in self._running)
        admitted = []
        while self._waiting and (rows + self._waiting[0].rows <= self.max_batch or rows == 0):
            job = self._waiting.popleft()
            rows += job.rows
            admitted.append(job)
            if not job.scores_only:
                self._running.append(job)
        return admitted

    def _start(self, job: Job) -> None:
        """Hand a job to the engine (a scores-only job is answered here and now)."""
        try:
            if job.scores_only:
                run_scores(self.lm.model, job)
                self._finished(job)
            else:
                cache = self.pool.lease(job.prompt) if self.pool.budget > 0 else None
                job.start(self._engine, self.lm.model, self.lm.tokenizer, cache)
                self.metrics.started(len(job.prompt))
        except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the engine thread
            self._log(f"engine error: {type(exc).__name__}: {exc}")
            job.emit(Failed(f"internal error: {type(exc).__name__}"))
            with self._cond:
                if job in self._running:
                    self._running.remove(job)
            self._finished(job)

    def _step(self) -> None:
        """Cancel what must end, run one engine step, hand out its tokens, finish what ended."""
        engine = self._engine
        with self._cond:
            running = list(self._running)
        for job in running:
            if job.request is not None and (job.cancelled.is_set() or job.stopping.is_set()):
                engine.cancel(job.request)
        t0 = time.perf_counter()
        try:
            events = engine.step() if not engine.idle else []
        except Exception as exc:  # noqa: BLE001 - the forward failed: the jobs in it fail, the thread goes on
            self._log(f"engine error: {type(exc).__name__}: {exc}")
            self._fail_all(running, exc)
            return
        now = time.perf_counter()
        self.metrics.step(now - t0, len(events))
        self._count(engine)
        by_request = {id(job.request): job for job in running}
        for event in events:
            job = by_request[id(event.seq.request)]
            self._time(job, event, now)
            job.push(engine, event)
        engine.release()
        for job in running:
            if job.request is not None and job.request.done:
                self._end(job, now)

    def _time(self, job: Job, event: TokenEvent, now: float) -> None:
        """Time to first token (the job's first) and time per token (each sample's next)."""
        if not job.token_at:
            job.token_at = [0.0] * job.rows
            self.metrics.first_token(now - job.queued_at)
        sample = event.seq.sample
        if job.token_at[sample]:
            self.metrics.next_token(now - job.token_at[sample])
        job.token_at[sample] = now

    def _end(self, job: Job, now: float) -> None:
        """The engine is done with ``job``: answer it, keep what it saved, count it."""
        request = job.request
        assert request is not None
        if request.error is not None:
            self._log(f"request failed in the engine: {type(request.error).__name__}: {request.error}")
        job.finish()
        if job.cache is not None:
            self.pool.keep(job.cache, reused=job.cached_tokens)
        stats = request.stats
        self.metrics.finished(stats.prefill_tokens, stats.prefill_seconds, now - job.queued_at)
        with self._cond:
            self._running.remove(job)
        self._finished(job)

    def _count(self, engine: Engine) -> None:
        with self._cond:
            self._stats.steps += 1
            rows = len(engine.active)
            self._stats.active_rows = rows
            self._stats.max_rows = max(self._stats.max_rows, rows)
            if len({id(s.request) for s in engine.active}) > 1:
                self._stats.batched_steps += 1

    def _fail_all(self, jobs: list[Job], exc: Exception) -> None:
        self._engine = self._new_engine()
        for job in jobs:
            job.emit(Failed(f"internal error: {type(exc).__name__}"))
            with self._cond:
                self._running.remove(job)
            self._finished(job)

    def _finished(self, job: Job) -> None:
        with self._cond:
            job.done = True
            self._stats.completed += not job.cancelled.is_set()
