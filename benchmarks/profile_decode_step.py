"""Where one batch-1 decode step's time goes, on the gpt2-shaped (124M) random checkpoint.

Times the whole step (median of N) three ways: the fused step (each block one numba call),
the numba kernels unfused, and pure torch. Then the blocks alone (the 12 fused calls, or the
48 block matmuls through ``kernels.linear``) and the lm_head alone; the rest is, fused, the
embeddings, the final LayerNorm and Python, and unfused also attention, LayerNorm and GELU. Bytes of weights read per step / step time gives
the achieved bandwidth.

    .venv/bin/python benchmarks/profile_decode_step.py [--threads 2] [--steps 30]
        [--dtype bfloat16] [--quantize int8] [--clock cpu]

``--clock cpu`` reads the process's CPU time instead of the wall clock: with one thread on a
shared machine it leaves out the time other processes held the core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


CLOCK = [time.perf_counter]


def median_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = CLOCK[0]()
        fn()
        times.append(CLOCK[0]() - t0)
    return statistics.median(times)


def main() -> None:
    from decode_vs_transformers import make_124m

    from gpt2cli import decode_step, kernels, load

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ckpt", default="/tmp/gpt2cli-124m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    CLOCK[0] = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    lm = load(str(make_124m(Path(args.ckpt))), device="cpu", dtype=args.dtype, quantize=args.quantize)
    model = lm.model
    from gpt2cli.bench import weight_bytes_per_step
    from gpt2cli.model import Linear
    from gpt2cli.quantize import QLinear

    linears = [m for m in model.modules() if isinstance(m, (Linear, QLinear))]  # the 48 block matmuls
    xs = {m.in_features: torch.randn(1, 1, m.in_features) for m in linears}
    h = torch.randn(1, model.config.n_embd)
    nbytes = weight_bytes_per_step(model, "wpe.weight")
    x = torch.randn(1, 1, model.config.n_embd)
    modes = [
        ("fused step", True, True),
        ("numba kernels, unfused", True, False),
        ("torch (kernels off)", False, False),
    ]
    for name, enabled, fused in modes:
        kernels.set_enabled(enabled)
        decode_step.set_enabled(fused)
        with torch.inference_mode():
            cache = model.new_cache(1, 256)
            model(torch.tensor([[1] * 64]), torch.arange(64)[None], cache)
            ids, pos = torch.tensor([[5]]), torch.tensor([[64]])

            def step(ids: torch.Tensor = ids, pos: torch.Tensor = pos, cache=cache) -> None:
                model(ids, pos, cache, last_only=True)  # always position 64: the same step again

            def fused_blocks(pos: torch.Tensor = pos, cache=cache) -> None:
                decode_step.run_blocks(model, x.clone(), pos, cache, slice(0, 1))

            total = median_time(step, args.steps)
            if fused:  # the 12 fused block calls (matmuls, attention, norms, GELU)
                blocks = median_time(fused_blocks, args.steps)
            else:
                blocks = median_time(lambda: [m(xs[m.in_features]) for m in linears], args.steps)
            head = median_time(lambda: model.logits(h), args.steps)
        rest = total - blocks - head
        what = "12 fused blocks" if fused else "48 block matmuls"
        print(
            f"{name}: step {total * 1e3:.1f} ms ({1 / total:.1f} tok/s, {nbytes / total / 1e9:.1f} GB/s) = "
            f"{what} {blocks * 1e3:.1f} ms ({blocks / total:.0%}) + lm_head {head * 1e3:.1f} ms "
            f"({head / total:.0%}) + the rest {rest * 1e3:.1f} ms ({rest / total:.0%})"
        )
    kernels.set_enabled(True)
    decode_step.set_enabled(True)


if __name__ == "__main__":
    main()
