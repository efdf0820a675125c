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
