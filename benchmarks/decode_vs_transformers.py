"""Decode and prefill speed of gpt2cli against transformers, side by side in one process.

A gpt2-shaped (124M) random checkpoint is made with the project's own test factory (speed does
not depend on the values). For each configuration, gpt2cli and transformers' generate run
alternately ``--repeats`` times; decode tokens/s = (N-1) / (t(N new) - t(1 new)) and prefill
tokens/s = prompt / t(1 new). Prints a Markdown table of medians, ranges and ratios.

    .venv/bin/python benchmarks/decode_vs_transformers.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_124m(dest: Path) -> Path:
    from checkpoints import make_checkpoint

    if not (dest / "model.safetensors").exists():
        make_checkpoint(dest, n_layer=12, n_head=12, n_embd=768, n_positions=1024, seed=0, std=0.02)
    return dest


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ours_runner(path: Path, cfg: str, prompt: list[int]):
    from gpt2cli import kernels, load

    # "float32-torch": the same engine with the numba kernels off (plain F.linear).
    dtype, quantize = ("float32", "int8") if cfg == "int8" else (cfg.removesuffix("-torch"), None)
    kernels.set_enabled(not cfg.endswith("-torch"))
    lm = load(str(path), device="cpu", dtype=dtype, quantize=quantize)

    def run(n: int) -> None:
        kernels.set_enabled(not cfg.endswith("-torch"))
        lm.engine.reset()  # no prefix reuse between runs
        lm.complete(prompt, max_new_tokens=n, temperature=0.0, ignore_eos=True)

    return run


def hf_runner(path: Path, prompt: list[int]):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run(n: int) -> None:
        with torch.inference_mode():
            model.generate(
                ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=50256,
                attention_mask=torch.ones_like(ids),
            )

    return run


NEW = 128


def measure_all(runners: dict[str, object], prompt_len: int, repeats: int) -> dict[str, tuple[list, list]]:
    """Every engine once per repeat, in turn, so that all see the same machine load."""
    results: dict[str, tuple[list, list]] = {name: ([], []) for name in runners}
    for run in runners.values():
        run(2)  # warm-up
    for _ in range(repeats):
        for name, run in runners.items():
            t1 = timed(lambda run=run: run(1))
            tn = timed(lambda run=run: run(NEW))
            results[name][0].append((NEW - 1) / max(tn - t1, 1e-9))
            results[name][1].append(prompt_len / t1)
            print(f"  {name}: decode {results[name][0][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    return results


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default="16,512")
    ap.add_argument("--configs", default="float32,float32-torch,float16,bfloat16,int8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ckpt", default=str(Path(tempfile.gettempdir()) / "gpt2cli-124m"))
    args = ap.parse_args()
    global NEW
    NEW = args.new_tokens
    torch.set_num_threads(args.threads)
    path = make_124m(Path(args.ckpt))
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, repeats {args.repeats}\n")
    print(f"new tokens {NEW}; decode = (NEW-1) / (t(NEW) - t(1)), prefill = prompt / t(1)\n")
    print("| prompt | engine | decode tok/s | prefill tok/s | decode × HF | prefill × HF |")
    print("|---|---|---|---|---|---|")
    for plen in (int(p) for p in args.prompts.split(",")):
        prompt = torch.randint(0, 50000, (plen,), generator=gen).tolist()
        runners = {"transformers fp32": hf_runner(path, prompt)}
        for cfg in args.configs.split(","):
            runners[f"gpt2cli {cfg}"] = ours_runner(path, cfg, prompt)
        results = measure_all(runners, plen, args.repeats)
        hf_dec, hf_pre = results["transformers fp32"]
        for name, (dec, pre) in results.items():
            rd = statistics.median(dec) / statistics.median(hf_dec)
            rp = statistics.median(pre) / statistics.median(hf_pre)
            print(f"| {plen} | {name} | {fmt(dec)} | {fmt(pre)} | {rd:.2f} | {rp:.2f} |", flush=True)


if __name__ == "__main__":
    main()
