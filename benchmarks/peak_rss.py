"""Peak RSS of ``gpt2 generate`` and ``gpt2 score`` per precision, beside the weights' bytes in memory.

    .venv/bin/python benchmarks/peak_rss.py [--ckpt DIR] [--precisions float32,bfloat16,int8]
        [--commands generate,score]

For each precision and command a child process runs ``gpt2 generate`` (16 greedy tokens) or
``gpt2 score`` (a text of ~3,000 tokens: three windows of 1024 at stride 512); its peak RSS
minus the import baseline (a child that imports torch, numba and the kernels and nothing
else: what any torch program pays) is what the model costs. It is compared with the weight
bytes held at that precision (``weights_in_memory``: float32 4 bytes a value, half 2, int8 1
plus one float32 scale per row). Without ``--ckpt`` the 124M random checkpoint is made.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BASELINE = "import torch, numba; from gpt2cli import kernels, api; kernels.warm_up()"


PEAK_OF = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)
"""A fresh parent whose only child is the command: its children's peak is that command's."""


def child_peak(cmd: list[str]) -> int:
    """Peak RSS (bytes) of a process running ``cmd``."""
    done = subprocess.run([sys.executable, "-c", PEAK_OF, *cmd], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) * 1024


def weights_in_memory(ckpt: Path, precision: str) -> int:
    """Bytes of the weights as held at ``precision`` (from the safetensors header)."""
    from gpt2cli.safetensors_header import read_header, tensor_entries

    total = 0
    for name, info in tensor_entries(read_header(ckpt / "model.safetensors")[1]).items():
        shape = info["shape"]
        values = math.prod(shape)
        if precision == "int8" and len(shape) == 2 and not name.endswith("wpe.weight"):  # wpe stays float
            total += values + shape[0] * 4  # int8 values, float32 scale per row
        elif precision in ("bfloat16", "float16") and len(shape) == 2:
            total += values * 2
        else:
            total += values * 4
    return total


def main() -> None:
    from decode_vs_transformers import make_124m

    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--precisions", default="float32,bfloat16,int8")
    ap.add_argument("--commands", default="generate", help="comma list of generate, score")
    args = ap.parse_args()
    path = Path(args.ckpt) if args.ckpt else make_124m(Path(tempfile.gettempdir()) / "gpt2cli-124m")
    baseline = child_peak([sys.executable, "-c", BASELINE])
    print(f"import baseline (torch + numba + gpt2cli, kernels compiled): {baseline / 2**20:.0f} MiB")
    print(
        "| command | precision | weights in memory MiB | peak RSS MiB | peak - baseline MiB "
        "| (peak - baseline) / weights |"
    )
    print("|---|---|---|---|---|---|")
    gpt2 = Path(sys.executable).parent / "gpt2"
    text = Path(tempfile.gettempdir()) / "gpt2cli-peak-rss.txt"
    text.write_text(" ".join(f"word{i % 997} and" for i in range(1500)))  # ~3,000 tokens
    for command in args.commands.split(","):
        for precision in args.precisions.split(","):
            cmd = [str(gpt2), command, "-m", str(path), "--device", "cpu"]
            if command == "generate":
                cmd += ["Hello", "-n", "16", "-t", "0", "--ignore-eos"]
            else:
                cmd += [str(text)]
            cmd += ["--quantize", "int8"] if precision == "int8" else ["--dtype", precision]
            peak = child_peak(cmd)
            weights = weights_in_memory(path, precision)
            print(
                f"| {command} | {precision} | {weights / 2**20:.0f} | {peak / 2**20:.0f} "
                f"| {(peak - baseline) / 2**20:.0f} | {(peak - baseline) / weights:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
