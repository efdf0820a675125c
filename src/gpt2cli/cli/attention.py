"""`gpt2 attention`: attention patterns as heat maps on a terminal, as lists or data elsewhere."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli import options as opt
from gpt2cli.cli.output import (
    StdoutClosed,
    is_terminal,
    product_console,
    shade,
    shade_legend,
    visible,
    write,
)
from gpt2cli.cli.prompt_input import read_prompt
from gpt2cli.errors import BadInputError

LABEL = 16  # the query column of a heat map: position and token


class AttentionFormat(str, Enum):
    text = "text"
    json = "json"
    npy = "npy"
    safetensors = "safetensors"


BINARY = (AttentionFormat.npy, AttentionFormat.safetensors)


def attention(
    text: Annotated[
        str | None, typer.Argument(help="The text; '-' or none with piped stdin reads stdin.")
    ] = None,
    model: opt.Model = "gpt2",
    layer: Annotated[
        str, typer.Option("--layer", help="Layers: all, or numbers and slices such as 0,5:8,-1.")
    ] = "all",
    head: Annotated[
        str, typer.Option("--head", help="Heads: all, or numbers and slices such as 0,3.")
    ] = "all",
    top: Annotated[
        int | None,
        typer.Option(
            "--top",
            min=1,
            help="List each query's K most attended keys (the view for long texts; default 3).",
        ),
    ] = None,
    output_format: Annotated[
        AttentionFormat,
        typer.Option(
            "--format", help="text (heat maps or lists), json, npy or safetensors (layer, head, query, key)."
        ),
    ] = AttentionFormat.text,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the data to this file instead of stdout.")
    ] = None,
    overwrite: opt.Overwrite = False,
    bos: opt.PrependBos = True,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    offline: opt.Offline = False,
    allow_pickle: opt.AllowPickle = False,
    quantize: opt.Quantize = None,
) -> None:
    """Attention patterns of chosen layers and heads over a text.

    On a terminal: one heat map per (layer, head), query rows x key columns, for a text that
    fits the width; otherwise, or with --top K, each query's K most attended keys. Piped text
    is a TSV of those lists. json, npy and safetensors hold the weights with shape
    (layer, head, query, key); safetensors adds the token ids.
    """
    if output is not None:
        from gpt2cli.tensorfile import check_output

        check_output(output, overwrite)
    elif output_format in BINARY and is_terminal(sys.stdout):
        raise BadInputError(
            f"--format {output_format.value} is binary",
            hint="pass --output FILE, or redirect stdout to a file",
        )
    prompt = read_prompt(text, 'gpt2 attention "The cat sat on the mat"')

    from gpt2cli.api import load

    lm = load(
        model, device=device, dtype=dtype, offline=offline, allow_pickle=allow_pickle, quantize=quantize
    )
    result = lm.attention(prompt, layers=layer, heads=head, prepend_bos=bos)
    if output_format is AttentionFormat.text and output is None:
        _render_text(result, top)
        return
    data = _encode(result, output_format, top)
    if output is not None:
        from gpt2cli.tensorfile import save_atomic

        save_atomic(output, data, overwrite=overwrite)
        sys.stderr.write(f"wrote {output_format.value} {tuple(result.pattern.shape)} to {output}\n")
        return
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise StdoutClosed from exc


def _encode(result: Any, output_format: AttentionFormat, top: int | None) -> bytes:
    if output_format is AttentionFormat.npy:
        return bytes(result.to_npy())
    if output_format is AttentionFormat.safetensors:
        return bytes(result.to_safetensors())
    if output_format is AttentionFormat.json:
        from gpt2cli.jsonl import dumps

        return (dumps(result.to_json()) + "\n").encode("utf-8")
    return "".join(_tsv_lines(result, top or 3)).encode("utf-8")


def _render_text(result: Any, top: int | None) -> None:
    if not is_terminal(sys.stdout):
        for line in _tsv_lines(result, top or 3):
            write(line)
        return
    console = product_console()
    if top is None and LABEL + 2 * len(result.tokens) <= console.width:
        render_heatmaps(result, console)
    else:
        render_lists(result, console, top or 3)


def _tsv_lines(result: Any, k: int) -> Any:
    yield "layer\thead\tquery\tquery_token\trank\tkey\tkey_token\tweight\n"
    tokens = result.tokens
    for a in result.top_keys(k):
        for rank, (key, weight) in enumerate(a.keys, start=1):
            yield (
                f"{a.layer}\t{a.head}\t{a.query}\t{visible(tokens[a.query].text)}\t{rank}\t{key}\t"
                f"{visible(tokens[key].text)}\t{weight:.6g}\n"
            )


def _label(position: int, text: str) -> str:
    label = f"{position:>3} {visible(text)}"
    return (label if len(label) <= LABEL - 1 else label[: LABEL - 2] + "…").ljust(LABEL)


def render_heatmaps(result: Any, console: Any) -> None:
    """One heat map per (layer, head): a row per query, two characters per key, shaded by weight."""
    from rich.text import Text

    T = len(result.tokens)
    keys = " " * LABEL + "".join(f"{k % 100:>2}" for k in range(T))
    for li, layer in enumerate(result.layers):
        for hi, head in enumerate(result.heads):
            console.print(Text(f"layer {layer} head {head} (rows: queries, columns: keys)", style="bold"))
            console.print(Text(keys, style="dim"))
            for q in range(T):
                line = Text(_label(q, result.tokens[q].text))
                for k in range(q + 1):
                    char, style = shade(float(result.pattern[li, hi, q, k]))
                    line.append(char * 2, style=style)
                console.print(line, no_wrap=True, overflow="crop")
            console.print()
    console.print(shade_legend("weight"))


def render_lists(result: Any, console: Any, k: int) -> None:
    """For every (layer, head): each query and its ``k`` most attended keys with their weights."""
    from rich.text import Text

    tokens = result.tokens
    current = None
    for a in result.top_keys(k):
        if (a.layer, a.head) != current:
            current = (a.layer, a.head)
            console.print(
                Text(f"layer {a.layer} head {a.head}: the keys each query attends to most", style="bold")
            )
        line = Text(_label(a.query, tokens[a.query].text) + "-> ")
        for i, (key, weight) in enumerate(a.keys):
            _, style = shade(weight)
            line.append(
                ("" if i == 0 else ", ") + f"{key} {visible(tokens[key].text)!r} {weight:.2f}", style=style
            )
        console.print(line, no_wrap=True, overflow="ellipsis")
