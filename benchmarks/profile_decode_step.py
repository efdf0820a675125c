"""Where one batch-1 decode step's time goes, on the gpt2-shaped (124M) random checkpoint.

Times the whole step (median of N), then the same 48 block matmuls and the lm_head alone
through the same ``kernels.linear`` (kernels on, then off), the rest being attention,
LayerNorm, GELU, embeddings and Python. Bytes of weights read per step / step time gives
the achieved bandwidth.

    .venv/bin/python benchmarks/profile_decode_step.py [--threads 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def median_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from decode_vs_transformers import make_124m

    from gpt2cli import kernels, load

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ckpt", default="/tmp/gpt2cli-124m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(str(make_124m(Path(args.ckpt))), device="cpu")
    model = lm.model
    from gpt2cli.model import Linear

    linears = [(m.weight, m.bias) for m in model.modules() if isinstance(m, Linear)]  # the 48 block matmuls
    xs = {w.shape[1]: torch.randn(1, 1, w.shape[1]) for w, _ in linears}
    wte = model.wte.weight
    h = torch.randn(1, model.config.n_embd)
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        with torch.inference_mode():
            cache = model.new_cache(1, 256)
            model(torch.tensor([[1] * 64]), cache)
            ids = torch.tensor([[5]])

            def step(ids: torch.Tensor = ids, cache=cache) -> None:
                model(ids, cache, last_only=True)
                cache.truncate(64)

            total = median_time(step, args.steps)
            blocks = median_time(
                lambda: [kernels.linear(xs[w.shape[1]], w, b) for w, b in linears], args.steps
            )
            head = median_time(lambda: kernels.linear(h, wte), args.steps)
        rest = total - blocks - head
        nbytes = sum(w.numel() * 4 for w, _ in linears) + wte.numel() * 4
        name = "numba kernels" if enabled else "F.linear (kernels off)"
        print(
            f"{name}: step {total * 1e3:.1f} ms ({1 / total:.1f} tok/s, {nbytes / total / 1e9:.1f} GB/s) = "
            f"48 block matmuls {blocks * 1e3:.1f} ms ({blocks / total:.0%}) + lm_head {head * 1e3:.1f} ms "
            f"({head / total:.0%}) + the rest {rest * 1e3:.1f} ms ({rest / total:.0%})"
        )
    kernels.set_enabled(True)


if __name__ == "__main__":
    main()
