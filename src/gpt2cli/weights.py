"""Checkpoint files in, a normalised state dict out (and back to the Hub's layout for saving).

The core, ``normalize_state_dict``, is a pure dict-to-dict function: strip ``transformer.``,
drop the stored causal-mask buffers, transpose the four Conv1D weights, drop the tied lm_head,
then check every key and shape against the config.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from io import BufferedReader
from pathlib import Path
from typing import Protocol

import torch

from gpt2cli.config import GPT2Config
from gpt2cli.errors import CorruptWeightsError, NotGPT2Error, UnsafeWeightsError
from gpt2cli.safetensors_header import HeaderError, read_header, tensor_entries

# Conv1D layers store their weight as (in, out); nn.Linear wants (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some checkpoints carry: the causal mask and its fill value. We never need them.
IGNORED_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every parameter of our model, with its shape, in our (out, in) layout."""
    C, inner = config.n_embd, config.inner_dim
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, C),
        "wpe.weight": (config.n_positions, C),
        "ln_f.weight": (C,),
        "ln_f.bias": (C,),
    }
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (C,),
            p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (3 * C, C),
            p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C),
            p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,),
            p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (inner, C),
            p + "mlp.c_fc.bias": (inner,),
            p + "mlp.c_proj.weight": (C, inner),
            p + "mlp.c_proj.bias": (C,),
        }
    return shapes


def normalize_state_dict(
    raw: dict[str, torch.Tensor], config: GPT2Config, *, contiguous: bool = True
) -> dict[str, torch.Tensor]:
    """Map a Hub GPT-2 state dict (either key layout) onto our parameter names and layout.

    With ``contiguous=False`` the transposed Conv1D weights are returned as views, so the
    caller can copy them one at a time after dropping ``raw`` (no second copy of the model).

    Raises:
        CorruptWeightsError: keys missing, unexpected, or of the wrong shape.
    """
    shapes = expected_shapes(config)
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    lm_head: torch.Tensor | None = None
    for key, tensor in raw.items():
        name = key.removeprefix("transformer.")
        if IGNORED_BUFFER.match(name):
            continue
        if name == "lm_head.weight":
            lm_head = tensor
            continue
        if name not in shapes:
            unexpected.append(key)
            continue
        if not (tensor.dtype.is_floating_point or (tensor.dtype == torch.int8 and tensor.ndim == 2)):
            # (int8 2-D: the rows a quantising reader made, weights.RowConvert)
            raise CorruptWeightsError(f"{key} is stored as {tensor.dtype}: GPT-2 weights are floating point")
        if name.endswith(CONV1D_SUFFIXES) and tensor.ndim == 2:
            tensor = tensor.t()
        out[name] = tensor
    if "wte.weight" not in out and lm_head is not None:
        out["wte.weight"] = lm_head  # a checkpoint saved with only the tied copy
    _check_keys_and_shapes(out, shapes, unexpected)
    return {k: v.contiguous() for k, v in out.items()} if contiguous else out


def _check_keys_and_shapes(
    out: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], unexpected: list[str]
) -> None:
    if unexpected:
        raise NotGPT2Error(
            f"unexpected weights {_few(unexpected)}: not a GPT-2 checkpoint",
            hint="gpt2cli runs GPT-2-architecture models (GPT2LMHeadModel) only",
        )
    missing = [k for k in shapes if k not in out]
    if missing:
        raise CorruptWeightsError(f"weights missing from the checkpoint: {_few(missing)}")
    for name, shape in shapes.items():
        if tuple(out[name].shape) != shape:
            raise CorruptWeightsError(
                f"{name} has shape {tuple(out[name].shape)}, config.json implies {shape}"
            )


