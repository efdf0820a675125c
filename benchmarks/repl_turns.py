"""What the REPL's KV cache reuse saves: a multi-turn chat run twice side by side, once keeping
the engine's cache between turns (as ``gpt2 repl`` does) and once dropping it before every turn.

Reports forward-pass tokens (exact) and prefill seconds per mode, and their ratios.

    python benchmarks/repl_turns.py [MODEL_OR_DIR] [--turns 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

from gpt2cli import load
from gpt2cli.config import GenerationConfig
from gpt2cli.repl.session import make_session

INPUTS = [
    "Hello! Who are you?",
    "Tell me about the weather where you live.",
    "What did you have for breakfast this morning?",
    "Do you like music? Which kind?",
    "What is your favourite book and why?",
    "Describe the last film you saw.",
    "Where would you like to travel next year?",
    "Thank you, that was a nice chat. Goodbye!",
]


def run(lm, turns: int, reuse: bool, max_new: int) -> tuple[int, int, float]:
    """(forward tokens, prefill tokens, prefill seconds) over ``turns`` turns."""
    session = make_session(lm, GenerationConfig(max_new_tokens=max_new, temperature=0))
    lm.engine.reset()
    before = lm.model.forward_tokens
    prefill_tokens, prefill_seconds = 0, 0.0
    for i in range(turns):
        if not reuse:
            lm.engine.reset()
        for _ in session.respond(INPUTS[i % len(INPUTS)]):
            pass
        assert session.last_result is not None
        prefill_tokens += session.last_result.stats.prefill_tokens
        prefill_seconds += session.last_result.stats.prefill_seconds
    return lm.model.forward_tokens - before, prefill_tokens, prefill_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="gpt2")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    lm = load(args.model, device=args.device)
    run(lm, 1, True, 4)  # warm-up
    t0 = time.perf_counter()
    reuse = run(lm, args.turns, True, args.max_new_tokens)
    t1 = time.perf_counter()
    fresh = run(lm, args.turns, False, args.max_new_tokens)
    t2 = time.perf_counter()
    print(f"{args.turns} turns, {args.max_new_tokens} new tokens each, model {args.model} on {args.device}")
    print(f"{'':14}{'forward tok':>12}{'prefill tok':>12}{'prefill s':>11}{'total s':>9}")
    for name, (fwd, pre, secs), total in (("cache kept", reuse, t1 - t0), ("cache dropped", fresh, t2 - t1)):
        print(f"{name:14}{fwd:>12}{pre:>12}{secs:>11.3f}{total:>9.2f}")
    print(
        f"ratios (dropped / kept): prefill tokens {fresh[1] / reuse[1]:.1f}x, "
        f"prefill seconds {fresh[2] / max(reuse[2], 1e-9):.1f}x, forward tokens {fresh[0] / reuse[0]:.2f}x"
    )


if __name__ == "__main__":
    main()
