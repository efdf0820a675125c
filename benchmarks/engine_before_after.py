"""Two checkouts side by side, in one run: plain decode, batch 8, speculative and --compile.

A benchmark, not a test. Each side runs in its own subprocess with ``PYTHONPATH`` set to its
``src`` (so an older commit needs only a ``git worktree``), the sides alternating per round so
both see the same machine load. Usage:

    git worktree add /tmp/before a353aa9
    .venv/bin/python benchmarks/engine_before_after.py --before /tmp/before/src --after src \\
        --model CKPT --draft CKPT [--rounds 2] [--new-tokens 64]

Figures per side and round: ``gpt2 bench`` decode tok/s at batch 1 and 8 (prompt 128),
speculative decode tok/s with ``--draft-model``, and the compiled decode step's steady state
(``load(compile=True)``, a warm-up generation of the same shape first, then the best of two
timed ones, tokens / time end to end after a 16-token prompt),
both with the numba kernels inside the graph (custom ops) and with them off (torch's matmuls
compiled by inductor). Prints one Markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

COMPILED = r"""
import json, sys, time, torch
from gpt2cli import kernels, load
model, new, kernels_on = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if hasattr(kernels, "set_enabled"):
    kernels.set_enabled(kernels_on)
lm = load(model, device="cpu", compile=True)
prompt = " hello" * 16
def run():
    t0 = time.perf_counter()
    lm.complete(prompt, max_new_tokens=new, temperature=0, ignore_eos=True)
    return time.perf_counter() - t0
run()  # compiles
t_new = min(run() for _ in range(2))
# end to end (16-token prefill included): another max_new_tokens would recompile the old
# step, whose cache capacity was prompt + max_new_tokens
print(json.dumps({"decode_tokens_per_second": new / t_new}))
"""


def gpt2(src: str, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    done = subprocess.run(
        [sys.executable, "-m", "gpt2cli", *args], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout


def python(src: str, code: str, args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(src: str, args: argparse.Namespace) -> dict[str, float]:
    """Every figure of one side, once."""
    common = [
        "-m",
        args.model,
        "--prompt-tokens",
        "128",
        "--new-tokens",  # the old name, which both sides take
        str(args.new_tokens),
        "--repeats",
        "2",
        "--format",
        "json",
    ]
    out: dict[str, float] = {}
    plain = json.loads(gpt2(src, ["bench", *common, "--batch-size", "1,8"]))["results"]
    for row in plain:
        out[f"decode b{row['batch_size']}"] = row["decode_tokens_per_second"]
    spec = json.loads(gpt2(src, ["bench", *common, "--draft-model", args.draft]))["results"]
    out["speculative b1"] = [r for r in spec if "draft" in r["engine"]][0]["decode_tokens_per_second"]
    for kernels_on in ("1", "0"):
        figure = python(src, COMPILED, [args.model, str(args.new_tokens), kernels_on])
        out[f"compiled b1, kernels {'on' if kernels_on == '1' else 'off'}"] = figure[
            "decode_tokens_per_second"
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for rnd in range(args.rounds):
        sides = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
        for side in sides:
            for name, value in measure(getattr(args, side), args).items():
                figures[side].setdefault(name, []).append(value)
                print(f"round {rnd + 1} {side} {name}: {value:.1f} tok/s", file=sys.stderr, flush=True)
    print("| figure (tok/s) | before | after | after ÷ before |\n|---|---|---|---|")
    for name in figures["after"]:
        before = statistics.median(figures["before"][name])
        after = statistics.median(figures["after"][name])
        runs = " / ".join(f"{v:.1f}" for v in figures["after"][name])
        print(f"| {name} | {before:.1f} | {after:.1f} ({runs}) | {after / before:.2f}× |")


if __name__ == "__main__":
    main()
