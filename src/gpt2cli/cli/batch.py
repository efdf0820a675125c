"""The ``--jsonl`` batch mode of ``gpt2 score`` and ``gpt2 generate``: options, progress, summary.

Parse -> ``gpt2cli.batch.run.run_job`` -> render: a Rich progress bar on a terminal's stderr
(documents/s, tokens/s, ETA from the input's size), a warning line per bad input line, and a
one-line summary on stderr at the end, after Ctrl-C too (the output keeps every line written).
"""

from __future__ import annotations

import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.batch.jsonl import LOOKAHEAD
from gpt2cli.cli.output import is_terminal, stderr_console, warn
from gpt2cli.errors import EXIT_INTERRUPTED, BadInputError

BATCH_PANEL = "Batch (--jsonl)"


class OnError(str, Enum):
    skip = "skip"
    stop = "stop"


Jsonl = Annotated[
    Path | None,
    typer.Option(
        "--jsonl",
        help="Batch mode: one JSON document per line of this file ('-': stdin).",
        show_default=False,
        rich_help_panel=BATCH_PANEL,
    ),
]
Output = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="--jsonl: where result lines go (default '-': stdout).",
        show_default=False,
        rich_help_panel=BATCH_PANEL,
    ),
]
IdField = Annotated[
    str,
    typer.Option(
        "--id-field",
        help="--jsonl: the field holding each line's id (else its line number).",
        rich_help_panel=BATCH_PANEL,
    ),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="--jsonl: skip the ids already in --output and append the rest.",
        rich_help_panel=BATCH_PANEL,
    ),
]
OnErrorOption = Annotated[
    OnError,
    typer.Option(
        "--on-error",
        help="--jsonl bad lines: skip (report, write an error line, go on) or stop.",
        rich_help_panel=BATCH_PANEL,
    ),
]
Workers = Annotated[
    int,
    typer.Option(
        "--workers",
        help="--jsonl: processes, each with its own model copy and share of cores.",
        rich_help_panel=BATCH_PANEL,
    ),
]
Ray = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="--jsonl: run as a Ray Data pipeline (extra 'ray'); --workers actors.",
        rich_help_panel=BATCH_PANEL,
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="--ray: the cluster to join (default: RAY_ADDRESS, else a local Ray).",
        show_default=False,
        rich_help_panel=BATCH_PANEL,
    ),
]
Lookahead = Annotated[
    int,
    typer.Option(
        "--lookahead",
        help="--jsonl: lines sorted and batched together (the unit of work).",
        rich_help_panel=BATCH_PANEL,
    ),
]


def job_options(
    jsonl: Path | None,
    output: Path | None,
    id_field: str,
    resume: bool,
    on_error: OnError,
    workers: int,
    ray: bool,
    ray_address: str | None,
    lookahead: int,
) -> Any:
    """The ``JobOptions`` of a ``--jsonl`` run, or None without ``--jsonl``.

    Raises:
        BadInputError: a batch option without ``--jsonl``, or an out-of-range value.
    """
    if jsonl is None:
        given = [
            name
            for name, used in (
                ("--output", output is not None),
                ("--resume", resume),
                ("--workers", workers != 1),
                ("--ray", ray or ray_address is not None),
                ("--on-error", on_error is not OnError.skip),
                ("--lookahead", lookahead != LOOKAHEAD),
                ("--id-field", id_field != "id"),
            )
            if used
        ]
        if given:
            raise BadInputError(f"{given[0]} applies to batch jobs only", hint="add --jsonl IN.jsonl")
        return None
    if workers < 1:
        raise BadInputError(f"--workers {workers} is below 1", hint="use 1 or more")
    if lookahead < 1:
        raise BadInputError(f"--lookahead {lookahead} is below 1", hint="use 1 or more")
    if (ray or ray_address is not None) and str(jsonl) == "-":
        raise BadInputError(
            "--ray cannot read standard input", hint="give --jsonl a file or URI every node can open"
        )
    from gpt2cli.batch.run import JobOptions

    return JobOptions(
        input=str(jsonl),
        output=str(output) if output is not None else "-",
        id_field=id_field,
        resume=resume,
        on_error=on_error.value,
        lookahead=lookahead,
        workers=workers,
        ray=ray or ray_address is not None,
        ray_address=ray_address,
    )


def refuse(option: str, given: bool) -> None:
    """An option of the single-input mode that ``--jsonl`` does not take."""
    if given:
        raise BadInputError(f"{option} does not apply to --jsonl", hint=f"drop {option}")


def run(job: Any, model: Any, task: Any, verb: tuple[str, str]) -> None:
    """Run the job with a progress bar on a terminal and a summary on stderr; Ctrl-C exits 130."""
    from gpt2cli.batch.run import JobSummary, run_job

    summary = JobSummary()
    with _Progress(job.input) as progress:
        try:
            run_job(model, task, job, summary=summary, on_line=progress.update, on_error=progress.report)
        except KeyboardInterrupt:
            progress.close()
            _print_summary(summary, verb, job, interrupted=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BaseException:
            progress.close()
            if summary.documents:
                _print_summary(summary, verb, job, interrupted=False)
            raise
    _print_summary(summary, verb, job, interrupted=False)


class _Progress:
    """A Rich bar (bytes of the input, or a spinner on a stream) on stderr, only on a terminal."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if not is_terminal(sys.stderr):
            return self
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[docs]} docs, {task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr_console(),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(self.source, total=None, docs="0", rate="")
        return self

    def update(self, summary: Any) -> None:
        if self.bar is None:
            return
        rate = f"{summary.documents_per_second:,.1f} docs/s, {summary.tokens_per_second:,.0f} tok/s"
        self.bar.update(
            self.task,
            total=summary.input_size,
            completed=summary.read,
            docs=f"{summary.documents:,}",
            rate=rate,
        )

    def report(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(f"gpt2: warning: {message}")
        else:
            warn(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __exit__(self, *exc: object) -> None:
        self.close()


def _print_summary(summary: Any, verb: tuple[str, str], job: Any, interrupted: bool) -> None:
    """``gpt2: scored 9 documents, 1 errors | ... tok/s | perplexity ...`` on stderr (10 lines
    written: the errors are lines too, but not documents scored)."""
    if summary.repaired:
        warn(f"{job.output} ended in a partial line (an interrupted run): cut it off and redid it")
    done, noun = verb
    parts = [f"{summary.documents - summary.errors:,} {noun}"]
    if summary.errors:
        parts.append(f"{summary.errors:,} errors")
    if summary.skipped:
        parts.append(f"{summary.skipped:,} already done")
    head = f"gpt2: {done} " + ", ".join(parts)
    speed = (
        f"{summary.tokens:,} tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:,.0f} tok/s, "
        f"{summary.documents_per_second:,.1f} {noun}/s)"
    )
    line = f"{head} | {speed} on {summary.backend}"
    if done == "scored" and summary.tokens:
        line += f" | perplexity {_num(summary.perplexity)}, {_num(summary.bits_per_byte)} bits/byte"
    if interrupted:
        line += " | interrupted: --resume continues"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _num(value: float) -> str:
    return "nan" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:.4g}"
