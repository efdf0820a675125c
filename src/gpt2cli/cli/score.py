"""`gpt2 score`: perplexity, bits per byte and per-token surprisal of files or stdin."""

from __future__ import annotations

import csv
import io
import math
import shutil
import sys
from enum import Enum
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from gpt2cli.batch.jsonl import LOOKAHEAD
from gpt2cli.cli import batch
from gpt2cli.cli import options as opt
from gpt2cli.cli.output import (
    color_allowed,
    error_line,
    is_terminal,
    stderr_console,
    table,
    write,
    write_json,
)
from gpt2cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, BadInputError, Gpt2Error

COLUMNS = ["file", "tokens", "bytes", "words", "nll", "perplexity", "bits_per_byte", "word_perplexity"]
STDIN = "-"


class ScoreFormat(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


class Protocol(str, Enum):
    lm_eval = "lm-eval"
    hf = "hf"


class Color(str, Enum):
    surprisal = "surprisal"
    rank = "rank"
    entropy = "entropy"


class Errors(str, Enum):
    strict = "strict"
    replace = "replace"  # type: ignore[assignment]  # shadows str.replace, harmlessly


def score(
    files: Annotated[
        list[str] | None,
        typer.Argument(help="Text files to score; none or '-' reads stdin.", show_default=False),
    ] = None,
    model: opt.Model = "gpt2",
    context: Annotated[
        int | None, typer.Option("--context", help="Window size in tokens (default: the model's window).")
    ] = None,
    stride: Annotated[
        int | None, typer.Option("--stride", help="Tokens between window starts (default: half the context).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Windows run through the model together (default: 2048 tokens' worth on CPU, 8 on a GPU).",
            show_default=False,
        ),
    ] = None,
    output_format: Annotated[
        ScoreFormat, typer.Option("--format", help="text (a table), json, jsonl or csv.")
    ] = ScoreFormat.text,
    per_token: Annotated[
        bool,
        typer.Option(
            "--per-token",
            help="Each token's score: a heat map on a terminal; text, id, logprob and rank in json/jsonl.",
        ),
    ] = False,
    top: Annotated[
        int, typer.Option("--top", help="List the N most surprising tokens with their context.")
    ] = 0,
    errors: Annotated[
        Errors,
        typer.Option("--errors", help="Invalid UTF-8: strict refuses the file, replace scores U+FFFD."),
    ] = Errors.strict,
    protocol: Annotated[
        Protocol,
        typer.Option(
            "--protocol",
            help="lm-eval (the default: every token scored once, after an <|endoftext|> prefix) or hf "
            "(Hugging Face's perplexity guide exactly: no prefix, CONTEXT-1 predictions per window).",
        ),
    ] = Protocol.lm_eval,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    offline: opt.Offline = False,
    allow_pickle: opt.AllowPickle = False,
    quantize: opt.Quantize = None,
    jsonl: batch.Jsonl = None,
    output: batch.Output = None,
    text_field: Annotated[
        str,
        typer.Option(
            "--text-field", help="--jsonl: the field holding the text.", rich_help_panel=batch.BATCH_PANEL
        ),
    ] = "text",
    id_field: batch.IdField = "id",
    resume: batch.Resume = False,
    on_error: batch.OnErrorOption = batch.OnError.skip,
    workers: batch.Workers = 1,
    ray: batch.Ray = False,
    ray_address: batch.RayAddress = None,
    lookahead: batch.Lookahead = LOOKAHEAD,
    color: Annotated[
        Color | None,
        typer.Option(
            "--color",
            help="Per-token colouring (implies --per-token): surprisal, rank (GLTR's top-10/100/1000 "
            "buckets) or entropy of the prediction.",
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="Compare with model B over the same tokens: per-token Δlogprob, KL(A‖B), top-1 agreement.",
        ),
    ] = None,
    compare_quantize: Annotated[
        str | None,
        typer.Option(
            "--compare-quantize",
            help="Quantize B (int8 or none; default: as --quantize); B = A's model alone.",
        ),
    ] = None,
    compare_dtype: Annotated[
        str | None,
        typer.Option("--compare-dtype", help="B's dtype (default: as --dtype); B = A's model alone."),
    ] = None,
) -> None:
    """Score FILEs (or stdin) under a GPT-2 model: perplexity, bits per byte, word perplexity.

    Method (the default, --protocol lm-eval): the text is prefixed with <|endoftext|> so every
    text token is scored; windows of --context tokens (default: the model's window) advance by
    --stride tokens (default: half the context); every token is scored exactly once, with the
    left context its window gives; perplexity = exp(total NLL / scored tokens). --stride equal
    to --context gives disjoint windows. bits_per_byte and word_perplexity are
    lm-evaluation-harness's. --protocol hf reproduces Hugging Face's perplexity guide. Ctrl-C
    prints the result of what was scored so far.

    --jsonl IN scores each line's document alone, by the same method, and writes one JSON
    line per input line (id, tokens, bytes, nll, perplexity, bits_per_byte...) to --output.
    """
    _check_options(context, stride, batch_size, top)
    comparing = compare is not None or compare_quantize is not None or compare_dtype is not None
    if comparing and (top or color is not None):
        raise BadInputError("--top and --color do not apply to --compare", hint="--per-token shows Δlogprob")
    job = batch.job_options(jsonl, output, id_field, resume, on_error, workers, ray, ray_address, lookahead)
    if job is not None:
        for option, given in (
            ("FILE", bool(files)),
            ("--format", output_format is not ScoreFormat.text),
            ("--top", top > 0),
            ("--errors", errors is not Errors.strict),
            ("--protocol", protocol.value != "lm-eval"),  # documents are scored the lm-eval way
            ("--compare", comparing),
            ("--color", color is not None),
        ):
            batch.refuse(option, given)
        from gpt2cli.batch.tasks import ModelSettings, ScoreSettings

        model_settings = ModelSettings(model, device, dtype, offline, allow_pickle, quantize)
        task = ScoreSettings(text_field, context, stride, batch_size, per_token)
        batch.run(job, model_settings, task, ("scored", "documents"))
        return
    sources = _sources(files or [])

    from gpt2cli.cli.loading import load_model

    lm = load_model(
        model, device=device, dtype=dtype, offline=offline, allow_pickle=allow_pickle, quantize=quantize
    )
    asked = (context, stride)  # --compare defaults them to the smaller of the two windows
    context = lm.window if context is None else context
    stride = max(1, context // 2) if stride is None else stride
    from gpt2cli.scoring import check_windows

    check_windows(context, stride, lm.window, protocol.value)
    if comparing:
        context, stride = asked
        from gpt2cli.cli import compare as compare_cli

        a = compare_cli.Settings(model, quantize, dtype, device, offline, allow_pickle)
        b = a.other(compare, compare_quantize, compare_dtype)
        failed = compare_cli.run(
            lm, a, b, sources, open_source=_open, progress=_progress, context=context, stride=stride,
            errors=errors.value, per_token=per_token, output_format=output_format.value,
        )  # fmt: skip
        if failed:
            raise typer.Exit(failed)
        return
    renderer = _RENDERERS[output_format](per_token or color is not None, top)
    renderer.color = (color or Color.surprisal).value
    results: list[Any] = []
    failed = 0
    try:
        for source in sources:
            try:
                result = _score_one(
                    lm, source, context, stride, batch_size, errors.value, protocol.value, renderer
                )
            except Gpt2Error as exc:
                if len(sources) == 1:
                    raise
                failed += 1
                sys.stderr.write(error_line(exc.message, exc.hint))
                continue
            results.append(result)
            renderer.file_done(result)
    except KeyboardInterrupt as exc:
        _interrupted(renderer, results, getattr(exc, "partial", None), several=len(sources) > 1)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    renderer.finish(results, several=len(sources) > 1)
    if failed:
        raise typer.Exit(EXIT_RUNTIME)


def _interrupted(renderer: _Renderer, results: list[Any], partial: Any, several: bool) -> None:
    """Ctrl-C: the files done, the one being scored as far as it got, and a line saying so."""
    if partial is not None and partial.tokens:
        results.append(partial)
        renderer.file_done(partial)
    renderer.finish(results, several=several or partial is not None)
    where = f" in {partial.file} after {partial.tokens:,} tokens" if partial is not None else ""
    sys.stderr.write(f"gpt2: interrupted{where}: the figures are of the text scored so far\n")
    sys.stderr.flush()


def _check_options(context: int | None, stride: int | None, batch_size: int | None, top: int) -> None:
    """The checks that need no model (the window limit is checked once it is loaded)."""
    if context is not None and context < 1:
        raise BadInputError(f"--context {context} is below 1", hint="use 1 up to the model's window")
    if stride is not None and stride < 1:
        raise BadInputError(f"--stride {stride} is below 1", hint="use a stride between 1 and --context")
    if stride is not None and context is not None and stride > context:
        raise BadInputError(
            f"--stride {stride} is larger than --context {context}: tokens between windows would go unscored",
            hint=f"use --stride {context} (disjoint windows) or less",
        )
    if batch_size is not None and batch_size < 1:
        raise BadInputError(f"--batch-size {batch_size} is below 1", hint="use 1 or more")
    if top < 0:
        raise BadInputError(f"--top {top} is below 0", hint="use --top N with N >= 1")


def _sources(files: list[str]) -> list[str]:
    if not files:
        if is_terminal(sys.stdin) or sys.stdin is None:
            raise BadInputError(
                "no input given", hint="pass FILE..., or pipe text on stdin: cat notes.txt | gpt2 score"
            )
        return [STDIN]
    if files.count(STDIN) > 1:
        raise BadInputError("stdin ('-') can be read only once")
    return files


def _open(source: str) -> tuple[IO[bytes] | Path, str, int | None]:
    """A source as the library reads it: (stdin's bytes or a path, its name, its size if known)."""
    if source == STDIN:
        return sys.stdin.buffer, "<stdin>", None
    path = Path(source)
    return path, source, path.stat().st_size if path.is_file() else None


def _score_one(
    lm: Any,
    source: str,
    context: int,
    stride: int,
    batch_size: int | None,
    errors: str,
    protocol: str,
    renderer: _Renderer,
) -> Any:
    stream, name, size = _open(source)
    with _progress(name, size) as progress:
        return lm.score(
            stream,
            name=name,
            context=context,
            stride=stride,
            batch_size=batch_size,
            errors=errors,
            per_token=renderer.keep_tokens,
            top=renderer.top,
            on_token=renderer.token_sink(name),
            progress=progress,
            protocol=protocol,
        )


class _progress:
    """A Rich progress bar on stderr (a terminal only): bytes of text scored, tokens/s, time left."""

    def __init__(self, name: str, size: int | None) -> None:
        self.name, self.size = name, size
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not is_terminal(sys.stderr):
            return None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[tokens]} tokens, {task.fields[rate]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr_console(),
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task(self.name, total=self.size, tokens=0, rate="-")

        def update(scored: int, tokens: int) -> None:  # bytes of text scored, not merely read
            elapsed = self.bar.tasks[0].elapsed or 0.0
            rate = f"{tokens / elapsed:,.0f}" if elapsed > 0 else "-"
            self.bar.update(task, completed=scored, tokens=f"{tokens:,}", rate=rate)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- renderers ----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:.6g}"
    return str(value)


def _row(result: Any) -> dict[str, Any]:
    obj = result.to_json()
    return {key: obj[key] for key in COLUMNS}


class _Renderer:
    """Turns results into output; per-file results are written as soon as each file is done."""

    keep_tokens = False
    color = "surprisal"  # --per-token colouring on a terminal

    def __init__(self, per_token: bool, top: int) -> None:
        self.per_token, self.top = per_token, top

    def token_sink(self, name: str) -> Any:
        return None

    def file_done(self, result: Any) -> None: ...

    def finish(self, results: list[Any], several: bool) -> None: ...

    @staticmethod
    def total(results: list[Any]) -> Any:
        from gpt2cli.scoring import total

        return total(results)


class _TextRenderer(_Renderer):
    """A table: on a terminal a Rich table that fits its width, printed at the end; piped, plain
    rows as each file is done. --per-token is a heat map on a colour terminal, else a TSV that
    alone fills stdout (the table goes to stderr then)."""

    def __init__(self, per_token: bool, top: int) -> None:
        super().__init__(per_token, top)
        self.keep_tokens = per_token
        self.header = False
        self.rows: list[list[str]] = []
        self.tsv = per_token and not color_allowed(sys.stdout)
        self.rich = is_terminal(sys.stdout) and not self.tsv

    def _line(self, cells: list[str]) -> None:
        widths = [0, 9, 10, 9, 9, 11, 13, 15]
        parts = [cells[0].ljust(max(20, len(cells[0])))] + [
            c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)
        ]
        line = "  ".join(parts).rstrip() + "\n"
        if self.tsv:
            sys.stderr.write(line)
            sys.stderr.flush()
        else:
            write(line)

    def _cells(self, result: Any) -> list[str]:
        cells = [_fmt(v) for v in _row(result).values()]
        if getattr(result, "interrupted", False):
            cells[0] += " (interrupted)"
        return cells

    def file_done(self, result: Any) -> None:
        if self.per_token:
            _per_token_text(result, self.color)
        if self.rich:
            self.rows.append(self._cells(result))
        else:
            if not self.header:
                self._line(COLUMNS)
                self.header = True
            self._line(self._cells(result))
        if self.top:
            _top_text(result)

    def finish(self, results: list[Any], several: bool) -> None:
        total = [self._cells(self.total(results))] if several and results else []
        if self.rich:
            if self.rows:
                # narrow: words, bytes, word_perplexity, nll, tokens give way to perplexity and bpb
                numeric = frozenset(range(1, len(COLUMNS)))
                table(COLUMNS, self.rows + total, right=numeric, drop=(3, 2, 7, 4, 1))
            return
        for cells in total:
            self._line(cells)


