"""Training data: files found (directories walked), documents read from them, tokenized, joined
with <|endoftext|>, packed into blocks, split into train and held-out sets, and served in
batches sharded across DDP ranks.

The order of the training blocks is a permutation seeded by (seed, epoch), so the position in
the data is fully described by the global step: resuming needs no other data state.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt2cli.errors import BadInputError
from gpt2cli.jsonl import read_jsonl_texts
from gpt2cli.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass
class DataFiles:
    """The files a run reads, in order, and what the directories held besides."""

    files: list[Path]
    skipped: list[Path] = field(default_factory=list)  # files of other kinds inside directories

    def describe(self) -> str:
        """``3 files (2 .txt, 1 .jsonl)``, plus the skipped ones, for the progress output."""
        kinds = Counter(p.suffix.lower() or "(no suffix)" for p in self.files)
        text = f"{len(self.files)} file{'s' if len(self.files) != 1 else ''} ("
        text += ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) + ")"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} other files (--data-format text takes them)"
        return text


def collect_files(paths: list[Path], data_format: str = "auto") -> DataFiles:
    """The data files ``paths`` name: files as given, directories walked recursively (sorted).

    In a directory, ``auto`` and ``jsonl`` take the .txt/.md/.jsonl files; ``text`` takes
    every file. Hidden files and directories are skipped.

    Raises:
        BadInputError: a path that does not exist, a given file of an unknown kind (auto), or a
            directory with nothing to read.
    """
    found = DataFiles([])
    for path in paths:
        if path.is_dir():
            inside = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            wanted = [p for p in inside if data_format == "text" or p.suffix.lower() in TEXT_SUFFIXES]
            if not wanted:
                raise BadInputError(
                    f"data directory {path} holds no .txt, .md or .jsonl files"
                    + (f" ({len(inside)} other files)" if inside else ""),
                    hint="pass --data-format text to take every file as a document",
                )
            found.files += wanted
            found.skipped += [p for p in inside if p not in wanted]
        elif path.is_file():
            if data_format == "auto" and path.suffix.lower() not in TEXT_SUFFIXES:
                raise BadInputError(
                    f"{path}: unsupported data file type {path.suffix or '(none)'!r}",
                    hint='use .txt/.md (one document per file), .jsonl (one {"text": ...} per line), '
                    "or --data-format text to take any file as one document",
                )
            found.files.append(path)
        else:
            raise BadInputError(
                f"data path {path} does not exist",
                hint="pass .txt, .md or .jsonl files, or directories of them",
            )
    return found


def read_documents(paths: list[Path], data_format: str = "auto") -> list[str]:
    """The documents in ``paths`` (files, see ``collect_files``): a .txt/.md file (any file with
    ``text``) is one; each JSONL line's ``text`` is one (.jsonl in ``auto``, every file in ``jsonl``).

    Raises:
        BadInputError: a file is missing, unreadable, not UTF-8, of an unknown kind, a JSONL
            line is not an object with a string ``text``, or there is no text at all.
    """
    docs: list[str] = []
    for path in collect_files(paths, data_format).files:
        text = _read_text(path)
        as_jsonl = data_format == "jsonl" or (data_format == "auto" and path.suffix.lower() == ".jsonl")
        docs.extend(_jsonl_documents(path, text) if as_jsonl else [text])
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise BadInputError("the training data is empty", hint="the files hold no text to train on")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _jsonl_documents(path: Path, text: str) -> list[str]:
    return list(read_jsonl_texts(text.splitlines(), str(path)))


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """One long id stream (1-D int64): each document followed by <|endoftext|>.

    A literal ``<|endoftext|>`` inside a document is the special token, as in ``LM.encode``.
    """
    eot = tokenizer.eot_id
    ids: list[int] = []
    for chunk in tokenizer.encode_batch(docs, allow_special=True):
        ids.extend(chunk)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Dataset:
    """Packed blocks: ``train`` and ``val`` are (N, block_size + 1) so x = [:, :-1], y = [:, 1:]."""

    train: torch.Tensor
    val: torch.Tensor
    tokens: int
    fingerprint: str

    @property
    def block_size(self) -> int:
        return self.train.shape[1] - 1


def pack(ids: torch.Tensor, block_size: int, val_fraction: float, seed: int) -> Dataset:
    """Cut ``ids`` into blocks of ``block_size`` + 1 tokens (consecutive blocks share one token)
    and hold out a seeded random ``val_fraction`` of them (at least one).

    Raises:
        BadInputError: fewer than two blocks of data.
    """
    n_blocks = (ids.numel() - 1) // block_size
    if n_blocks < 2:
        raise BadInputError(
            f"the data is only {ids.numel()} tokens: too little for two blocks of {block_size}",
            hint="add more text or pass a smaller --block-size",
        )
    # (n_blocks, block_size + 1) windows with stride block_size: target of the last x is the
    # first token of the next block.
    blocks = ids[: n_blocks * block_size + 1].unfold(0, block_size + 1, block_size)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n_blocks * val_fraction))
    n_val = min(n_val, n_blocks - 1)
    val = blocks[order[:n_val].sort().values].contiguous()
    train = blocks[order[n_val:].sort().values].contiguous()
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return Dataset(train=train, val=val, tokens=ids.numel(), fingerprint=f"{digest}-{block_size}")


@dataclass(frozen=True)
class Batching:
    """How the global batch of one optimizer step is cut: ranks x micro-steps x per-rank batch."""

    batch_size: int  # sequences per rank per micro-step
    grad_accum: int
    world: int
    rank: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def steps_per_epoch(self, n_train: int) -> int:
        return n_train // self.global_batch


def epoch_order(n_train: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled block order of one epoch (the same on every rank)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # any 64-bit seed
    return torch.randperm(n_train, generator=generator)


def step_batches(data: Dataset, batching: Batching, seed: int, step: int) -> Iterator[torch.Tensor]:
    """This rank's micro-batches (batch_size, block_size + 1) for global optimizer step ``step``.

    The step's ``global_batch`` blocks are a slice of the epoch's order; rank r takes every
    world-th of them, so the ranks' shards together are exactly what one process would take.
    """
    per_epoch = batching.steps_per_epoch(data.train.shape[0])
    epoch, offset = divmod(step, per_epoch)
    order = epoch_order(data.train.shape[0], seed, epoch)
    g = batching.global_batch
    chosen = order[offset * g : (offset + 1) * g]
    mine = chosen[batching.rank :: batching.world]  # (batch_size * grad_accum,)
    for micro in range(batching.grad_accum):
        idx = mine[micro * batching.batch_size : (micro + 1) * batching.batch_size]
        yield data.train[idx]


def val_shard(data: Dataset, rank: int, world: int) -> torch.Tensor:
    """This rank's share of the held-out blocks (possibly empty)."""
    return data.val[rank::world]
