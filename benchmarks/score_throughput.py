"""Scoring throughput: `gpt2 score`'s library path vs the transformers sliding-window recipe.

Both run in the same process on the same machine, on the same random gpt2-shaped (124M)
checkpoint and the same text, with the same context and stride, and the script prints a
Markdown table of scored tokens per second and their ratio. Timings on a shared machine are
noisy: compare the ratio, not the absolute numbers, and run it more than once.

    python benchmarks/score_throughput.py                         # 124M, context 1024, stride 512
    python benchmarks/score_throughput.py --tokens 8192 --device cuda --dtype float32

transformers is needed (it is in the test extra); the Hub is not: the checkpoint is made here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from checkpoints import make_checkpoint  # noqa: E402

from gpt2cli import load  # noqa: E402
from gpt2cli.device import pick_device, pick_dtype, synchronize  # noqa: E402

SENTENCE = "The committee met on Tuesday to discuss the budget, and after a long debate it voted 7 to 2. "


def make_text(lm, tokens: int) -> str:
    """Text of about ``tokens`` tokens (varied by numbering its sentences)."""
    parts, count, i = [], 0, 0
    while count < tokens:
        part = SENTENCE.replace("Tuesday", f"day {i}")
        parts.append(part)
        count += len(lm.encode(part))
        i += 1
    return "".join(parts)


def transformers_recipe(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity guide, as written there: one window at a time, full logits."""
    seq_len = ids.size(1)
    nlls, prev_end_loc, scored = [], 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + context, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
        nlls.append(outputs.loss)
        scored += trg_len
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(torch.stack(nlls).float().mean()), scored


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` runs (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="text length in tokens")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12, help="12 = gpt2 (124M); fewer for a quick run")
    args = parser.parse_args(argv)

    import transformers

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(
            Path(tmp), n_layer=args.layers, n_head=12, n_embd=768, n_positions=1024, std=0.02, seed=0
        )
        lm = load(str(path), device=str(device), dtype=args.dtype)
        ref = transformers.GPT2LMHeadModel.from_pretrained(str(path), dtype=dtype).to(device).eval()
    text = make_text(lm, args.tokens)
    ids = torch.tensor([[lm.tokenizer.eot_id, *lm.encode(text)]], device=device)

    def ours() -> None:
        lm.score(text, context=args.context, stride=args.stride, batch_size=args.batch_size)

    def theirs() -> None:
        transformers_recipe(ref, ids, args.context, args.stride)

    warm = text[: len(text) // 8]
    lm.score(warm, context=args.context, stride=args.stride)  # warm-up both
    transformers_recipe(ref, ids[:, : args.context], args.context, args.stride)
    result = lm.score(text, context=args.context, stride=args.stride, batch_size=args.batch_size)
    tokens = result.tokens
    t_ours = timed(ours, device, args.repeats)
    t_theirs = timed(theirs, device, args.repeats)
    rows = [
        ("gpt2cli (LM.score)", tokens / t_ours, t_ours),
        ("transformers sliding-window recipe", tokens / t_theirs, t_theirs),
    ]
    print(
        f"Scoring throughput: {args.layers}-layer gpt2-shaped model, {tokens} tokens, context {args.context}, "
        f"stride {args.stride}, batch {args.batch_size}, {device} {str(dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}\n"
    )
    print(f"| implementation | seconds (best of {args.repeats}) | scored tokens/s | ratio |")
    print("|---|---:|---:|---:|")
    for name, rate, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {rate:,.0f} | {rate / rows[1][1]:.2f}x |")


if __name__ == "__main__":
    main()