class _JsonRenderer(_Renderer):
    def __init__(self, per_token: bool, top: int) -> None:
        super().__init__(per_token, top)
        self.keep_tokens = per_token

    def finish(self, results: list[Any], several: bool) -> None:
        pretty = is_terminal(sys.stdout)
        if not results:
            return  # every file failed: the errors are on stderr
        if not several:
            write_json(results[0].to_json(), pretty=pretty)
            return
        write_json(
            {"files": [r.to_json() for r in results], "total": self.total(results).to_json()}, pretty=pretty
        )


class _JsonlRenderer(_Renderer):
    """One object per token (with --per-token, streamed), per file, and the total."""

    def token_sink(self, name: str) -> Any:
        if not self.per_token:
            return None

        def sink(token: Any) -> None:
            write_json({"type": "token", "file": name, **token.to_json()})

        return sink

    def file_done(self, result: Any) -> None:
        write_json({"type": "file", **result.to_json()})

    def finish(self, results: list[Any], several: bool) -> None:
        if several and results:
            write_json({"type": "total", **self.total(results).to_json()})


class _CsvRenderer(_Renderer):
    """One row per file, then the total; with --per-token one row per token instead (the per-file
    rows go to stderr, so stdout is one table)."""

    TOKEN_COLUMNS = ["file", "position", "id", "text", "logprob", "rank"]

    def __init__(self, per_token: bool, top: int) -> None:
        super().__init__(per_token, 0)
        self.header = False
        self.token_header = False

    @staticmethod
    def _csv(row: list[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        return buf.getvalue()

    def _write(self, row: list[Any]) -> None:
        if self.per_token:
            sys.stderr.write(self._csv(row))
        else:
            write(self._csv(row))

    def token_sink(self, name: str) -> Any:
        if not self.per_token:
            return None

        def sink(token: Any) -> None:
            if not self.token_header:
                write(self._csv(self.TOKEN_COLUMNS))
                self.token_header = True
            write(self._csv([name, token.position, token.id, token.text, repr(token.logprob), token.rank]))

        return sink

    def _values(self, result: Any) -> list[Any]:
        return [repr(v) if isinstance(v, float) else v for v in _row(result).values()]

    def file_done(self, result: Any) -> None:
        if not self.header:
            self._write(COLUMNS)
            self.header = True
        self._write(self._values(result))

    def finish(self, results: list[Any], several: bool) -> None:
        if several and results:
            self._write(self._values(self.total(results)))


_RENDERERS: dict[ScoreFormat, type[_Renderer]] = {
    ScoreFormat.text: _TextRenderer,
    ScoreFormat.json: _JsonRenderer,
    ScoreFormat.jsonl: _JsonlRenderer,
    ScoreFormat.csv: _CsvRenderer,
}

# Surprisal (nats) buckets of the heat map, and their colours: cool = expected, hot = surprising.
HEAT = [(1.0, "green"), (2.5, "bright_green"), (4.0, "yellow"), (6.0, "dark_orange"), (9.0, "red")]
HEAT_TOP = "bold white on red"


# GLTR's colours for its rank buckets (top-10, top-100, top-1000, beyond).
RANK_STYLES = ["black on green", "black on yellow", "black on red", "white on magenta"]


def _legend_buckets(color: str) -> tuple[list[str], list[str], Any]:
    """(labels, styles, token -> bucket index) of a --color scheme."""
    if color == "rank":
        from gpt2cli.scoring import RANK_BUCKETS, rank_bucket

        labels = [f"top-{n}" for n in RANK_BUCKETS] + [f">{RANK_BUCKETS[-1]}"]
        return labels, RANK_STYLES, lambda t: rank_bucket(t.rank)
    limits = [limit for limit, _ in HEAT]
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip([0.0, *limits], limits, strict=False)] + [
        f">={limits[-1]:g}"
    ]
    styles = [style for _, style in HEAT] + [HEAT_TOP]
    value = (lambda t: t.entropy) if color == "entropy" else (lambda t: -t.logprob)
    return labels, styles, lambda t: next((i for i, lim in enumerate(limits) if value(t) < lim), len(limits))


def _per_token_text(result: Any, color: str = "surprisal") -> None:
    """The text coloured by ``color`` on a colour terminal, with a legend giving each colour's
    share of the tokens; otherwise one TSV line per token."""
    if not color_allowed(sys.stdout):
        write("position\tid\tlogprob\trank\tentropy\ttext\n")
        for t in result.token_scores:
            write(f"{t.position}\t{t.id}\t{t.logprob:.6g}\t{t.rank}\t{t.entropy:.6g}\t{_visible(t.text)}\n")
        return
    from rich.console import Console
    from rich.text import Text

    labels, styles, bucket = _legend_buckets(color)
    counts = [0] * len(labels)
    text = Text()
    for t in result.token_scores:
        i = bucket(t)
        counts[i] += 1
        text.append(t.text, style=styles[i])
    unit = {"rank": "rank (GLTR)", "entropy": "entropy (nats)"}.get(color, "surprisal (nats)")
    legend = Text(f"\n{unit}: ")
    for label, style, n in zip(labels, styles, counts, strict=True):
        legend.append(f" {label} {n / max(1, len(result.token_scores)):.0%} ", style=style)
    console = Console(force_terminal=True, highlight=False, markup=False, emoji=False, soft_wrap=True)
    console.print(text)
    console.print(legend)


def _visible(text: str) -> str:
    """Token text on one line: escapes for newlines, tabs and other control characters."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _top_text(result: Any) -> None:
    """The most surprising tokens, one line each; on a terminal the context fits its width."""
    write(f"most surprising tokens in {result.file}:\n")
    width = shutil.get_terminal_size().columns if is_terminal(sys.stdout) else None
    for s in result.top:
        t = s.token
        head = f"  {-t.logprob:7.3f} nats  rank {t.rank:<5} pos {t.position:<6} "
        before, token, after = _visible(s.before), f"[{_visible(t.text)}]", _visible(s.after)
        if width is not None:
            before, after = _fit_context(before, after, width - len(head) - len(token))
        write(f"{head}{before}{token}{after}\n")


def _fit_context(before: str, after: str, room: int) -> tuple[str, str]:
    """Trim the context either side of a token to ``room`` characters in all, the cut marked '…'."""
    if len(before) + len(after) <= room:
        return before, after
    room = max(room, 2)
    keep_after = min(len(after), room // 2)
    keep_before = room - keep_after
    if keep_before > len(before):
        keep_before, keep_after = len(before), room - len(before)
    before = before if keep_before >= len(before) else "…" + before[len(before) - keep_before + 1 :]
    after = after if keep_after >= len(after) else after[: max(0, keep_after - 1)] + "…"
    return before, after
