"""The Ray backend of batch jobs: the same chunks and tasks as a Ray Data pipeline.

read (a file datasource yielding one row per chunk of ``lookahead`` input lines, the chunks
of a local run) -> ``map_batches`` with a model actor per worker, each running
``tasks.run_chunk`` on one chunk at a time -> the driver iterates the results in input order
(``preserve_order``) and writes them. Ray does the distribution, scheduling and retries;
nothing here speaks to other machines itself.

Ray's ``read_json`` is not used: it parses with pyarrow, which ends the whole read at the first
malformed line and keeps no line numbers, while a job reports bad lines by number and goes
on. The datasource here reads raw lines, and the actors parse them as a local run does.
Needs the ``ray`` extra (``pip install 'gpt2cli[ray]'``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import ray
import ray.data
from ray.data.datasource import FileBasedDatasource

from gpt2cli import switches
from gpt2cli.batch.jsonl import Line, Outcome, chunks
from gpt2cli.batch.tasks import ModelSettings, TaskSettings, run_chunk

COLUMNS = ("number", "end", "line", "kind", "error", "tokens", "bytes", "total_nll")


class JsonlChunks(FileBasedDatasource):
    """The input file as rows of ``size`` lines: the line numbers, bytes and ends of a chunk."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__(path)
        self.size = size

    def _read_stream(self, f: Any, path: str) -> Iterator[Any]:
        import pyarrow as pa

        for chunk in chunks(f, self.size):
            yield pa.table(
                {
                    "number": [[line.number for line in chunk]],
                    "data": pa.array([[line.data for line in chunk]], pa.list_(pa.binary())),
                    "end": [[line.end for line in chunk]],
                    "complete": [[line.complete for line in chunk]],
                }
            )


class ChunkActor:
    """A model copy in a Ray actor, running the job's task on one chunk (row) at a time."""

    def __init__(self, model: ModelSettings, task: TaskSettings, id_field: str, done: set[str]) -> None:
        self.task = task.build(model.load())
        self.id_field, self.done = id_field, done

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        for row in batch.to_pylist():  # one row (batch_size=1): one chunk
            fields = zip(row["number"], row["data"], row["end"], row["complete"], strict=True)
            lines = [Line(n, d, e, c) for n, d, e, c in fields]
            for outcome in run_chunk(self.task, lines, self.id_field, self.done):
                for name in COLUMNS:
                    value = getattr(outcome, name)
                    columns[name].append("" if value is None else value)
        return columns


def outcomes(model: ModelSettings, task: TaskSettings, options: Any, done: set[str]) -> Iterator[Outcome]:
    """The job's outcomes in input order, computed by a Ray Data pipeline.

    Connects to ``options.ray_address`` (or ``RAY_ADDRESS``), else starts a local Ray with
    this machine's cores; a Ray it started is shut down at the end.
    """
    started = _connect(options.ray_address)
    try:
        yield from _run(_cluster_model(model), task, options, done)
    finally:
        if started:
            ray.shutdown()


def _connect(address: str | None) -> bool:
    """Join a cluster or start a local Ray; True when this call started it."""
    from gpt2cli.batch.run import cores

    if ray.is_initialized():
        return False
    _quiet()
    settings: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, **settings)
    else:
        ray.init(num_cpus=cores(), **settings)
    return True


def _quiet() -> None:
    """Ray's chatter (start-up notices, the scheduler's remarks) stays off the job's stderr;
    failures still reach us as exceptions, and Ray's log files keep everything."""
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _cluster_model(model: ModelSettings) -> ModelSettings:
    """The model as every node can load it: a Hub model pinned to the commit resolved here.

    A local directory must exist at the same absolute path on every node.
    """
    from gpt2cli.hub import resolve

    resolved = resolve(model.spec, offline=model.offline, allow_pickle=model.allow_pickle, progress=True)
    spec = resolved.spec
    if spec.local_dir is not None:
        return replace(model, spec=str(resolved.path.resolve()))
    if spec.repo_id is not None and resolved.commit:
        return replace(model, spec=f"{spec.repo_id}@{resolved.commit}")
    return model


def _run(model: ModelSettings, task: TaskSettings, options: Any, done: set[str]) -> Iterator[Outcome]:
    _quiet()  # again: ray.init configures Ray's loggers
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = switches.threads() or max(1, cpus // options.workers)
    chunked = ray.data.read_datasource(JsonlChunks(options.input, options.lookahead), num_cpus=0)  # I/O
    results = chunked.map_batches(
        ChunkActor,
        fn_constructor_args=(replace(model, threads=threads), task, options.id_field, done),
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=options.workers),
        num_cpus=threads,
    )
    for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
        for values in zip(*(batch[name] for name in COLUMNS), strict=True):
            row = dict(zip(COLUMNS, values, strict=True))
            yield Outcome(
                number=int(row["number"]),
                end=int(row["end"]),
                line=str(row["line"]),
                kind=str(row["kind"]),
                error=str(row["error"]) or None,
                tokens=int(row["tokens"]),
                bytes=int(row["bytes"]),
                total_nll=float(row["total_nll"]),
            )
