"""Drives a batch job: input lines to output lines, here, over worker processes, or on Ray.

The driver opens the output (resuming and repairing it when asked), gets the outcomes in
input order from a backend and writes each line as it comes, keeping a live ``JobSummary``.
Backends: this process (``workers == 1``), ``workers`` spawned processes each with its own
model copy and ``cores / workers`` threads, chunks of ``lookahead`` lines handed out in turn
and written back in order; or Ray (``raydata``). Every backend runs ``tasks.run_chunk`` on
the same chunks, so their output lines are the same.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from gpt2cli import switches
from gpt2cli.batch.jsonl import LOOKAHEAD, STDIO, BatchInputError, Line, Outcome, chunks, open_output
from gpt2cli.batch.tasks import ModelSettings, Task, TaskSettings, run_chunk
from gpt2cli.errors import BadInputError, Gpt2Error, MissingExtraError


@dataclass(frozen=True)
class JobOptions:
    """Where a job reads and writes, and how it runs."""

    input: str  # a path, or "-" for stdin
    output: str  # a path, or "-" for stdout
    id_field: str = "id"
    resume: bool = False
    on_error: str = "skip"  # skip: report the line and go on; stop: end the job there
    lookahead: int = LOOKAHEAD
    workers: int = 1
    ray: bool = False
    ray_address: str | None = None


@dataclass
class JobSummary:
    """A job's running totals (this run only), updated as each line is written."""

    documents: int = 0  # lines written: results and errors
    errors: int = 0
    skipped: int = 0  # already in the output of an earlier run
    tokens: int = 0
    bytes: int = 0
    total_nll: float = 0.0
    read: int = 0  # input bytes behind the last line written
    input_size: int | None = None
    repaired: bool = False  # a partial last line of an earlier run was cut off
    backend: str = ""  # where the work ran, in words
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.read = max(self.read, outcome.end)
        if outcome.kind == "skipped":
            self.skipped += 1
            return
        self.documents += 1
        self.errors += outcome.kind == "error"
        self.tokens += outcome.tokens
        self.bytes += outcome.bytes
        self.total_nll += outcome.total_nll
        self.seconds = time.perf_counter() - self.started

    @property
    def perplexity(self) -> float:
        """Corpus-level: exp(total NLL / tokens) over every document scored in this run."""
        return math.exp(min(self.total_nll / self.tokens, 700.0)) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.total_nll / self.bytes / math.log(2) if self.bytes else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def documents_per_second(self) -> float:
        return self.documents / self.seconds if self.seconds > 0 else 0.0


