"""The WikiText-2 reproduction script's arithmetic, on local text and a tiny checkpoint."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_wikitext_rows_and_table(lm_h) -> None:
    wiki = _module("wikitext_perplexity")
    lines = [" = Heading = ", "", " Some text about a thing , with @-@ odd spacing . ", ""]
    text = wiki.corpus_text(lines)
    assert text == " = Heading = \n\n\n\n Some text about a thing , with @-@ odd spacing . \n\n"
    rows = wiki.score_rows(lm_h, "gpt2-large", text, strides=(1024, 512))
    # lm_h's window is 128: the context is capped to it, and the stride to the context.
    assert [(r.protocol, r.stride) for r in rows] == [
        ("hf", 1024),
        ("hf", 512),
        ("lm-eval", 1024),
        ("lm-eval", 512),
    ]
    for r in rows:
        expected = lm_h.score(text, context=128, stride=128, protocol=r.protocol)
        assert (r.tokens, r.perplexity) == (expected.tokens, pytest.approx(expected.perplexity))
    assert rows[2].tokens == len(lm_h.encode(text))  # lm-eval scores every token
    assert rows[0].perplexity != pytest.approx(rows[2].perplexity)  # the two methods differ
    # the guide's figures sit beside the guide's method only
    assert [r.published for r in rows] == [19.44, 16.45, None, None]
    assert rows[0].difference == pytest.approx(100 * (rows[0].perplexity / 19.44 - 1))
    table = wiki.markdown([*rows, wiki.Row("gpt2", "lm-eval", 512, 10, math.e, None, 29.41)])
    lines_out = table.splitlines()
    assert lines_out[0].startswith("| model | method | stride |") and len(lines_out) == 7
    assert lines_out[-1] == "| gpt2 | lm-eval | 512 | 10 | 2.72 | - | - | 29.41 |"
    assert f"| {rows[0].perplexity:.2f} | 19.44 | {rows[0].difference:+.2f}% |" in lines_out[2]
