"""`gpt2 serve` under concurrent load: continuous batching against one request at a time.

Starts two ``gpt2 serve`` processes on free 127.0.0.1 ports, one with continuous batching
(``--max-batch`` 8, the default) and one with ``--max-batch 1``, and runs the same load on
each, side by side, so the ratio column is what batching buys on this machine whatever else
it is doing. The servers are processes of their own, as a user runs them: client threads in
the server's process would share its interpreter lock with the engine thread (``--in-process``
does that, to compare). The load: C client threads (1, 4, 8, 16) sending C x R greedy
completion requests, drawn from one shared queue, with prompts of mixed token lengths (2 to
400) and mixed ``max_tokens`` (8 to 256), all streamed or all not. Reported per row:
aggregate generated tokens/s, p50/p99 request latency and (streamed) p50/p99 time to first
token; then the time to first token of a short request sent while a 300-token generation
runs (head-of-line blocking).

    python benchmarks/serve_concurrency.py                   # a random 124M-shaped GPT-2 (12x768)
    python benchmarks/serve_concurrency.py --model gpt2      # a real one, if it is cached
    python benchmarks/serve_concurrency.py --layers 2 --embd 64 --clients 1 4 --requests 1  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT_TOKENS = (2, 12, 40, 100, 200, 400)
MAX_TOKENS = (8, 16, 32, 64, 128, 256)
EOT = 50256  # <|endoftext|> in every GPT-2 vocabulary


def random_checkpoint(dest: Path, n_layer: int, n_embd: int) -> str:
    from checkpoints import make_checkpoint

    return str(
        make_checkpoint(dest, n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd, n_positions=1024)
    )


@dataclass
class Load:
    """What one run of C clients measured."""

    tokens: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class ServerProcess:
    """``gpt2 serve`` in a process of its own on a free 127.0.0.1 port, the same URL/stop as ServerThread."""

    def __init__(self, spec: str, device: str, threads: int | None, **options: object) -> None:
        from serverutil import free_port

        self.port = free_port()
        self.argv = [sys.executable, "-m", "gpt2cli", "serve", "-m", spec, "--device", device]
        self.argv += ["--port", str(self.port)]
        for name, value in options.items():
            self.argv += [f"--{name.replace('_', '-')}", str(value)]
        self.env = {**os.environ, **({"GPT2_THREADS": str(threads)} if threads else {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        from serverutil import wait_for

        proc = self.proc = subprocess.Popen(self.argv, env=self.env, stderr=subprocess.DEVNULL)

        def up() -> bool:
            if proc.poll() is not None:
                raise SystemExit(f"gpt2 serve exited with {proc.returncode}: {' '.join(self.argv)}")
            try:
                return httpx.get(self.url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def start_servers(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """The batching server and the one-at-a-time server, started (processes unless --in-process)."""
    sizes = {"batched": args.max_batch, "one at a time": 1}
    if not args.in_process:
        return {
            name: ServerProcess(spec, args.device, args.threads, max_batch=rows, cache_tokens=0).start()
            for name, rows in sizes.items()
        }
    from serverutil import ServerThread

    from gpt2cli import load
    from gpt2cli.device import configure_threads

    configure_threads(args.threads)
    lm = load(spec, device=args.device)
    return {name: ServerThread(lm, max_batch=rows, cache_tokens=0).start() for name, rows in sizes.items()}


def request(http: httpx.Client, url: str, body: dict) -> tuple[int, float, float | None]:
    """(completion tokens, seconds, seconds to the first token or None) of one completion."""
    t0 = time.perf_counter()
    if not body.get("stream"):
        resp = http.post(url + "/v1/completions", json=body)
        resp.raise_for_status()
        return resp.json()["usage"]["completion_tokens"], time.perf_counter() - t0, None
    first = None
    tokens = 0
    body = {**body, "stream_options": {"include_usage": True}}
    with http.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    return tokens, time.perf_counter() - t0, first


def workload(clients: int, requests: int, vocab: int) -> list[list[tuple[list[int], int]]]:
    """Each client's share of the requests: (prompt ids, max_tokens), the same for both servers."""
    out = []
    for k in range(clients):
        rng = random.Random(1000 * clients + k)
        out.append(
            [
                ([rng.randrange(vocab) for _ in range(rng.choice(PROMPT_TOKENS))], rng.choice(MAX_TOKENS))
                for _ in range(requests)
            ]
        )
    return out


