"""Helpers to run the CLI in-process (with our error rendering) and as a real subprocess."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpt2cli.cli.app import run

GPT2_BIN = Path(sys.executable).parent / "gpt2"


@dataclass
class Result:
    code: int
    out: str
    err: str


class _FakeStdin(io.TextIOWrapper):
    def isatty(self) -> bool:
        return False


def run_inprocess(
    args: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stdin: bytes | None = None,
) -> Result:
    """Run ``gpt2 ARGS`` in this process, through the same error rendering as the console script."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", _FakeStdin(io.BytesIO(stdin), encoding="utf-8"))
    capsys.readouterr()
    code = run(args)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def run_subprocess(
    args: list[str], *, input: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> Result:
    """Run the installed ``gpt2`` console script."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [str(GPT2_BIN), *args],
        input=input if input is not None else b"",
        capture_output=True,
        env=full_env,
        timeout=timeout,
    )
    return Result(
        proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    )


def assert_one_line_error(result: Result, code: int, *needles: str) -> None:
    """The error contract: the exit code, a `gpt2: error:` line, no traceback."""
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("gpt2: error:")]
    assert len(lines) == 1, result.err
    for needle in needles:
        assert needle.lower() in result.err.lower(), result.err
