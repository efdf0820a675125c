"""Helpers for the batch-job tests: corpora of known token lengths, and comparing output files."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

FLOATS = ("nll", "total_nll", "perplexity", "bits_per_byte", "word_perplexity")
EXPONENTIAL = ("perplexity", "word_perplexity")


WORDS = [" the", " cat", " sat", " on", " a", " mat", " and", " dog", " ran", " far", " 7", " blue"]


def text_of(lm, tokens: int, seed: int = 0) -> str:
    """A text of exactly ``tokens`` tokens: "The" and then one-token words drawn with ``seed``."""
    rng = random.Random(seed)
    text = "The" + "".join(rng.choice(WORDS) for _ in range(tokens - 1))
    assert len(lm.encode(text)) == tokens
    return text


def write_jsonl(path: Path, objs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


SAME_SCORE = 1e-5
"""Relative tolerance between a document's score packed with others (or in another worker
process) and alone: float32 GEMMs of other shapes and thread counts round differently (2.4e-6
seen on an nll of 12, which worker got which documents depending on timing); a window or mask
crossing documents moves an nll by 1e-2 or more."""


def assert_same_lines(got: list[dict], want: list[dict], rel: float = SAME_SCORE) -> None:
    """The same lines in the same order: equal ids, counts and errors; numbers within ``rel``."""
    assert [g["id"] for g in got] == [w["id"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w), (g, w)
        for key in g:
            if key in EXPONENTIAL and 0 < w[key] < math.inf:  # exp(nll): compare the nll's
                assert math.log(g[key]) == pytest.approx(math.log(w[key]), rel=rel), (key, g, w)
            elif key in FLOATS and not (math.isinf(w[key]) or math.isnan(w[key])):
                assert g[key] == pytest.approx(w[key], rel=rel), (key, g, w)
            elif key == "per_token":
                assert [t["id"] for t in g[key]] == [t["id"] for t in w[key]]
                assert [t["logprob"] for t in g[key]] == pytest.approx(
                    [t["logprob"] for t in w[key]], rel=rel
                )
            else:
                assert g[key] == w[key], (key, g, w)
