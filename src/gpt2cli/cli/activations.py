"""`gpt2 activations`: dump named activations of a text or a JSONL of texts to a safetensors file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli import options as opt
from gpt2cli.cli.output import is_terminal, stderr_console, warn, write
from gpt2cli.cli.prompt_input import read_prompt
from gpt2cli.errors import BadInputError
from gpt2cli.jsonl import read_jsonl_texts

DEFAULT_HOOKS = ["blocks.*.hook_resid_post"]


def activations(
    text: Annotated[
        str | None, typer.Argument(help="The text; '-' or none with piped stdin reads stdin (see --jsonl).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="The safetensors file to write.", show_default=False)
    ] = None,
    jsonl: Annotated[
        str | None,
        typer.Option(
            "--jsonl", help='Read many texts: a JSONL file (or - for stdin) with a "text" field a line.'
        ),
    ] = None,
    text_field: Annotated[
        str, typer.Option("--text-field", help="The JSONL field holding the text.")
    ] = "text",
    hook: Annotated[
        list[str] | None,
        typer.Option(
            "--hook",
            help="Hook points to save, TransformerLens names or globs (repeatable); "
            "default blocks.*.hook_resid_post.",
        ),
    ] = None,
    model: opt.Model = "gpt2",
    overwrite: opt.Overwrite = False,
    bos: opt.PrependBos = True,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    offline: opt.Offline = False,
    allow_pickle: opt.AllowPickle = False,
    quantize: opt.Quantize = None,
) -> None:
    """Save activations at TransformerLens-named hook points, with the token ids, to safetensors.

    Hooks: blocks.{L}.hook_resid_pre|mid|post, blocks.{L}.attn.hook_pattern, blocks.{L}.attn.hook_z,
    blocks.{L}.mlp.hook_post and ln_final.hook_normalized; --hook takes globs ('blocks.8.*').
    Each tensor has the token axis first, every text's tokens one after another; `tokens` holds the
    ids and `offsets` where each text starts. Written as it goes; a progress bar on a terminal.
    """
    if output is None:
        raise BadInputError("no output file", hint="pass --output FILE.safetensors")
    from gpt2cli.tensorfile import check_output

    check_output(output, overwrite)
    texts = _texts(text, jsonl, text_field)

    from gpt2cli.api import load
    from gpt2cli.inspection import ActivationsInterrupted

    lm = load(
        model, device=device, dtype=dtype, offline=offline, allow_pickle=allow_pickle, quantize=quantize
    )
    with _Progress() as progress:
        try:
            saved = lm.save_activations(
                texts, output, hook or DEFAULT_HOOKS, overwrite=overwrite, prepend_bos=bos, progress=progress
            )
        except ActivationsInterrupted as exc:
            progress.stop()
            if exc.file is not None:
                warn(
                    f"interrupted: wrote the {exc.file.texts} texts done to {exc.file.path} (complete=false)"
                )
            raise
    sys.stderr.write(
        f"wrote {saved.texts} text{'s' if saved.texts != 1 else ''} ({saved.tokens} tokens), "
        f"{len(saved.shapes) - 2} hook points to {saved.path}\n"
    )
    write(f"{saved.path}\n")


def _texts(text: str | None, jsonl: str | None, field: str) -> Iterator[str]:
    if jsonl is None:
        return iter([read_prompt(text, "gpt2 activations TEXT --output FILE.safetensors")])
    if text is not None:
        raise BadInputError("give a TEXT or --jsonl, not both")
    if jsonl == "-":
        return read_jsonl_texts(sys.stdin.buffer, "<stdin>", field)
    path = Path(jsonl)
    if not path.is_file():
        raise BadInputError(f"{jsonl}: no such file", hint="give a JSONL file, or - for stdin")
    return _file_texts(path, field)


def _file_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, "rb") as stream:
        yield from read_jsonl_texts(stream, str(path), field)


class _Progress:
    """A Rich progress display of texts and tokens done, on stderr when it is a terminal."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if is_terminal(sys.stderr):
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.fields[texts]} texts, {task.fields[tokens]} tokens"),
                TimeElapsedColumn(),
                console=stderr_console(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("activations", total=None, texts=0, tokens=0)
        return self

    def __call__(self, texts: int, tokens: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, texts=f"{texts:,}", tokens=f"{tokens:,}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __exit__(self, *exc: object) -> None:
        self.stop()
