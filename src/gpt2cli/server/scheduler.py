"""The bounded queue in front of the one engine, and the engine thread that drains it.

Requests are split into ``Job``s (one per prompt). One thread takes the oldest waiting job
and, with it, every other waiting job whose prompt has the same token length (up to
``max_batch`` rows), and runs them as one batch. A full queue refuses at once (the server
answers 503); a cancelled job leaves its batch at the next step; closing ends running jobs
at the next step with what they have and fails the waiting ones.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gpt2cli.api import LM
from gpt2cli.server.batch import BatchRun, Failed, Job, run_scores


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs already."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


@dataclass
class SchedulerStats:
    waiting: int = 0
    running: int = 0
    batches: int = 0
    batched_jobs: int = 0  # jobs that ran in a batch with at least one other job
    completed: int = 0
    cancelled: int = 0


class Scheduler:
    """Feeds waiting jobs to the model, one batch at a time, on a background thread."""

    def __init__(
        self, lm: LM, *, max_queue: int = 64, max_batch: int = 8, log: Callable[[str], None] | None = None
    ) -> None:
        self.lm = lm
        self.max_queue = max_queue
        self.max_batch = max_batch
        self._log = log or (lambda line: None)
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stats = SchedulerStats()
        self._thread = threading.Thread(target=self._loop, name="gpt2-engine", daemon=True)

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
            job.emit(Failed("the server is shutting down"))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                batch = self._take()
                self._running = batch
            self._run(batch)
            with self._cond:
                self._running = []
                for job in batch:
                    job.done = True
                    self._stats.completed += not job.cancelled.is_set()

    def _take(self) -> list[Job]:
        """The oldest job and the waiting jobs it can share a batch with."""
        first = self._waiting.popleft()
        if first.scores_only:
            return [first]
        batch, rows = [first], first.cfg.num_samples
        for job in list(self._waiting):
            if job.scores_only or len(job.prompt) != len(first.prompt):
                continue
            if rows + job.cfg.num_samples > self.max_batch:
                break
            self._waiting.remove(job)
            batch.append(job)
            rows += job.cfg.num_samples
        self._stats.batches += 1
        if len(batch) > 1:
            self._stats.batched_jobs += len(batch)
        return batch

    def _run(self, batch: list[Job]) -> None:
        lm = self.lm
        try:
            if batch[0].scores_only:
                run_scores(lm.model, batch[0])
            else:
                BatchRun(lm.model, lm.tokenizer, batch).run()
        except Exception as exc:  # noqa: BLE001 - a failed batch must not stop the engine thread
            self._log(f"engine error: {type(exc).__name__}: {exc}")
            for job in batch:
                job.emit(Failed(f"internal error: {type(exc).__name__}"))
