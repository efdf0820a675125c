"""JSONL in and out for batch jobs: numbered input lines, parsed records, the output file.

Stdlib only. Input is read in chunks as it comes (a pipe streams); each non-blank line is a
``Record`` holding its id (the ``--id-field`` value, else the line number) or the reason it
cannot be used. Output lines are appended and flushed one at a time; ``open_output`` with
``resume`` reads the ids an earlier run wrote and cuts off a partial last line (a run killed
mid-write), so a resumed job writes every id exactly once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gpt2cli.errors import BadInputError
from gpt2cli.jsonl import dumps

READ_BYTES = 1 << 20  # bytes read from the input at a time
STDIO = "-"
LOOKAHEAD = 256  # input lines per chunk: sorted and batched together, the unit of work


class BatchInputError(BadInputError):
    """A job's input or output file cannot be used as given."""


@dataclass(frozen=True)
class Line:
    """One input line: its 1-based number, its bytes (no newline) and where it ends in the input."""

    number: int
    data: bytes
    end: int
    complete: bool = True  # ended with a newline


def read_lines(stream: IO[bytes], read_bytes: int = READ_BYTES) -> Iterator[Line]:
    """The lines of a binary stream, as soon as each is complete (``read1`` where there is one)."""
    read = getattr(stream, "read1", stream.read)
    buf, number, offset = b"", 0, 0  # offset: input bytes before buf
    while chunk := read(read_bytes):
        buf += chunk
        start = 0
        while (newline := buf.find(b"\n", start)) >= 0:
            number += 1
            yield Line(number, buf[start:newline], offset + newline + 1)
            start = newline + 1
        offset += start
        buf = buf[start:]
    if buf:
        yield Line(number + 1, buf, offset + len(buf), complete=False)


def chunks(stream: IO[bytes], size: int) -> Iterator[list[Line]]:
    """The non-blank lines of ``stream`` (its documents) in chunks of ``size``."""
    chunk: list[Line] = []
    for line in read_lines(stream):
        if line.data.strip():
            chunk.append(line)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


@dataclass
class Record:
    """A parsed input line: its id, its fields, or the reason it cannot be used (``error``)."""

    number: int
    end: int
    id: Any
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> str:
        """The id as the output file holds it (``1`` and ``"1"`` are different ids)."""
        return id_key(self.id)


def id_key(ident: Any) -> str:
    return json.dumps(ident, ensure_ascii=False)


def parse_line(line: Line, id_field: str, text_field: str) -> Record:
    """The record of one input line (``chunks`` leaves out blank lines: they are not documents).

    ``text_field`` must hold a non-empty string; ``id_field``, if present, a string or an integer.
    """
    try:
        obj = json.loads(line.data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return _bad(line, line.number, f"not valid UTF-8 (invalid byte at offset {exc.start} of the line)")
    except json.JSONDecodeError as exc:
        return _bad(line, line.number, f"not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return _bad(line, line.number, "not a JSON object")
    ident = obj.get(id_field, line.number)
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        return _bad(
            line, line.number, f'"{id_field}" must be a string or an integer, not {json.dumps(ident)}'
        )
    value = obj.get(text_field)
    problem = None
    if text_field not in obj:
        problem = f'no "{text_field}" field'
    elif not isinstance(value, str):
        problem = f'"{text_field}" is not a string'
    elif not value:
        problem = f'"{text_field}" is empty'
    elif not _is_unicode(value):
        problem = f'"{text_field}" holds a lone surrogate escape: not valid Unicode text'
    if problem:
        return _bad(line, ident, problem)
    return Record(line.number, line.end, ident, obj)


def _bad(line: Line, ident: Any, problem: str) -> Record:
    return Record(line.number, line.end, ident, error=f"line {line.number}: {problem}")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Outcome:
    """What a task made of one record: the output line and the sums the summary needs.

    ``kind`` is ``done``, ``error`` (the line holds an ``error`` field) or ``skipped`` (already
    in the output of an earlier run: no line is written).
    """

    number: int
    end: int
    line: str
    kind: str = "done"
    error: str | None = None
    tokens: int = 0
    bytes: int = 0
    total_nll: float = 0.0


def to_line(obj: dict[str, Any]) -> str:
    """One output line: JSON (UTF-8 where it can be, else ASCII escapes) and a newline."""
    text = dumps(obj)
    if not _is_unicode(text):  # an id with a lone surrogate escape: keep it escaped
        text = dumps(obj, ensure_ascii=True)
    return text + "\n"


def error_outcome(record: Record) -> Outcome:
    assert record.error is not None
    line = to_line({"id": record.id, "line": record.number, "error": record.error})
    return Outcome(record.number, record.end, line, kind="error", error=record.error)


def skipped_outcome(record: Record) -> Outcome:
    return Outcome(record.number, record.end, "", kind="skipped")


# --- the output file ----------------------------------------------------------------------------


class Output:
    """Appends output lines to a file (or stdout), each written whole and flushed."""

    def __init__(self, stream: IO[bytes], close: bool) -> None:
        self.stream, self._close = stream, close

    def write(self, line: str) -> None:
        if line:
            self.stream.write(line.encode("utf-8"))
            self.stream.flush()

    def close(self) -> None:
        if self._close:
            self.stream.close()


@dataclass
class Resumed:
    """What an earlier run left in the output: the ids it wrote, and whether a partial line was cut."""

    done: set[str] = field(default_factory=set)
    repaired: bool = False


def open_output(path: str, resume: bool) -> tuple[Output, Resumed]:
    """Open the output for appending; with ``resume``, read (and repair) what is already there.

    Raises:
        BatchInputError: the file exists without ``--resume``, ``--resume`` with stdout, or it
            holds a line this job did not write.
    """
    if path == STDIO:
        if resume:
            raise BatchInputError("--resume needs an --output file", hint="give --output OUT.jsonl")
        return Output(sys.stdout.buffer, close=False), Resumed()
    target = Path(path)
    if target.is_dir():
        raise BatchInputError(f"--output {path} is a directory", hint="give a file name")
    exists = target.is_file() and target.stat().st_size > 0
    if exists and not resume:
        raise BatchInputError(
            f"{path} already exists", hint="pass --resume to continue it, or remove it to start again"
        )
    resumed = _scan(target) if exists else Resumed()
    try:
        stream = open(target, "ab")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise BatchInputError(f"cannot write {path} ({exc.strerror or exc})") from exc
    return Output(stream, close=True), resumed


def _scan(path: Path) -> Resumed:
    """Ids of the complete lines of an earlier run's output; a partial last line is cut off."""
    resumed = Resumed()
    cut: int | None = None  # where a partial last line starts
    start, size = 0, path.stat().st_size
    with open(path, "rb") as stream:
        for line in read_lines(stream):
            obj = _output_object(line)
            if obj is None:
                if line.end < size:
                    raise BatchInputError(
                        f"{path} line {line.number} is not a line of a batch job's output",
                        hint="give another --output, or remove the file to start again",
                    )
                cut = start  # the last line, half written: write it again
            else:
                resumed.done.add(id_key(obj["id"]))
            start = line.end
    if cut is not None:
        with open(path, "r+b") as stream:
            stream.truncate(cut)
        resumed.repaired = True
    return resumed


def _output_object(line: Line) -> dict[str, Any] | None:
    if not line.complete:
        return None
    try:
        obj = json.loads(line.data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) and "id" in obj else None
