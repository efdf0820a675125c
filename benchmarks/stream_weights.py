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

from gpt2cli import kernels  # noqa: E402
from gpt2cli.quantize import quantize_rows  # noqa: E402

VOCAB = 50257


def stored(shape: tuple[int, int], dtype: str, gen: torch.Generator) -> tuple:
    """Random weights of ``shape`` as decode reads them (``kernels.gemv_operands``; int8 rounded
    per row by ``quantize_rows``, as loading does)."""
    w = torch.randn(shape, generator=gen) * 0.02
    if dtype == "int8":
        return kernels.gemv_operands(*quantize_rows(w), None)
    return kernels.gemv_operands(w.to(getattr(torch, dtype)), None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="124m", choices=list(SIZES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    import numba

    numba.set_num_threads(args.threads)
    nk = kernels.nk()
    n_layer, _, c = SIZES[args.size]
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    shapes = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)] * n_layer + [(VOCAB, c)]
    mats = [stored(s, args.dtype, gen) for s in shapes]
    xs = {n: rng.standard_normal((1, n), dtype=np.float32) for n in (c, 4 * c)}
    outs = [np.empty((1, s[0]), np.float32) for s in shapes]
    layout = kernels.gemv_layout(mats[0][0])  # the layout decode takes here (GPT2_GEMV)

    def step() -> None:
        for (w, scale, bias, sums), out in zip(mats, outs, strict=True):
            x = xs[w.shape[1]]
            if w.dtype == np.int8:
                nk.gemv_i8(x, w, scale, bias, sums, out, layout)
            else:
                nk.gemv(x, w, scale, bias, out, layout)

    step()  # compile (or load numba's cache)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    nbytes = sum(m[0].nbytes for m in mats)
    bw1, bwn = read_bandwidth(args.threads)
    med = statistics.median(times)
    print(
        f"{args.size} {args.dtype}, {args.threads} threads: one step's {len(mats)} matrices ({nbytes / 1e6:.0f} MB) "
        f"in {med * 1e3:.2f} ms median ({nbytes / med / 1e9:.1f} GB/s; best {nbytes / min(times) / 1e9:.1f}); "
        f"torch.sum over 1 GiB: {bw1:.1f} GB/s (1 thread), {bwn:.1f} GB/s ({args.threads} threads)"
    )


if __name__ == "__main__":
    main()
