"""Training-step cost of full fine-tuning vs LoRA vs gradient checkpointing, measured side by side.

Usage: python benchmarks/finetune_step.py [--layers 4 --embd 256 --block 128 --batch 4 --rounds 5]

Each round times one optimizer step of every variant in turn (interleaved, so a noisy shared
machine affects them alike) and the medians are reported as ratios to full fine-tuning, with
the trainable-parameter counts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gpt2cli.config import GPT2Config
from gpt2cli.train.init import new_model
from gpt2cli.train.lora import apply_lora


def make(variant: str, config: GPT2Config) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = new_model(config, seed=0)
    if variant == "lora-8":
        apply_lora(model, 8, 16.0)
    model.gradient_checkpointing = variant == "full+ckpt"
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    t0 = time.perf_counter()
    logits = model(batch[:, :-1])  # (B, T, vocab)
    F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    config = GPT2Config(n_layer=args.layers, n_head=4, n_embd=args.embd, n_positions=args.block)
    variants = ["full", "lora-8", "full+ckpt"]
    built = {v: make(v, config) for v in variants}
    batch = torch.randint(0, config.vocab_size, (args.batch, args.block + 1))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up
        step(*built[v], batch)
    for _ in range(args.rounds):
        for v in variants:
            times[v].append(step(*built[v], batch))
    base = statistics.median(times["full"])
    for v in variants:
        model = built[v][0]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        med = statistics.median(times[v])
        print(f"{v:10s} {med * 1000:8.1f} ms/step  x{med / base:.2f} of full  trainable {trainable:,}")


if __name__ == "__main__":
    main()
