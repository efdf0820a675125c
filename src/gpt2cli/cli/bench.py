"""`gpt2 bench`: time the engine on random prompts and print the figures (optionally beside transformers)."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpt2cli.cli import options as opt
from gpt2cli.cli.output import color_allowed, is_terminal, write, write_json
from gpt2cli.errors import EXIT_INTERRUPTED

if TYPE_CHECKING:
    from gpt2cli.bench import BenchReport, BenchResult


class BenchFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


def bench(
    model: opt.Model = "gpt2",
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    quantize: opt.Quantize = None,
    prompt_tokens: Annotated[
        str, typer.Option("--prompt-tokens", help="Prompt length in tokens; a comma list sweeps (128,512).")
    ] = "512",
    new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens", "-n", "--new-tokens", help="Tokens generated per sequence (at least 2)."
        ),
    ] = 128,
    batch_size: Annotated[
        str, typer.Option("--batch-size", help="Sequences decoded together; a comma list sweeps (1,8).")
    ] = "1",
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per configuration (median).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed warm-up runs per configuration.")] = 1,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's choice).")
    ] = None,
    output_format: Annotated[
        BenchFormat, typer.Option("--format", help="table, json, csv or markdown.")
    ] = BenchFormat.table,
    compare: Annotated[
        str | None,
        typer.Option("--compare", help="Also run the same workload through another engine: transformers."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the random prompt tokens, 0 to 2^64-1 (-1 draws one).")
    ] = 0,
    offline: opt.Offline = False,
    draft_model: Annotated[
        str | None,
        typer.Option(
            "--draft-model",
            help="Also decode speculatively with this draft model: acceptance rate, speed-up.",
        ),
    ] = None,
    draft_tokens: Annotated[
        int, typer.Option("--draft-tokens", help="Tokens the draft model proposes per step.")
    ] = 4,
    compile: opt.Compile = False,
) -> None:
    """Benchmark generation: prefill and decode tokens/s, time to first token, latency, memory.

    Prompts are random token ids, decoding is greedy and ignores end-of-text; every combination
    of --prompt-tokens and --batch-size runs --warmup untimed then --repeats timed times.
    """
    from gpt2cli.bench import BenchSpec, parse_int_list

    spec = BenchSpec(
        model=model,
        device=device,
        dtype=dtype,
        quantize=None if quantize in (None, "none") else quantize,
        prompt_tokens=parse_int_list(prompt_tokens, "prompt-tokens"),
        new_tokens=new_tokens,
        batch_sizes=parse_int_list(batch_size, "batch-size"),
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        seed=seed,
        offline=offline,
        draft_model=draft_model,
        draft_tokens=draft_tokens,
        compile=compile,
    ).validate()

    from gpt2cli.bench import BenchInterrupted, run
    from gpt2cli.cli.loading import note_kernels_in_memory

    note_kernels_in_memory(spec.device)
    try:
        with _progress() as progress:
            report = run(spec, compare=compare, progress=progress)
    except BenchInterrupted as exc:
        _interrupted(exc.report, output_format, exc.configurations)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _RENDERERS[output_format](report)


def _interrupted(report: BenchReport, output_format: BenchFormat, runs: int) -> None:
    """Ctrl-C: the configurations that finished, rendered as usual, and a line saying so."""
    if report.results:
        _RENDERERS[output_format](report)
    done = len(report.results)
    sys.stderr.write(
        f"gpt2: interrupted: {done} of {runs} timed configuration{'s' if runs != 1 else ''} finished"
        + (", the figures are of those\n" if done else "\n")
    )
    sys.stderr.flush()


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None] | None]:
    """A Rich progress bar on stderr when it is a terminal; nothing otherwise."""
    if not is_terminal(sys.stderr):
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gpt2cli.cli.output import stderr_console

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr_console(), transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def update(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        yield update


# --- rendering ----------------------------------------------------------------------------

_COLUMNS = (
    "prompt",
    "batch",
    "engine",
    "load s",
    "prefill tok/s",
    "decode tok/s",
    "TTFT ms",
    "p50 ms",
    "p90 ms",
    "peak MiB",
    "GB/s",
)


def _range(r: BenchResult, name: str, fmt: str) -> str:
    s = r.spread[name]
    return f"{s.median:{fmt}} ({s.min:{fmt}}-{s.max:{fmt}})" if r.repeats > 1 else f"{s.median:{fmt}}"


def _row(r: BenchResult) -> list[str]:
    return [
        str(r.prompt_tokens),
        str(r.batch_size),
        r.engine + (f" (accepts {r.acceptance_rate:.0%})" if r.acceptance_rate is not None else ""),
        f"{r.load_seconds:.2f}",
        _range(r, "prefill_tokens_per_second", ".1f"),
        _range(r, "decode_tokens_per_second", ".1f"),
        f"{r.time_to_first_token_s * 1000:.1f}",
        f"{r.token_latency_p50_s * 1000:.1f}",
        f"{r.token_latency_p90_s * 1000:.1f}",
        f"{r.peak_memory_bytes / 2**20:.0f}",
        f"{r.bandwidth_bytes_per_second / 1e9:.2f}",
    ]


def _rows(report: BenchReport) -> list[list[str]]:
    """Ours, then (when compared) theirs and a ratio row per configuration (> 1: gpt2cli faster);
    after Ctrl-C, the results no comparison holds."""
    compared = {id(r) for c in report.comparisons for r in (c.ours, c.theirs)}
    rows = []
    for c in report.comparisons:
        ratio = c.ratio
        rows += [
            _row(c.ours),
            _row(c.theirs),
            [
                str(c.prompt_tokens),
                str(c.batch_size),
                f"ratio vs {c.theirs.engine}",
                "",
                f"{ratio['prefill_tokens_per_second']:.2f}x",
                f"{ratio['decode_tokens_per_second']:.2f}x",
                f"{ratio['time_to_first_token_s']:.2f}x",
                "",
                "",
                "",
                "",
            ],
        ]
    return rows + [_row(r) for r in report.results if id(r) not in compared]


def _caption(report: BenchReport) -> str:
    r = report.results[0]
    return (
        f"{r.model} | {r.device} {r.dtype} | quantization {r.quantization} | torch {r.torch_version} | "
        f"{r.threads} threads | {r.new_tokens} new tokens | median (min-max) of {r.repeats} runs"
    )


def render_table(report: BenchReport) -> None:
    """A Rich table on a terminal; aligned plain text when stdout is piped."""
    rows = _rows(report)
    if is_terminal(sys.stdout):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=_caption(report), title_justify="left")
        for name in _COLUMNS:
            table.add_column(name, justify="left" if name == "engine" else "right")
        for row in rows:
            table.add_row(*row)
        Console(no_color=not color_allowed(sys.stdout), highlight=False).print(table)
        return
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(_COLUMNS)]
    lines = [_caption(report), "  ".join(c.rjust(w) for c, w in zip(_COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    write("\n".join(lines) + "\n")


def render_markdown(report: BenchReport) -> None:
    lines = [_caption(report), "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    write("\n".join(lines) + "\n")


def render_json(report: BenchReport) -> None:
    write_json(report.to_dict(), pretty=is_terminal(sys.stdout))


def render_csv(report: BenchReport) -> None:
    """One row per engine and configuration; gpt2cli rows carry the ratios when compared."""
    ratios = {(c.prompt_tokens, c.batch_size): c.ratio for c in report.comparisons}
    rows: list[dict[str, Any]] = []
    for r in report.results:
        row = r.flat()
        if report.comparisons:
            ratio = ratios.get((r.prompt_tokens, r.batch_size)) if r.engine == "gpt2cli" else None
            for name in ("prefill_tokens_per_second", "decode_tokens_per_second", "time_to_first_token_s"):
                row[f"ratio_{name}"] = "" if ratio is None else ratio[name]
        rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write(buf.getvalue())


_RENDERERS: dict[BenchFormat, Callable[[BenchReport], None]] = {
    BenchFormat.table: render_table,
    BenchFormat.json: render_json,
    BenchFormat.csv: render_csv,
    BenchFormat.markdown: render_markdown,
}
