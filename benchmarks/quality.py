"""Quality cost of int8 and half-precision storage against float32 on the same text.

Perplexity of each variant and the mean KL(fp32 || variant) of the next-token distributions
(as llama.cpp's perplexity tool reports). Random checkpoints: the tiny test model (peaked
distributions, std 0.2) and the gpt2-shaped one; pass --ckpt to use real GPT-2 weights.

    .venv/bin/python benchmarks/quality.py [--ckpt DIR] [--text FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from checkpoints import make_checkpoint

    from gpt2cli import load
    from gpt2cli.quantize import compare_next_token

    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", action="append", default=[])
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    ckpts = args.ckpt or [str(make_checkpoint(Path(tempfile.mkdtemp()) / "tiny", seed=1, n_positions=1024))]
    text = Path(args.text).read_text(encoding="utf-8")
    print("| checkpoint | variant | perplexity | fp32 perplexity | mean KL (nats) |")
    print("|---|---|---|---|---|")
    for path in ckpts:
        ref = load(path, device="cpu")
        ids = torch.tensor([ref.encode(text)[: min(args.tokens, ref.window)]])
        for variant, kw in (
            ("int8", {"quantize": "int8"}),
            ("float16", {"dtype": "float16"}),
            ("bfloat16", {"dtype": "bfloat16"}),
        ):
            r = compare_next_token(ref.model, load(path, device="cpu", **kw).model, ids)
            print(
                f"| {Path(path).name} | {variant} | {r['perplexity']:.4f} | "
                f"{r['perplexity_reference']:.4f} | {r['mean_kl']:.2e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
