"""Where output goes and how it looks: stdout carries only the product, the rest goes to stderr.

Colour and Rich chrome only on a terminal, never with NO_COLOR; generated text is written
verbatim (never parsed as markup, never re-wrapped) and flushed as it comes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any


def is_terminal(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (ValueError, OSError):
        return False


def color_allowed(stream: IO[str] | None) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set or TERM=dumb."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    return is_terminal(stream)


def stderr_console() -> Any:
    """A Rich console for chrome on stderr (plain when it is not a colour terminal)."""
    from rich.console import Console

    return Console(
        stderr=True,
        no_color=not color_allowed(sys.stderr),
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=True,
    )


class StdoutClosed(Exception):
    """The reader of stdout went away (``| head``). Not an OSError, so Click leaves it alone."""


def write(text: str) -> None:
    """Write product text to stdout verbatim and flush it.

    Raises:
        StdoutClosed: the pipe was closed by its reader.
    """
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise StdoutClosed from exc


def write_json(obj: Any, *, pretty: bool = False) -> None:
    write(json.dumps(obj, ensure_ascii=False, indent=2 if pretty else None) + "\n")


def dim(text: str) -> str:
    """``text`` dimmed with an ANSI code when stdout is a colour terminal, else unchanged."""
    return f"\x1b[2m{text}\x1b[0m" if color_allowed(sys.stdout) else text


def warn(message: str) -> None:
    """One warning line on stderr."""
    sys.stderr.write(f"gpt2: warning: {message}\n")
    sys.stderr.flush()


def error_line(message: str, hint: str | None) -> str:
    line = f"gpt2: error: {message}\n"
    if hint:
        line += f"  hint: {hint}\n"
    return line


def table(
    header: list[str] | None,
    rows: list[list[str]],
    *,
    right: frozenset[int] = frozenset(),
    title: str | None = None,
    indent: str = "",
    drop: tuple[int, ...] = (),
) -> None:
    """Write a table to stdout: a Rich table that fits the terminal's width, or, piped, plain
    aligned columns separated by two spaces (it reads the same in a file and greps well).

    ``right`` holds the indexes of right-aligned (numeric) columns; on a terminal too narrow
    for every column, the columns in ``drop`` are left out, in that order, until the rest fit,
    and what still does not fit wraps inside its cell (never cut).
    """
    if not is_terminal(sys.stdout):
        write(plain_table(([header] if header else []) + rows, right=right, indent=indent, title=title))
        return
    from rich import box
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table

    console = Console(no_color=not color_allowed(sys.stdout), highlight=False, markup=False, emoji=False)
    shown = list(range(len(header) if header is not None else max((len(r) for r in rows), default=0)))
    widths = [max([len(r[i]) for r in rows] + [len(header[i]) if header else 0]) for i in shown]
    for column in drop:
        # Rich's simple box: a padded divider of three characters between columns
        if sum(widths[i] for i in shown) + 3 * (len(shown) - 1) + len(indent) <= console.width:
            break
        shown.remove(column)
    grid = Table(
        title=title,
        title_justify="left",
        show_header=header is not None,
        box=box.SIMPLE_HEAD if header is not None else None,
        show_edge=False,
        pad_edge=False,
    )
    for i in shown:
        name = header[i] if header else ""
        grid.add_column(name, justify="right" if i in right else "left", overflow="fold")
    for row in rows:
        grid.add_row(*(row[i] for i in shown))
    console.print(Padding(grid, (0, 0, 0, len(indent))) if indent else grid)


def plain_table(
    rows: list[list[str]], *, right: frozenset[int] = frozenset(), indent: str = "", title: str | None = None
) -> str:
    """Aligned columns separated by two spaces, trailing spaces trimmed."""
    lines = [title] if title else []
    if rows:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            cells = [
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ]
            lines.append(indent + "  ".join(cells).rstrip())
    return "".join(f"{line}\n" for line in lines)