def run_load(url: str, model: str, plan: list[list[tuple[list[int], int]]], stream: bool) -> Load:
    """C client threads (C = len(plan)) drawing requests from one shared queue until it is empty.

    A shared queue (what vLLM's ``benchmark_serving --max-concurrency`` does) keeps C requests in
    flight until the last few: with a queue per client the run's end is one unlucky client's
    requests decoding alone, which measures the draw more than the server.
    """
    load = Load()
    lock = threading.Lock()
    queue = deque(job for jobs in zip(*plan, strict=True) for job in jobs)  # round-robin order

    def client() -> None:
        with httpx.Client(timeout=3600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    prompt, max_tokens = queue.popleft()
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                try:
                    tokens, seconds, ttft = request(http, url, {**body, "stream": stream})
                except httpx.HTTPError as exc:
                    with lock:
                        load.errors.append(repr(exc))
                    continue
                with lock:
                    load.tokens += tokens
                    load.latencies.append(seconds)
                    if ttft is not None:
                        load.ttfts.append(ttft)

    threads = [threading.Thread(target=client) for _ in plan]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.seconds = time.perf_counter() - t0
    if load.errors:
        raise SystemExit(f"{len(load.errors)} requests failed, e.g. {load.errors[0]}")
    return load


def short_behind_long(url: str, model: str, vocab: int, repeats: int = 3) -> float:
    """Median time to first token of a 4-token request sent while a 300-token generation runs."""
    rng = random.Random(7)
    times = []
    with httpx.Client(timeout=3600) as http:
        for _ in range(repeats):
            long_body = {"model": model, "prompt": [rng.randrange(vocab) for _ in range(20)]}
            long_body |= {"max_tokens": 300, "temperature": 0, "stream": True}
            with http.stream("POST", url + "/v1/completions", json=long_body) as long:
                lines = long.iter_lines()
                next(line for line in lines if line.startswith("data: {"))  # it is generating
                short = {"model": model, "prompt": [rng.randrange(vocab) for _ in range(4)]}
                short |= {"max_tokens": 8, "temperature": 0, "stream": True}
                with httpx.Client(timeout=3600) as other:
                    _, _, ttft = request(other, url, short)
                assert ttft is not None
                times.append(ttft)
                for _ in lines:  # let the long one finish
                    pass
    return statistics.median(times)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    return f"{pct(values, 0.5):.2f} / {pct(values, 0.99):.2f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model spec (default: a random checkpoint, see --layers/--embd)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-batch", type=int, default=8, help="the batching server's --max-batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads of each server")
    parser.add_argument(
        "--in-process", action="store_true", help="run the servers as threads of this process"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        spec = args.model or random_checkpoint(Path(tmp) / "ckpt", args.layers, args.embd)
        model = Path(spec).name if Path(spec).is_dir() else spec
        servers = start_servers(spec, args)
        try:
            vocab = EOT  # GPT-2's ids below <|endoftext|>: no end of text inside a prompt
            for srv in servers.values():  # warm-up
                run_load(srv.url, model, workload(1, 1, vocab), stream=False)
            name = args.model or f"random {args.layers}x{args.embd}"
            print(
                f"model: {name} on {args.device}; {args.requests} requests per client, prompts of "
                f"{min(PROMPT_TOKENS)}-{max(PROMPT_TOKENS)} tokens, max_tokens {min(MAX_TOKENS)}-"
                f"{max(MAX_TOKENS)}, greedy; batched = --max-batch {args.max_batch}, 1 = --max-batch 1\n"
            )
            print(
                "| clients | stream | tok/s batched | tok/s 1 | ratio | latency p50 / p99 s batched "
                "| latency p50 / p99 s 1 | TTFT p50 / p99 s batched | TTFT p50 / p99 s 1 |"
            )
            print("|---:|:---:|---:|---:|---:|---:|---:|---:|---:|")
            for c in args.clients:
                plan = workload(c, args.requests, vocab)
                for stream in (False, True):
                    b, s = (run_load(srv.url, model, plan, stream) for srv in servers.values())
                    print(
                        f"| {c} | {'yes' if stream else 'no'} | {b.rate:.1f} | {s.rate:.1f} | "
                        f"{b.rate / s.rate:.2f}x | {spread(b.latencies)} | {spread(s.latencies)} | "
                        f"{spread(b.ttfts)} | {spread(s.ttfts)} |",
                        flush=True,
                    )
            hol = {n: short_behind_long(srv.url, model, vocab) for n, srv in servers.items()}
            print(
                f"\ntime to first token of a 4-token request while a 300-token generation runs "
                f"(median of 3): batched {hol['batched']:.2f} s, one at a time {hol['one at a time']:.2f} s"
            )
        finally:
            for srv in servers.values():
                srv.stop()


if __name__ == "__main__":
    main()
