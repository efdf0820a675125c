"""Writing tensor files safely: refuse to clobber, never leave a half-written file, stream to disk.

One responsibility: output files of tensors. ``check_output`` is the one test of an output path
(exists without ``overwrite``, missing or unwritable folder); ``save_atomic`` writes bytes to a
temporary file beside the target and renames it into place; ``GrowingSafetensors`` writes a
safetensors file whose tensors grow along their first axis as rows are appended, holding at
most one append in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import torch
import torch.nn.functional as F

from gpt2cli.errors import BadInputError

# torch dtype -> safetensors dtype name (the format's own spelling).
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
COPY_BYTES = 16 << 20  # bytes copied at a time when the file is assembled


def check_output(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """The output path, checked before any work is done.

    Raises:
        BadInputError: the file exists (and ``overwrite`` is False), is a directory, or its
            folder is missing or not writable.
    """
    out = Path(path)
    if out.is_dir():
        raise BadInputError(f"{out} is a directory", hint="give a file name for the output")
    if out.exists() and not overwrite:
        raise BadInputError(f"{out} exists", hint="pass --overwrite to replace it, or choose another name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise BadInputError(f"cannot write {out}: folder {parent} does not exist", hint="create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(
            f"cannot write {out}: folder {parent} is not writable", hint="choose another path"
        )
    return out


def _temp_beside(path: Path, suffix: str = ".partial") -> tuple[IO[bytes], Path]:
    """A new temporary file in ``path``'s folder (so the final rename stays on one filesystem)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600; the output gets open()'s mode
    return os.fdopen(fd, "wb"), Path(name)


def umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed into place.

    Raises:
        BadInputError: see ``check_output``.
    """
    out = check_output(path, overwrite)
    stream, tmp = _temp_beside(out)
    try:
        with stream:
            stream.write(data)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``tensor`` in C order (bf16 included, which numpy lacks)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy().data)


@dataclass
class _Entry:
    """One growing tensor: its rows so far live in ``file``; ``blocks`` are (rows, last width)."""

    dtype: torch.dtype
    inner: tuple[int, ...]  # the shape after the first axis (the last may vary when pad_last)
    pad_last: bool
    file: IO[bytes]
    path: Path
    blocks: list[tuple[int, int]] = field(default_factory=list)
    committed: int = 0  # blocks that belong to committed appends
    committed_bytes: int = 0

    @property
    def width(self) -> int:
        widths = [w for _, w in self.blocks[: self.committed]]
        return max(widths, default=self.inner[-1] if self.inner else 0)

    def shape(self) -> list[int]:
        rows = sum(r for r, _ in self.blocks[: self.committed])
        inner = list(self.inner)
        if self.pad_last:
            inner[-1] = self.width
        return [rows, *inner]


class GrowingSafetensors:
    """A safetensors file whose tensors grow along their first axis as rows are appended.

    Each tensor's rows go to a temporary file beside the output as they come; ``close`` writes
    the header and copies the rows after it into a temporary output renamed into place, so
    memory stays bounded by one append and a failed run leaves nothing that looks complete.
    A tensor added with ``pad_last`` may change its last axis between appends (attention
    patterns: one text's keys); it is zero-padded to its widest. Only appends confirmed by
    ``commit`` are written, so an interruption between two commits loses nothing committed.
    Used as a context manager: a clean exit closes it, an exception discards it.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, metadata: dict[str, str] | None = None
    ) -> None:
        self.path = check_output(path, overwrite)
        self.metadata = dict(metadata or {})
        self.workdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self.entries: dict[str, _Entry] = {}

    def __enter__(self) -> GrowingSafetensors:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()

    def append(self, name: str, rows: torch.Tensor, *, pad_last: bool = False) -> None:
        """Add ``rows`` (n, ...) to tensor ``name`` (uncommitted until ``commit``).

        Raises:
            ValueError: a dtype or shape that does not continue the tensor.
        """
        if rows.dim() == 0:
            raise ValueError(f"{name}: a tensor of rows needs at least one axis")
        entry = self.entries.get(name)
        if entry is None:
            if rows.dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: dtype {rows.dtype} has no safetensors name")
            path = self.workdir / f"{len(self.entries)}.bin"
            entry = _Entry(rows.dtype, tuple(rows.shape[1:]), pad_last, open(path, "wb"), path)  # noqa: SIM115
            self.entries[name] = entry
        fixed = entry.inner[:-1] if pad_last else entry.inner
        shape = tuple(rows.shape[1:-1]) if pad_last else tuple(rows.shape[1:])
        if rows.dtype != entry.dtype or shape != fixed:
            raise ValueError(f"{name}: rows {tuple(rows.shape)} {rows.dtype} do not continue the tensor")
        entry.file.write(tensor_bytes(rows))
        entry.blocks.append((rows.shape[0], rows.shape[-1]))

    def commit(self) -> None:
        """Everything appended so far belongs in the file (and is flushed to disk)."""
        for entry in self.entries.values():
            entry.file.flush()
            entry.committed = len(entry.blocks)
            entry.committed_bytes = entry.file.tell()

    def close(self) -> Path:
        """Assemble the committed rows into the output file; return its path."""
        for entry in self.entries.values():
            entry.file.close()
        header, offset = {}, 0
        for name, entry in self.entries.items():
            shape = entry.shape()
            size = _numel(shape) * entry.dtype.itemsize
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[entry.dtype],
                "shape": shape,
                "data_offsets": [offset, offset + size],
            }
            offset += size
        if self.metadata:
            header["__metadata__"] = self.metadata  # type: ignore[assignment]
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # the format allows trailing spaces; 8-byte aligned data
        stream, tmp = _temp_beside(self.path)
        try:
            with stream:
                stream.write(len(raw).to_bytes(8, "little"))
                stream.write(raw)
                for entry in self.entries.values():
                    self._copy_rows(entry, stream)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.path

    def discard(self) -> None:
        """Drop everything: no output file is written."""
        for entry in self.entries.values():
            entry.file.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _copy_rows(entry: _Entry, out: IO[bytes]) -> None:
        with open(entry.path, "rb") as src:
            if not entry.pad_last or all(w == entry.width for _, w in entry.blocks[: entry.committed]):
                left = entry.committed_bytes
                while left:
                    chunk = src.read(min(COPY_BYTES, left))
                    out.write(chunk)
                    left -= len(chunk)
                return
            width, fixed = entry.width, _numel(entry.inner[:-1])
            for rows, w in entry.blocks[: entry.committed]:
                data = src.read(rows * fixed * w * entry.dtype.itemsize)
                block = torch.frombuffer(bytearray(data), dtype=entry.dtype).view(rows * fixed, w)
                out.write(tensor_bytes(F.pad(block, (0, width - w))))  # (rows * fixed, width)


def _numel(shape: list[int] | tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
