"""JSON in and out: texts from JSON Lines (read lazily, bad lines named by number), and the one
JSON encoder of our outputs (``dumps``: strict JSON, a non-finite number written as null).

Stdlib only (the CLI reads input with it before loading any model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

from gpt2cli.errors import BadInputError


def dumps(obj: Any, *, ensure_ascii: bool = False, indent: int | None = None) -> str:
    """``obj`` as strict JSON: NaN and infinities (a word perplexity past float range, a metric of
    an empty text) become null, since Python's ``Infinity`` and ``NaN`` are no JSON and strict
    parsers (jq, JavaScript, Go) reject the whole line."""
    return json.dumps(_finite(obj), ensure_ascii=ensure_ascii, indent=indent, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


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