def _few(keys: Iterable[str], n: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def to_hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict back to openai-community/gpt2's layout (Conv1D transposed, no prefix)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        out[name] = tensor.detach().contiguous()
    return out


def weight_files(directory: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred.

    Raises:
        UnsafeWeightsError: only pickle weights exist and ``allow_pickle`` is false.
        NotGPT2Error: no weights at all.
    """
    for single, index in (("model.safetensors", SAFETENSORS_INDEX),) + (
        (("pytorch_model.bin", PICKLE_INDEX),) if allow_pickle else ()
    ):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            return _shards_from_index(directory / index)
    if (directory / "pytorch_model.bin").exists() or (directory / PICKLE_INDEX).exists():
        raise UnsafeWeightsError(
            f"{directory} has only pickle weights (pytorch_model.bin), which can run code"
        )
    raise NotGPT2Error(f"{directory} has no model.safetensors: no weights to load")


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptWeightsError(f"cannot read shard index {index_path}: {exc}") from exc
    for name in names:
        if "/" in name or "\\" in name or name.startswith("."):
            raise CorruptWeightsError(f"{index_path} names a shard outside the checkpoint: {name}")
    return [index_path.parent / n for n in names]


def check_safetensors_file(path: Path) -> None:
    """Validate a safetensors header against the file size, before torch touches it.

    Raises:
        CorruptWeightsError: missing, truncated, or with an unreadable header.
    """
    try:
        size = os.path.getsize(path)
        header_len, header = read_header(path, size)
        ends = [t["data_offsets"][1] for t in tensor_entries(header).values()]
    except FileNotFoundError as exc:
        raise CorruptWeightsError(f"weight file {path} is missing") from exc
    except HeaderError as exc:
        raise CorruptWeightsError(str(exc)) from exc
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CorruptWeightsError(f"{path} has a corrupt safetensors header: {exc}") from exc
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise CorruptWeightsError(f"{path} is truncated: {size} bytes of the {expected} expected")


class RowConvert(Protocol):
    """How 2-D floating weights are stored once read (int8 rows, half-precision rows...).

    The reader asks ``wants(name)`` (``name`` as the checkpoint spells it); for those it calls
    ``convert(name, rows)`` with float blocks of rows in our (out, in) layout: a whole Conv1D
    weight, or up to ``ROW_BLOCK_BYTES`` of a row-major table such as ``wte``, in order.
    ``rows`` is the reader's scratch buffer (the converter may overwrite it, and must not keep
    it); the result, new storage with as many rows, is what is kept. Converting while reading
    keeps peak memory near the stored size, not the checkpoint's.
    """

    def wants(self, name: str) -> bool: ...

    def __call__(self, name: str, rows: torch.Tensor) -> torch.Tensor: ...


ROW_BLOCK_BYTES = 8 << 20


def read_state_dict(files: list[Path], convert: RowConvert | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor from ``files`` (safetensors, or pickle via weights_only=True).

    With ``convert``, the 2-D floating tensors it wants are stored as it makes them.

    Raises:
        CorruptWeightsError: a file cannot be parsed.
    """
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors_file(path)
            try:
                state.update(_read_safetensors(path, convert))
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise CorruptWeightsError(f"cannot read {path}: {exc}") from exc
        else:
            state.update(_convert_loaded(_load_pickle(path), convert))
    return state


def _wanted(convert: RowConvert | None, name: str, shape: list[int] | torch.Size, dtype: torch.dtype) -> bool:
    return convert is not None and len(shape) == 2 and dtype.is_floating_point and convert.wants(name)


def _convert_loaded(state: dict[str, torch.Tensor], convert: RowConvert | None) -> dict[str, torch.Tensor]:
    """Pickled checkpoints are mapped, not read: convert each wanted weight whole."""
    out = {}
    for name, t in state.items():
        if convert is not None and _wanted(convert, name, t.shape, t.dtype):
            conv1d = name.endswith(CONV1D_SUFFIXES)
            rows = (t.t() if conv1d else t).contiguous().clone()  # the converter may overwrite it
            t = convert(name, rows)
            t = t.t() if conv1d else t
        out[name] = t
    return out


class _Scratch:
    """Float buffers reused for every tensor read: no freed holes are left in the heap (glibc
    keeps freed blocks below its adaptive mmap threshold, which would grow the peak RSS)."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get(slot)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            self.bufs.pop(slot, None)
            buf = self.bufs[slot] = torch.empty(max(n, 1 << 20), dtype=dtype)
        return buf[:n].view(shape)


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path, convert: RowConvert | None = None) -> dict[str, torch.Tensor]:
    """Read each tensor straight into its own buffer with plain reads.

    Unlike safetensors' mmap-based ``load_file``, no mapped file pages stay resident beside
    the copies, so peak RSS is one copy of the weights (header already checked); with
    ``convert``, one copy of the converted weights plus one scratch matrix.
    """
    state: dict[str, torch.Tensor] = {}
    header_len, header = read_header(path)
    base = 8 + header_len
    scratch = _Scratch()
    with open(path, "rb") as fh:
        for name, info in tensor_entries(header).items():
            start, end = info["data_offsets"]
            shape, dtype = info["shape"], _SAFETENSORS_DTYPES[info["dtype"]]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - start != nbytes:
                raise ValueError(f"{name}: {end - start} bytes stored for {nbytes} expected")
            fh.seek(base + start)
            wanted = convert if _wanted(convert, name, shape, dtype) else None
            if name.endswith(CONV1D_SUFFIXES) and len(shape) == 2:
                state[name] = _read_transposed(fh, shape, dtype, name=name, convert=wanted, scratch=scratch)
            elif wanted is not None:
                state[name] = _read_rows_converted(fh, shape, dtype, name, wanted, scratch)
            else:
                state[name] = torch.empty(shape, dtype=dtype)
                _read_into(fh, state[name])
    return state


def _read_into(fh: BufferedReader, tensor: torch.Tensor) -> None:
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes and fh.readinto(tensor.view(-1).view(torch.uint8).numpy().data) != nbytes:
        raise ValueError("tensor data is truncated")


def _read_transposed(
    fh: BufferedReader,
    shape: list[int],
    dtype: torch.dtype,
    *,
    name: str,
    convert: RowConvert | None,
    scratch: _Scratch,
    rows: int = 64,
) -> torch.Tensor:
    """A Conv1D weight stored (in, out), read into an (out, in) buffer and returned as its
    (in, out) view: normalize_state_dict's transpose then yields the buffer, copy-free.
    With ``convert``, the buffer is scratch and the converted (out, in) rows are kept."""
    n_in, n_out = shape
    if convert is not None:
        buf = scratch.get("matrix", (n_out, n_in), dtype)
    else:
        buf = torch.empty(n_out, n_in, dtype=dtype)  # (out, in): nn.Linear's layout
    chunk = scratch.get("chunk", (rows, n_out), dtype)
    for r in range(0, n_in, rows):
        part = chunk[: min(rows, n_in - r)]
        _read_into(fh, part)
        buf[:, r : r + part.shape[0]] = part.t()
    if convert is not None:
        buf = convert(name, buf)
    return buf.t()


def _read_rows_converted(
    fh: BufferedReader,
    shape: list[int],
    dtype: torch.dtype,
    name: str,
    convert: RowConvert,
    scratch: _Scratch,
) -> torch.Tensor:
    """A row-major 2-D tensor read in blocks of rows, each converted as it arrives."""
    n_rows, n_cols = shape
    step = max(1, ROW_BLOCK_BYTES // max(1, n_cols * dtype.itemsize))
    out: torch.Tensor | None = None
    for r in range(0, max(n_rows, 1), step):
        part = scratch.get("matrix", (min(step, n_rows - r), n_cols), dtype)
        _read_into(fh, part)
        stored = convert(name, part)
        if out is None:
            out = torch.empty(n_rows, *stored.shape[1:], dtype=stored.dtype)
        out[r : r + part.shape[0]] = stored
    assert out is not None
    return out


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as exc:
        raise CorruptWeightsError(f"weight file {path} is missing") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds here; all mean "bad file"
        raise CorruptWeightsError(f"cannot load {path} safely: {exc}") from exc
    if not isinstance(loaded, dict):
        raise CorruptWeightsError(f"{path} does not hold a state dict")
    return loaded
