"""`gpt2 lens`: the logit lens, as a layer x position grid on a terminal and as data in pipes."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated, Any

import typer

from gpt2cli.cli import options as opt
from gpt2cli.cli.output import is_terminal, product_console, shade, shade_legend, visible, write, write_json
from gpt2cli.cli.prompt_input import read_prompt

CELL = 9  # characters per grid cell: a shade, a space and 7 of the top-1 token
LABEL = 5  # the layer column ("L11")


class At(str, Enum):
    pre = "pre"
    mid = "mid"
    post = "post"


def lens(
    text: Annotated[
        str | None, typer.Argument(help="The text; '-' or none with piped stdin reads stdin.")
    ] = None,
    model: opt.Model = "gpt2",
    at: Annotated[
        At, typer.Option("--at", help="Residual stream read: pre (block input), mid (after attention), post.")
    ] = At.post,
    layers: Annotated[
        str, typer.Option("--layers", help="Layers: all, or numbers and slices such as 0,6:9,-1.")
    ] = "all",
    positions: Annotated[
        str, typer.Option("--positions", help="Positions (0 is <|endoftext|>): all, or e.g. -8: or 1,4:6.")
    ] = "all",
    top: Annotated[int, typer.Option("--top", min=1, help="Candidate tokens kept per cell.")] = 5,
    output_format: Annotated[
        opt.TextFormat,
        typer.Option(
            "--format", help="text (a grid on a terminal, TSV in a pipe), json or jsonl (one cell a line)."
        ),
    ] = opt.TextFormat.text,
    bos: opt.PrependBos = True,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    offline: opt.Offline = False,
    allow_pickle: opt.AllowPickle = False,
    quantize: opt.Quantize = None,
) -> None:
    """The logit lens: what each layer's residual stream predicts for the next token.

    Each chosen layer's residual stream (--at) goes through the final layer norm and the
    unembedding. On a terminal: a layer x position grid, each cell the top-1 token, its shade and
    colour the probability of the token that actually comes next. Piped: one TSV row per cell.
    """
    prompt = read_prompt(text, 'gpt2 lens "The capital of France is"')

    from gpt2cli.api import load

    lm = load(
        model, device=device, dtype=dtype, offline=offline, allow_pickle=allow_pickle, quantize=quantize
    )
    result = lm.lens(prompt, at=at.value, layers=layers, positions=positions, top=top, prepend_bos=bos)
    if output_format is opt.TextFormat.json:
        write_json(result.to_json(), pretty=is_terminal(sys.stdout))
    elif output_format is opt.TextFormat.jsonl:
        for cell in result.cells:
            write_json(cell.to_json())
    elif is_terminal(sys.stdout):
        render_grid(result, product_console())
    else:
        write_tsv(result)


def write_tsv(result: Any) -> None:
    """One row per (layer, position): the target's log-probability and rank, then the top-k."""
    k = len(result.cells[0].top) if result.cells else 0
    tops = [f"top{i}\ttop{i}_logprob" for i in range(1, k + 1)]
    write("\t".join(["layer", "position", "token", "target", "target_logprob", "target_rank", *tops]) + "\n")
    for c in result.cells:
        target = "" if c.target is None else visible(c.target.text)
        lp = "" if c.target_logprob is None else f"{c.target_logprob:.6g}"
        rank = "" if c.target_rank is None else str(c.target_rank)
        cands = [f"{visible(t.text)}\t{t.logprob:.6g}" for t in c.top]
        write(
            "\t".join([str(c.layer), str(c.position), visible(c.token.text), target, lp, rank, *cands]) + "\n"
        )


def _clip(text: str, width: int) -> str:
    text = visible(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def render_grid(result: Any, console: Any) -> None:
    """Layer rows x position columns, split into as many stacked grids as the width needs."""
    from rich.table import Table
    from rich.text import Text

    per_grid = max(1, (console.width - LABEL - 1) // (CELL + 1))
    console.print(
        Text(
            f"logit lens of {result.model}: resid_{result.at} -> ln_f -> unembedding; cell = top-1 token, "
            "shade = probability of the actual next token",
        )
    )
    for start in range(0, len(result.positions), per_grid):
        chunk = result.positions[start : start + per_grid]
        table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
        table.add_column("", width=LABEL, no_wrap=True)
        for p in chunk:
            table.add_column(f"{p}\n{_clip(result.tokens[p].text, CELL)}", width=CELL, no_wrap=True)
        for layer in result.layers:
            row = []
            for p in chunk:
                cell = result.cell(layer, p)
                char, style = shade(cell.target_prob or 0.0) if cell.target is not None else (" ", "")
                row.append(Text(f"{char} {_clip(cell.top[0].text, CELL - 2)}", style=style))
            table.add_row(f"L{layer}", *row)
        nxt = [
            Text(_clip(result.tokens[p + 1].text, CELL) if p + 1 < len(result.tokens) else "", style="dim")
            for p in chunk
        ]
        table.add_row(Text("next", style="dim"), *nxt)
        console.print(table)
        console.print()
    console.print(shade_legend("p(next)"))
