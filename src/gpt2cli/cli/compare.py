"""`gpt2 score --compare`: two models over the same tokens, rendered (the comparison is comparison.py's)."""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass, replace
from typing import Any

from gpt2cli.cli.output import (
    color_allowed,
    each_source,
    is_terminal,
    product_console,
    visible,
    write,
    write_json,
)
from gpt2cli.errors import EXIT_RUNTIME

COLUMNS = [
    "file",
    "tokens",
    "mean_kl",
    "perplexity_a",
    "perplexity_b",
    "delta_perplexity",
    "perplexity_ratio",
    "same_top1",
    "cross_perplexity",
    "binoculars",
]
# Δlogprob (nats) buckets of the heat map: red where B finds the token less likely, blue more.
DELTA = [
    (-2.0, "bold red"),
    (-0.5, "red"),
    (-0.1, "dark_orange"),
    (0.1, "default"),
    (0.5, "cyan"),
    (2.0, "blue"),
]
DELTA_TOP = "bold blue"


@dataclass(frozen=True)
class Settings:
    """How one side of the comparison is loaded."""

    model: str
    quantize: str | None
    dtype: str
    device: str
    offline: bool
    allow_pickle: bool

    def other(self, model: str | None, quantize: str | None, dtype: str | None) -> Settings:
        """Model B: A's settings with --compare, --compare-quantize and --compare-dtype applied."""
        return replace(
            self,
            model=model or self.model,
            quantize=self.quantize if quantize is None else quantize,
            dtype=dtype or self.dtype,
        )

    @property
    def label(self) -> str:
        """How the model is named in the output: its spec, and its weights when not the default."""
        extras = [q for q in (self.quantize,) if q and q.lower() != "none"]
        extras += [self.dtype] if self.dtype != "auto" else []
        return f"{self.model} [{', '.join(extras)}]" if extras else self.model

    def load(self) -> Any:
        from gpt2cli.api import load

        return load(
            self.model,
            device=self.device,
            dtype=self.dtype,
            offline=self.offline,
            allow_pickle=self.allow_pickle,
            quantize=self.quantize,
        )


def run(
    lm_a: Any,
    a: Settings,
    b: Settings,
    sources: list[str],
    *,
    open_source: Any,
    progress: Any,
    context: int | None,
    stride: int | None,
    errors: str,
    per_token: bool,
    output_format: str,
) -> int:
    """Load B, compare A (``lm_a``) with it over every source and render; the exit status.

    ``open_source(source)`` gives (stream or path, name, size) as ``gpt2 score`` reads a source;
    ``progress(name, size)`` is its progress bar (a context manager giving the callback or None).
    """
    lm_b = b.load()
    names = (a.label, b.label)
    renderer = _Renderer(output_format, per_token, names)

    def one(source: str) -> Any:
        stream, name, size = open_source(source)
        with progress(name, size) as on_progress:
            return lm_a.compare(
                lm_b,
                stream,
                name=name,
                context=context,
                stride=stride,
                errors=errors,
                per_token=per_token and output_format != "jsonl",
                on_token=renderer.token_sink(name),
                names=names,
                progress=on_progress,
            )

    results, failed = each_source(sources, one, renderer.file_done)
    renderer.finish(results)
    return EXIT_RUNTIME if failed else 0


class _Renderer:
    """text: a table of totals (and, with --per-token, a heat map or TSV); json; jsonl; csv."""

    def __init__(self, output_format: str, per_token: bool, names: tuple[str, str]) -> None:
        self.format, self.per_token, self.names = output_format, per_token, names
        self.header = False

    def token_sink(self, name: str) -> Any:
        if self.format != "jsonl" or not self.per_token:
            return None
        return lambda diff: write_json({"type": "token", "file": name, **diff.to_json()})

    def _row(self, result: Any) -> list[Any]:
        obj = result.to_json()
        return [obj[key] for key in COLUMNS]

    def file_done(self, result: Any) -> None:
        if self.format == "jsonl":
            write_json({"type": "file", **result.to_json()})
        elif self.format == "csv":
            self._csv(result)
        elif self.format == "text":
            if self.per_token:
                _per_token_text(result)
            self._table_row(result)

    def _csv(self, result: Any) -> None:
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        if not self.header:
            out.writerow(["model_a", "model_b", *COLUMNS])
            self.header = True
        out.writerow([*self.names, *(repr(v) if isinstance(v, float) else v for v in self._row(result))])
        write(buf.getvalue())

    def _table_row(self, result: Any) -> None:
        """A block per file: fits a narrow terminal, reads in a pipe."""
        if not self.header:
            write(f"A = {self.names[0]}, B = {self.names[1]}\n")
            self.header = True
        r = result
        write(
            f"{r.file}: {r.tokens} tokens\n"
            f"  mean KL(A||B)     {r.mean_kl:.4g} nats\n"
            f"  perplexity A, B   {r.perplexity_a:.5g}, {r.perplexity_b:.5g} "
            f"(delta {r.delta_perplexity:+.4g}, ratio {r.perplexity_ratio:.5g})\n"
            f"  same top-1        {r.same_top1_fraction:.1%}\n"
            f"  cross-perplexity  {r.cross_perplexity:.5g}\n"
            f"  binoculars        {r.binoculars:.5g}\n"
        )

    def finish(self, results: list[Any]) -> None:
        if not results:
            return
        from gpt2cli.comparison import total

        several = len(results) > 1
        if self.format == "json":
            obj = (
                results[0].to_json()
                if not several
                else {
                    "files": [r.to_json() for r in results],
                    "total": total(results).to_json(),
                }
            )
            write_json(obj, pretty=is_terminal(sys.stdout))
        elif several and self.format == "jsonl":
            write_json({"type": "total", **total(results).to_json()})
        elif several and self.format == "csv":
            self._csv(total(results))
        elif several:
            self._table_row(total(results))


def _delta_style(delta: float) -> str:
    return next((style for limit, style in DELTA if delta < limit), DELTA_TOP)


def _per_token_text(result: Any) -> None:
    """Tokens coloured by Δlogprob on a colour terminal; otherwise one TSV line per token."""
    if not color_allowed(sys.stdout):
        write("position\tid\tdelta_logprob\tlogprob_a\tlogprob_b\tkl\tsame_top1\ttext\n")
        for t in result.token_diffs:
            write(
                f"{t.position}\t{t.id}\t{t.delta_logprob:.6g}\t{t.logprob_a:.6g}\t{t.logprob_b:.6g}\t"
                f"{t.kl:.6g}\t{int(t.same_top1)}\t{visible(t.text)}\n"
            )
        return
    from rich.text import Text

    console = product_console()
    text = Text()
    for t in result.token_diffs:
        text.append(t.text, style=_delta_style(t.delta_logprob))
    legend = Text("\nΔlogprob = log p_B - log p_A (nats): ")
    lower = "-inf"
    for limit, style in DELTA:
        legend.append(f" {lower}..{limit:g} ", style=style)
        lower = f"{limit:g}"
    legend.append(f" >={lower} ", style=DELTA_TOP)
    console.print(text, soft_wrap=True)
    console.print(legend)
