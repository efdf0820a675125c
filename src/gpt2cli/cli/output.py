"""Where output goes and how it looks: stdout carries only the product, the rest goes to stderr.

Colour and Rich chrome only on a terminal, never with NO_COLOR; generated text is written
verbatim (never parsed as markup, never re-wrapped) and flushed as it comes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import IO, Any

from gpt2cli.errors import Gpt2Error
from gpt2cli.jsonl import dumps


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
    write(dumps(obj, indent=2 if pretty else None) + "\n")


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


def visible(text: str) -> str:
    """Token text on one line: escapes for newlines, tabs and other control characters."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# A value in [0, 1] (a probability, an attention weight) as a shade and a colour, so the terminal
# views read without colour too (NO_COLOR, or text copied from a terminal).
SHADES = [(0.05, " ", "grey42"), (0.25, "░", "blue"), (0.5, "▒", "cyan"), (0.75, "▓", "green")]
SHADE_TOP = ("█", "bold yellow")


def shade(value: float) -> tuple[str, str]:
    """(character, Rich style) of a value in [0, 1]."""
    return next(((char, style) for limit, char, style in SHADES if value < limit), SHADE_TOP)


def shade_legend(title: str) -> Any:
    """The shade scale's legend as Rich text: ``title:  ' '<0.05  ░<0.25 ... █>=0.75``."""
    from rich.text import Text

    legend = Text(f"{title}: ")
    for limit, char, style in SHADES:
        legend.append(f" {char}<{limit:g} ", style=style)
    legend.append(f" {SHADE_TOP[0]}>={SHADES[-1][0]:g} ", style=SHADE_TOP[1])
    return legend


def product_console(width: int | None = None) -> Any:
    """A Rich console for product output on stdout: colour unless NO_COLOR, never markup."""
    from rich.console import Console

    return Console(
        no_color=not color_allowed(sys.stdout),
        highlight=False,
        markup=False,
        emoji=False,
        width=width,
    )


def each_source(
    sources: list[str], run: Callable[[str], Any], done: Callable[[Any], None]
) -> tuple[list[Any], int]:
    """``run`` each source and hand its result to ``done``; returns (results, failures).

    With several sources a failing one prints its error line and the others still run; a
    single source's error propagates.
    """
    results, failed = [], 0
    for source in sources:
        try:
            result = run(source)
        except Gpt2Error as exc:
            if len(sources) == 1:
                raise
            failed += 1
            sys.stderr.write(error_line(exc.message, exc.hint))
            continue
        results.append(result)
        done(result)
    return results, failed
