"""Reading a prompt: the PROMPT argument, ``-`` for stdin, or stdin when it is piped."""

from __future__ import annotations

import os
import select
import sys

from gpt2cli.cli.output import is_terminal, warn
from gpt2cli.errors import BadInputError


def read_stdin_text() -> str:
    """All of stdin as text; invalid UTF-8 is replaced, with a warning naming the byte offset."""
    stream = sys.stdin
    if stream is None:
        return ""
    buffer = getattr(stream, "buffer", None)
    try:
        data = buffer.read() if buffer is not None else stream.read().encode("utf-8", "surrogateescape")
    except (OSError, ValueError):
        return ""  # a closed or unreadable stdin holds no prompt
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        warn(f"stdin is not valid UTF-8 (first bad byte at offset {exc.start}): replaced invalid bytes")
        return data.decode("utf-8", errors="replace")


def read_prompt(prompt: str | None, example: str = 'gpt2 generate "Once upon a time"') -> str:
    """The prompt to use (``example`` shows how to pass one, in the error's hint).

    Raises:
        BadInputError: no prompt given and none on stdin, or the prompt is empty.
    """
    if prompt == "-" or (prompt is None and not is_terminal(sys.stdin) and sys.stdin is not None):
        text = read_stdin_text()
        source = "stdin"
    elif prompt is None:
        raise BadInputError("no prompt given", hint=f"pass one: {example}, or pipe text on stdin")
    else:
        text, source = prompt, "the prompt"
    if not text.strip() and not text:
        hint = f"give some text: {example}"
        if example.startswith("gpt2 generate"):  # only generation has a meaning for no text
            hint += "; to generate unconditionally, use '<|endoftext|>' as the prompt"
        raise BadInputError(f"{source} is empty", hint=hint)
    return text


def note_ignored_stdin() -> None:
    """Say on stderr that piped text on stdin is not used when a PROMPT argument was given.

    Only text already waiting counts: an empty or idle stdin is never read or waited for.
    """
    stream = sys.stdin
    if stream is None or is_terminal(stream):
        return
    try:
        fd = stream.fileno()
        ready, _, _ = select.select([fd], [], [], 0)
        pending = bool(ready) and bool(os.read(fd, 1))
    except (OSError, ValueError):
        return
    if pending:
        warn("stdin was ignored because a PROMPT was given (pass '-' as the prompt to read stdin)")
