"""`--quantize` reaches every command that loads a model: score and repl beside fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cliutil import assert_one_line_error, run_inprocess

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def test_score_int8_close_to_fp32(ckpt_h: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    args = ["score", "-m", str(ckpt_h), str(path), "--format", "json"]
    fp32 = run_inprocess(args, capsys, monkeypatch)
    int8 = run_inprocess([*args, "--quantize", "int8"], capsys, monkeypatch)
    assert fp32.code == int8.code == 0, fp32.err + int8.err
    ppl32, ppl8 = json.loads(fp32.out)["perplexity"], json.loads(int8.out)["perplexity"]
    assert ppl8 != ppl32  # the int8 path really ran
    assert abs(ppl8 - ppl32) / ppl32 < 0.02  # the stated quality cost: within 2% perplexity


def test_repl_int8_piped(ckpt_h: Path, capsys, monkeypatch) -> None:
    result = run_inprocess(
        ["repl", "-m", str(ckpt_h), "-n", "4", "--quantize", "int8"], capsys, monkeypatch, stdin=b"hello\n"
    )
    assert result.code == 0, result.err
    assert result.out.strip()


@pytest.mark.parametrize("command", ["score", "repl", "generate"])
def test_unknown_quantization_is_a_usage_error(ckpt_h: Path, capsys, monkeypatch, command: str) -> None:
    result = run_inprocess(
        [command, "-m", str(ckpt_h), "--quantize", "int3"], capsys, monkeypatch, stdin=b"hello\n"
    )
    assert_one_line_error(result, 2, "int3")
