"""Aggregate tokens/s of `gpt2 serve` with 1, 4 and 8 concurrent clients, batching on and off.

Starts the server in this process on a free 127.0.0.1 port and has C client threads each send
R greedy completion requests (prompts of equal token length, so they can share a batch). The
same loads run with ``--max-batch 1`` (one request at a time) side by side, so the table's
ratio column is what batching buys on this machine, whatever else it is doing.

    python benchmarks/serve_concurrency.py                 # a random GPT-2-shaped checkpoint
    python benchmarks/serve_concurrency.py --model gpt2    # a real one, if it is cached
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = [
    "The meaning of life is",
    "Once upon a time there",
    "In the beginning God created",
    "My favourite food is pasta",
]


def random_checkpoint(dest: Path, n_layer: int, n_embd: int) -> str:
    from checkpoints import make_checkpoint

    return str(
        make_checkpoint(dest, n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd, n_positions=1024)
    )


def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple[int, float]:
    """(generated tokens, seconds) for ``clients`` threads sending ``requests`` each."""
    counts: list[int] = []
    errors: list[str] = []

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                body = {
                    "model": model,
                    "prompt": PROMPTS[(k + r) % len(PROMPTS)],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                resp = http.post(url + "/v1/completions", json=body)
                if resp.status_code != 200:
                    errors.append(resp.text)
                    continue
                counts.append(resp.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return sum(counts), seconds


def engine_only(lm, max_tokens: int) -> None:
    """The batch itself, without HTTP: B equal prompts run as one ``BatchRun``, B = 1, 4, 8."""
    from gpt2cli.config import GenerationConfig
    from gpt2cli.server.batch import BatchRun, Job

    prompt = lm.encode(PROMPTS[0])
    cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=0)

    def rate(b: int) -> float:
        jobs = [Job(prompt, cfg, lambda event: None, eos_id=None) for _ in range(b)]
        t0 = time.perf_counter()
        BatchRun(lm.model, lm.tokenizer, jobs).run()
        return b * max_tokens / (time.perf_counter() - t0)

    rate(1)  # warm-up
    one, four, eight = rate(1), rate(4), rate(8)
    print(f"engine alone: {one:.1f} tok/s at B=1; B=4 {four / one:.2f}x, B=8 {eight / one:.2f}x\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model spec (default: a random checkpoint, see --layers/--embd)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1 is steadier on a shared, oversubscribed machine)"
    )
    args = parser.parse_args()
    if args.threads:
        from gpt2cli.device import configure_threads

        configure_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serverutil import ServerThread

    from gpt2cli import load

    with tempfile.TemporaryDirectory() as tmp:
        spec = args.model or random_checkpoint(Path(tmp) / "ckpt", args.layers, args.embd)
        lm = load(spec, device=args.device)
        servers = {
            "batched": ServerThread(lm, max_batch=8).start(),
            "one at a time": ServerThread(lm, max_batch=1).start(),
        }
        try:
            run_load(servers["batched"].url, spec, 1, 1, 4)  # warm-up
            engine_only(lm, args.max_tokens)
            print(
                f"model: {args.model or f'random {args.layers}x{args.embd}'} on {args.device}; "
                f"{args.requests} requests x {args.max_tokens} tokens per client, greedy\n"
            )
            print("| clients | batched tok/s | one at a time tok/s | batched / one at a time |")
            print("|---:|---:|---:|---:|")
            for c in args.clients:
                rates = {}
                for name, srv in servers.items():  # side by side, same load
                    tokens, seconds = run_load(srv.url, spec, c, args.requests, args.max_tokens)
                    rates[name] = tokens / seconds
                b, s = rates["batched"], rates["one at a time"]
                print(f"| {c} | {b:.1f} | {s:.1f} | {b / s:.2f}x |", flush=True)
        finally:
            for srv in servers.values():
                srv.stop()


if __name__ == "__main__":
    main()
