"""Decode tokens/s with no hooks set, before and after the model's hook mechanism.

The hooks (model.py: ``GPT2.hooks``, used by ``gpt2 lens/attention/activations``) must cost
nothing when unused. This runs ``gpt2 bench`` (one 124M random GPT-2, greedy, batch 1, fp32 on
the CPU) alternately from this tree and from a checkout of the commit before the hooks
(``--before``), round after round, so that both see the same machine load, and prints each
round and the medians. Then, in this process (one thread, timed in CPU seconds), it decodes
alternately with the hook table empty and with one entry that matches no hook point: that
walks every hook check and lookup, an upper bound on what an empty table could cost. The
figures are in docs/inspect.md.

    python benchmarks/hook_overhead.py --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run_all import make_124m  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def checkout(rev: str, dest: Path) -> Path:
    """The ``src`` folder of ``rev``, unpacked into ``dest``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def decode_rate(src: Path, ckpt: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "gpt2cli", "bench", "-m", str(ckpt), "--device", "cpu"]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads), "--format", "json"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(cmd, check=True, capture_output=True, env=env, text=True).stdout
    return float(json.loads(out)["results"][0]["decode_tokens_per_second"])


def in_process(ckpt: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """Decode tokens per CPU-second with the hook table empty, and with an entry matching nothing.

    CPU time of this process (one thread) rather than the wall clock: on a shared machine it
    does not count the time other processes hold the cores.
    """
    import time

    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from gpt2cli import load

    torch.set_num_threads(1)
    lm = load(str(ckpt), device="cpu")
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    rates: dict[str, list[float]] = {"hooks empty": [], "hooks set, none matching": []}
    lm.complete(prompt, max_new_tokens=8, temperature=0, ignore_eos=True)  # warm-up
    for _ in range(args.rounds * args.repeats):
        for name in rates:
            if name != "hooks empty":
                lm.model.hooks["unmatched"] = lambda x: None
            t0 = time.process_time()
            result = lm.complete(prompt, max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
            cpu = time.process_time() - t0
            lm.model.hooks.clear()
            rates[name].append(result.samples[0].tokens / cpu)
    return rates


def report(rates: dict[str, list[float]]) -> None:
    for name, values in rates.items():
        print(
            f"{name}: median {statistics.median(values):.1f} decode tok/s (min {min(values):.1f}, max {max(values):.1f})"
        )
    first, second = (statistics.median(v) for v in rates.values())
    print(f"ratio (second / first): {second / first:.3f}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="a353aa9", help="a commit before the hook mechanism")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", choices=["both", "commits", "in-process"], default="both")
    args = parser.parse_args()
    ckpt = make_124m()
    if args.part != "in-process":
        report(compare_commits(ckpt, args))
    if args.part != "commits":
        report(in_process(ckpt, args))


def compare_commits(ckpt: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """Decode tok/s of ``--before`` and of this tree, alternating, ``--rounds`` times each."""
    with tempfile.TemporaryDirectory() as tmp:
        trees = {
            f"before ({args.before})": checkout(args.before, Path(tmp)),
            "after (this tree)": ROOT / "src",
        }
        rates: dict[str, list[float]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, src in trees.items():
                rates[name].append(decode_rate(src, ckpt, args))
                print(
                    f"round {r + 1}: {name}: {rates[name][-1]:.1f} decode tok/s", file=sys.stderr, flush=True
                )
    return rates


if __name__ == "__main__":
    main()
