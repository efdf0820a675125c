"""The one reader of a safetensors header: an 8-byte little-endian length, then that much JSON.

Stdlib only: ``weights`` (loading), ``cache`` (parameter counts, verification) use it without
touching any tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100_000_000  # a header larger than this is not a real checkpoint's


class HeaderError(ValueError):
    """The file is too short for its header, or the header is not a JSON object."""


def read_header(path: Path, size: int | None = None) -> tuple[int, dict[str, Any]]:
    """(header length in bytes, the header) of the safetensors file ``path``.

    ``size``: the file's size, when known, to refuse a header longer than the file.

    Raises:
        OSError: the file cannot be read (FileNotFoundError when it is missing).
        HeaderError: truncated, oversized or unparsable header.
    """
    with open(path, "rb") as fh:
        length = _length(fh.read(8), path)
        if length > MAX_HEADER_BYTES or (size is not None and length > size - 8):
            raise HeaderError(f"{path} is truncated or not safetensors")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise HeaderError(f"{path} has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise HeaderError(f"{path} has a corrupt safetensors header: not a JSON object")
    return length, header


def tensor_entries(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The header's tensors (everything but ``__metadata__``)."""
    return {name: info for name, info in header.items() if name != "__metadata__"}


def header_length(path: Path) -> int:
    """The header length the file's first 8 bytes state (it may be longer than the file).

    Raises:
        OSError: the file cannot be read.
        HeaderError: fewer than 8 bytes.
    """
    with open(path, "rb") as fh:
        return _length(fh.read(8), path)


def _length(head: bytes, path: Path) -> int:
    if len(head) < 8:
        raise HeaderError(f"{path} is truncated ({len(head)} bytes): not safetensors")
    return int(struct.unpack("<Q", head)[0])