def run_job(
    model: ModelSettings,
    task: TaskSettings,
    options: JobOptions,
    *,
    summary: JobSummary | None = None,
    on_line: Callable[[JobSummary], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> JobSummary:
    """Run a batch job to the end of its input.

    Args:
        summary: the totals to keep up to date (the caller keeps it to report an interrupted run).
        on_line: called after each line is written.
        on_error: called with the message of each bad line (as it is written to the output).

    Returns:
        The totals of this run.

    Raises:
        BatchInputError: unusable input or output, or (``on_error="stop"``) the first bad line.
        Gpt2Error: the model cannot be loaded.
    """
    _check(options)
    summary = summary or JobSummary()
    summary.input_size = _size(options.input)
    source = None if options.ray else _open_input(options.input)
    out, resumed = open_output(options.output, options.resume)
    summary.repaired = resumed.repaired
    summary.backend = _backend(options)
    try:
        outcomes = _outcomes(model, task, options, source, resumed.done)
    except BaseException:
        out.close()
        raise
    summary.started = time.perf_counter()  # the clock starts once the model is loaded
    try:
        for outcome in outcomes:
            if outcome.kind == "error" and options.on_error == "stop":
                raise BatchInputError(
                    str(outcome.error),
                    hint="fix the line and rerun with --resume, or pass --on-error skip to go on",
                )
            out.write(outcome.line)
            summary.add(outcome)
            if outcome.kind == "error" and on_error is not None:
                on_error(str(outcome.error))
            if on_line is not None:
                on_line(summary)
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()  # stops worker processes or Ray
        out.close()
    return summary


def _backend(options: JobOptions) -> str:
    if options.ray:
        return f"Ray ({options.ray_address or 'RAY_ADDRESS or a local instance'}), {options.workers} actors"
    return "1 process" if options.workers == 1 else f"{options.workers} worker processes"


def _check(options: JobOptions) -> None:
    if options.workers < 1:
        raise BadInputError(f"--workers {options.workers} is below 1", hint="use 1 or more")
    if options.lookahead < 1:
        raise BadInputError(f"--lookahead {options.lookahead} is below 1", hint="use 1 or more")
    if options.on_error not in ("skip", "stop"):
        raise BadInputError(f"unknown --on-error {options.on_error!r}", hint="use skip or stop")
    if options.input != STDIO and options.output != STDIO:
        same = (
            Path(options.output).exists() and Path(options.input).resolve() == Path(options.output).resolve()
        )
        if same:
            raise BadInputError("--output is the input file", hint="write the results to another file")


def _size(path: str) -> int | None:
    if path == STDIO:
        return None
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _outcomes(
    model: ModelSettings,
    task: TaskSettings,
    options: JobOptions,
    source: tuple[IO[bytes], bool] | None,
    done: set[str],
) -> Iterator[Outcome]:
    if source is None:
        try:
            from gpt2cli.batch import raydata
        except ImportError as exc:
            raise MissingExtraError(
                f"--ray needs Ray ({exc.name or 'ray'} is not installed)",
                hint="pip install 'gpt2cli[ray]'",
            ) from exc
        return raydata.outcomes(model, task, options, done)
    chunks = _chunks(source, options.lookahead)
    if options.workers == 1:
        return _local(model.load(), task, chunks, options.id_field, done)
    pool_model = _worker_model(model, options.workers)
    return _pool(pool_model, task, chunks, (options.id_field, done), options.workers)


def _chunks(source: tuple[IO[bytes], bool], size: int) -> Iterator[list[Line]]:
    stream, close = source
    try:
        yield from chunks(stream, size)
    finally:
        if close:
            stream.close()


def _open_input(path: str) -> tuple[IO[bytes], bool]:
    if path == STDIO:
        return sys.stdin.buffer, False
    if Path(path).is_dir():
        raise BatchInputError(f"{path} is a directory", hint="give a JSONL file, or '-' for stdin")
    try:
        return open(path, "rb"), True  # noqa: SIM115 - closed by the caller
    except FileNotFoundError as exc:
        raise BatchInputError(f"{path}: no such file", hint="check the path") from exc
    except OSError as exc:
        raise BatchInputError(f"{path}: cannot read it ({exc.strerror or exc})") from exc


def _local(
    lm: Any, task: TaskSettings, chunks: Iterator[list[Line]], id_field: str, done: set[str]
) -> Iterator[Outcome]:
    built = task.build(lm)
    for chunk in chunks:
        yield from run_chunk(built, chunk, id_field, done)


# --- worker processes ---------------------------------------------------------------------------


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """GPT2_THREADS if set, else this machine's cores shared out (at least one each)."""
    return switches.threads() or max(1, cores() // workers)


def _worker_model(model: ModelSettings, workers: int) -> ModelSettings:
    """Resolve (and download) the model once here, so workers load it from disk, offline."""
    from gpt2cli.hub import resolve

    resolved = resolve(model.spec, offline=model.offline, allow_pickle=model.allow_pickle, progress=True)
    return replace(model, spec=str(resolved.path), offline=True, threads=threads_per_worker(workers))


_worker: tuple[Task, str, set[str]] | None = None  # a worker process's task, id field, done ids


def _init_worker(model: ModelSettings, task: TaskSettings, id_field: str, done: set[str]) -> None:
    global _worker
    _worker = (task.build(model.load()), id_field, done)


def _work(chunk: list[Line]) -> list[Outcome]:
    assert _worker is not None
    task, id_field, done = _worker
    return list(run_chunk(task, chunk, id_field, done))


def _pool(
    model: ModelSettings,
    task: TaskSettings,
    chunks: Iterator[list[Line]],
    skip: tuple[str, set[str]],
    workers: int,
) -> Iterator[Outcome]:
    """Chunks handed to ``workers`` processes, two each in flight, results yielded in order.

    The input is read by a thread, so a chunk's results are written as soon as it is done
    even while the next input line is slow to come (a pipe).
    """
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(model, task, *skip)
    )
    events: queue.Queue[tuple[str, Any]] = queue.Queue()  # ("chunk", lines) | ("end", error) | ("done", None)
    slots = threading.Semaphore(2 * workers)  # chunks read but not yet written
    threading.Thread(target=_read_ahead, args=(chunks, events, slots), daemon=True).start()
    pending: deque[Future[list[Outcome]]] = deque()
    ended = False
    try:
        while pending or not ended:
            kind, value = events.get()
            if kind == "chunk":
                future = pool.submit(_work, value)
                future.add_done_callback(lambda _: events.put(("done", None)))
                pending.append(future)
            elif kind == "end":
                if value is not None:
                    raise value
                ended = True
            while pending and pending[0].done():
                yield from _result(pending.popleft())
                slots.release()
    finally:
        for future in pending:
            future.cancel()
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()  # a chunk in flight is lost; --resume redoes it
        pool.shutdown(wait=True, cancel_futures=True)


def _read_ahead(chunks: Iterator[list[Line]], events: queue.Queue[tuple[str, Any]], slots: Any) -> None:
    """Put each chunk on ``events`` when a slot is free, then ``("end", None or the error)``."""
    try:
        while slots.acquire() and (chunk := next(chunks, None)) is not None:
            events.put(("chunk", chunk))
    except Exception as exc:  # noqa: BLE001 - handed to the reading loop, which raises it
        events.put(("end", exc))
        return
    events.put(("end", None))


def _result(future: Future[list[Outcome]]) -> list[Outcome]:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise Gpt2Error(
            "a worker process died (killed, or out of memory?)",
            hint="use fewer --workers or a smaller --lookahead; --resume continues the job",
        ) from exc
