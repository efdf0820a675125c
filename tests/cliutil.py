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
# Seconds a subprocess may take before a test calls it hung. A guard only: no test waits for it
# to pass or asserts on how long anything took, so a busy machine is slower, never failing.
HANG_GUARD = 600


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
    args: list[str],
    *,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = HANG_GUARD,
    cwd: Path | None = None,
    prefix: list[str] | None = None,
    encoding: str = "utf-8",
) -> Result:
    """Run the installed ``gpt2`` console script (after ``prefix``, e.g. an ``unshare`` wrapper)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [*(prefix or []), str(GPT2_BIN), *args],
        input=input if input is not None else b"",
        capture_output=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )
    return Result(
        proc.returncode, proc.stdout.decode(encoding, "replace"), proc.stderr.decode(encoding, "replace")
    )


def assert_one_line_error(result: Result, code: int, *needles: str) -> None:
    """The error contract: the exit code, a `gpt2: error:` line, no traceback."""
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("gpt2: error:")]
    assert len(lines) == 1, result.err
    for needle in needles:
        assert needle.lower() in result.err.lower(), result.err


def _namespaces_work() -> bool:
    """Whether ``unshare -rm`` (a private user + mount namespace) can bind-mount here."""
    import shutil

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount --bind / /mnt",
        ],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


NAMESPACES = _namespaces_work()
needs_namespaces = pytest.mark.skipif(
    not NAMESPACES, reason="unshare -rm (user + mount namespaces) is not available to mount a read-only dir"
)


def in_namespace(*mounts: str) -> list[str]:
    """A command prefix that runs in a private mount namespace after ``mounts`` (shell lines such
    as ``mount --bind -o ro DIR DIR``); nothing is mounted outside it, and it ends with the process."""
    script = "; ".join([*mounts, 'exec "$@"'])
    return ["unshare", "-rm", "sh", "-ec", script, "sh"]


def read_only(*dirs: str | Path) -> list[str]:
    """``in_namespace`` with each of ``dirs`` bind-mounted read-only onto itself."""
    return in_namespace(*(f"mount --bind -o ro {d} {d}" for d in dirs))


def run_with_terminal_stderr(args: list[str], env: dict[str, str]) -> tuple[int, str, bytes]:
    """Run ``gpt2 ARGS`` with stderr on a pseudo-terminal (stdout piped): (exit code, what the
    terminal showed, stdout's bytes). ``env`` is the whole environment."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(GPT2_BIN), *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=env
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read() if proc.stdout else b""
    code = proc.wait(timeout=HANG_GUARD)
    os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace"), out
