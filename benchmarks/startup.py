"""Startup cost: `gpt2 --help` wall time beside a bare Typer app's `--help`, measured interleaved.

Issue 2 asks for at most 1.3x. A benchmark, not a test. Usage:

    .venv/bin/python benchmarks/startup.py [--runs 20]

Both commands run as fresh processes of this interpreter, alternately (so that load on a
shared machine hits both alike); the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

BARE = """
import typer
app = typer.Typer(add_completion=False)
@app.command()
def main(name: str = "x") -> None:
    '''A bare Typer app.'''
app()
"""
OURS = "from gpt2cli.cli.app import main; main()"


def wall(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, "--help"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    wall(BARE), wall(OURS)  # warm the file cache and bytecode
    bare, ours = [], []
    for _ in range(args.runs):
        bare.append(wall(BARE))
        ours.append(wall(OURS))
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"bare typer --help: {b * 1000:.0f} ms (min {min(bare) * 1000:.0f})")
    print(f"gpt2 --help:       {o * 1000:.0f} ms (min {min(ours) * 1000:.0f})")
    print(f"ratio: {o / b:.2f}x median, {min(ours) / min(bare):.2f}x min (target <= 1.3x)")


if __name__ == "__main__":
    main()
