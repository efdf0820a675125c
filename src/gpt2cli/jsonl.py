"""Texts from JSON Lines: one string field of each line, read lazily, bad lines named by number.

Stdlib only (the CLI reads input with it before loading any model).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from gpt2cli.errors import BadInputError


def read_jsonl_texts(lines: Iterable[bytes | str], name: str, field: str = "text") -> Iterator[str]:
    """The ``field`` string of each non-blank JSONL line, read lazily.

    Raises:
        BadInputError: a line that is not UTF-8 or JSON, or lacks the string field (with its number).
    """
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            raise BadInputError(f"{name} line {number}: not valid UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise BadInputError(f"{name} line {number}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise BadInputError(
                f'{name} line {number}: no "{field}" string field',
                hint=f'each line must be an object like {{"{field}": "..."}}',
            )
        yield obj[field]
