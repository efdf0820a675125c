"""Peak RSS of ``gpt2 generate`` on the 124M checkpoint, against the weight file's size.

.venv/bin/python benchmarks/peak_rss.py [--ckpt DIR] [--dtype float32] [--quantize int8]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from decode_vs_transformers import make_124m

    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=str(Path(tempfile.gettempdir()) / "gpt2cli-124m"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default="none")
    args = ap.parse_args()
    path = make_124m(Path(args.ckpt))
    gpt2 = Path(sys.executable).parent / "gpt2"
    cmd = [str(gpt2), "generate", "-m", str(path), "Hello", "-n", "16", "-t", "0", "--ignore-eos"]
    cmd += ["--dtype", args.dtype, "--quantize", args.quantize, "--device", "cpu"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    size = (path / "model.safetensors").stat().st_size
    print(f"weights {size / 2**20:.0f} MiB, peak RSS {peak / 2**20:.0f} MiB, ratio {peak / size:.2f}")


if __name__ == "__main__":
    main()
