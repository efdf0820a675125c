"""How fast the decode GEMV streams one batch-1 step's weights, beside the machine's bandwidth.

The ceiling of batch-1 decode is the bytes of the weights over the read bandwidth. This runs
only the matmuls of one step of a gpt2-shaped model (each block's QKV, projection and MLP
matrices, then the lm_head), called one after another as a step calls them, through the same
numba kernels as decode (``gemv`` for float32 and half, ``gemv_i8`` for int8), on random
weights, and prints their GB/s beside ``torch.sum`` over 1 GiB (what ``run_all.py`` calls the
read bandwidth). A step's GB/s from ``run_all.py`` or ``gpt2 bench`` below this figure is what
the rest of the step costs; this figure below the bandwidth is the kernel's.

    .venv/bin/python benchmarks/stream_weights.py [--size 124m] [--dtype float32|bfloat16|float16|int8]
        [--threads 2] [--steps 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_all import SIZES, read_bandwidth  # noqa: E402

VOCAB = 50257


def stored(rng: np.random.Generator, shape: tuple[int, int], dtype: str) -> tuple:
    """Random weights of ``shape`` as the kernels take them: (w, scale, bias, row sums or None)."""
    w = rng.standard_normal(shape, dtype=np.float32) * 0.02
    ones, zeros = np.ones(shape[0], np.float32), np.zeros(shape[0], np.float32)
    if dtype == "int8":
        q = rng.integers(-127, 128, shape, dtype=np.int8)
        return q, np.full(shape[0], 0.02 / 127, np.float32), zeros, q.astype(np.int32).sum(1).astype(np.int32)
    if dtype == "bfloat16":
        w = (w.view(np.uint32) >> 16).astype(np.uint16)
    elif dtype == "float16":
        w = w.astype(np.float16).view(np.int16)
    return w, ones, zeros, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="124m", choices=list(SIZES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    import numba

    from gpt2cli import numba_kernels as nk

    numba.set_num_threads(args.threads)
    n_layer, _, c = SIZES[args.size]
    rng = np.random.default_rng(0)
    shapes = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)] * n_layer + [(VOCAB, c)]
    mats = [stored(rng, s, args.dtype) for s in shapes]
    xs = {n: rng.standard_normal((1, n), dtype=np.float32) for n in (c, 4 * c)}
    outs = [np.empty((1, s[0]), np.float32) for s in shapes]

    def step() -> None:
        for (w, scale, bias, sums), out in zip(mats, outs, strict=True):
            x = xs[w.shape[1]]
            if sums is None:
                nk.gemv(x, w, scale, bias, out)
            else:
                nk.gemv_i8(x, w, scale, bias, sums, out)

    step()  # compile (or load numba's cache)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    nbytes = sum(m[0].nbytes for m in mats)
    bw1, bwn = read_bandwidth(args.threads)
    torch.set_num_threads(args.threads)
    med = statistics.median(times)
    print(
        f"{args.size} {args.dtype}, {args.threads} threads: one step's {len(mats)} matrices ({nbytes / 1e6:.0f} MB) "
        f"in {med * 1e3:.2f} ms median ({nbytes / med / 1e9:.1f} GB/s; best {nbytes / min(times) / 1e9:.1f}); "
        f"torch.sum over 1 GiB: {bw1:.1f} GB/s (1 thread), {bwn:.1f} GB/s ({args.threads} threads)"
    )


if __name__ == "__main__":
    main()
