"""Batch scoring throughput: a per-document loop vs `gpt2 score --jsonl`, --workers 2 and --ray.

On the same random gpt2-shaped (124M) checkpoint and the same generated corpora, in one run:

(a) a naive loop calling `gpt2 score`'s library function (`LM.score`) once per document,
(b) the `--jsonl` job with packing (`batch.run.run_job`, one process),
(c) the same job with `--workers 2`,
(d) the same job on a local Ray instance with 2 actors (skipped without the `ray` extra),
(e) the ceiling: every document's text joined into one long text, scored by `LM.score` in
    windows of 1024 without overlap, so every token runs through the model once in full
    batches of full windows, as packing at its best does: the rate the arithmetic allows.

Two corpora: "mixed" (lengths log-uniform in 20..2,000 tokens) and "short" (20..60 tokens),
where packing matters most. Each mode runs in a fresh subprocess, so its peak memory (the RSS
of all its processes, sampled every 0.2 s: Ray's and the workers' included) is its own.
Times are end to end, model loading and worker/Ray start-up included; "first" is the time
to the first result. Timings on a shared machine are noisy: compare ratios, run it twice.

    python benchmarks/batch_score.py                                  # the full 10,000 + 10,000
    python benchmarks/batch_score.py --docs 300 --short-docs 1000     # a quicker run

Needs the test extra (the checkpoint factory uses its BPE files); the Hub is not needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

WORDS = [" the", " cat", " sat", " on", " a", " mat", " and", " dog", " ran", " far", " 7", " blue"]
MODES = ("naive", "jsonl", "workers2", "ray2", "ceiling")


def make_corpus(path: Path, n: int, lo: int, hi: int, seed: int) -> None:
    """Write ``n`` documents of log-uniform token lengths in lo..hi."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            tokens = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            text = "The" + "".join(rng.choice(WORDS) for _ in range(tokens - 1))  # one token a word
            f.write(json.dumps({"id": i, "text": text}) + "\n")


def run_mode(mode: str, model: str, corpus: Path, out: Path, lookahead: int) -> dict:
    """Run one mode in this process; the numbers as a dict."""
    t0 = time.perf_counter()
    first: list[float] = []
    if mode in ("ceiling", "naive"):
        from gpt2cli import load

        lm = load(model, device="cpu")
    if mode == "ceiling":
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        result = lm.score("\n".join(texts), stride=1024)
        first = [time.perf_counter() - t0]
        out.write_text(json.dumps({"total_nll": result.total_nll}) + "\n")
        tokens, docs = result.tokens, len(texts)
    elif mode == "naive":
        tokens = docs = 0
        with open(corpus, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as sink:
            for line in f:
                doc = json.loads(line)
                result = lm.score(doc["text"])
                first = first or [time.perf_counter() - t0]
                sink.write(json.dumps({"id": doc["id"], "total_nll": result.total_nll}) + "\n")
                tokens += result.tokens
                docs += 1
    else:
        from gpt2cli.batch.run import JobOptions, run_job
        from gpt2cli.batch.tasks import ModelSettings, ScoreSettings

        workers = 1 if mode == "jsonl" else 2
        options = JobOptions(
            input=str(corpus), output=str(out), workers=workers, ray=mode == "ray2", lookahead=lookahead
        )

        def on_line(summary: object) -> None:
            if not first:
                first.append(time.perf_counter() - t0)

        summary = run_job(ModelSettings(model, device="cpu"), ScoreSettings(), options, on_line=on_line)
        tokens, docs = summary.tokens, summary.documents
    seconds = time.perf_counter() - t0
    return {
        "mode": mode,
        "seconds": seconds,
        "first": first[0] if first else math.nan,
        "docs": docs,
        "tokens": tokens,
    }


def process_tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(entry)] = int(line.split()[1]) * 1024
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def measure(mode: str, model: str, corpus: Path, out: Path, lookahead: int) -> dict:
    """Run a mode in a fresh subprocess, sampling its process tree's memory."""
    cmd = [sys.executable, __file__, "--child", mode, "--model", model, "--corpus", str(corpus)]
    cmd += ["--out", str(out), "--lookahead", str(lookahead)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], process_tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss"] = peak[0]
    return result


def max_rel_diff(a: Path, b: Path) -> float:
    """Largest relative difference of total_nll between two outputs, line by line."""
    worst = 0.0
    with open(a, encoding="utf-8") as fa, open(b, encoding="utf-8") as fb:
        for la, lb in zip(fa, fb, strict=True):
            x, y = json.loads(la), json.loads(lb)
            assert x["id"] == y["id"]
            worst = max(worst, abs(x["total_nll"] - y["total_nll"]) / abs(y["total_nll"]))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000, help="documents of the mixed corpus")
    parser.add_argument("--short-docs", type=int, default=10_000, help="documents of the short corpus")
    parser.add_argument("--layers", type=int, default=12, help="12 = gpt2 (124M); fewer for a quick run")
    parser.add_argument(
        "--lookahead",
        type=int,
        default=0,
        help="lines per chunk (default: 256, or an eighth of a small corpus so 2 workers share it)",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child, args.model, Path(args.corpus), Path(args.out), args.lookahead)))
        return

    from checkpoints import make_checkpoint

    modes = [m for m in args.modes.split(",") if m]
    try:
        import ray  # noqa: F401
    except ImportError:
        modes = [m for m in modes if m != "ray2"]
        print("ray is not installed: (d) skipped (pip install 'gpt2cli[ray]')", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(
            make_checkpoint(
                work / "ckpt", n_layer=args.layers, n_head=12, n_embd=768, n_positions=1024, std=0.02
            )
        )
        corpora = {
            "mixed": (work / "mixed.jsonl", args.docs, 20, 2000),
            "short": (work / "short.jsonl", args.short_docs, 20, 60),
        }
        for seed, (path, docs, lo, hi) in enumerate(corpora.values()):
            make_corpus(path, docs, lo, hi, seed=seed)
        print(
            f"Batch scoring: {args.layers}-layer gpt2-shaped model (random weights), context 1024, stride 512, "
            f"CPU, {os.cpu_count()} cores (a shared machine: other work ran beside it)\n"
        )
        print(
            "| corpus | mode | documents | tokens | seconds | first result s | docs/s | tokens/s | vs naive | peak RSS MiB |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, (path, docs, _, _) in corpora.items():
            if not docs:
                continue  # --docs 0 or --short-docs 0: that corpus is skipped
            lookahead = args.lookahead or min(256, max(1, docs // 8))
            print(f"<!-- {name}: lookahead {lookahead} -->")
            results = {}
            for mode in modes:
                out = work / f"{name}-{mode}.jsonl"
                results[mode] = r = measure(mode, model, path, out, lookahead)
                base = results.get("naive")
                ratio = f"{(base['seconds'] / r['seconds']):.2f}x" if base else "-"
                print(
                    f"| {name} | {mode} | {r['docs']:,} | {r['tokens']:,} | {r['seconds']:.1f} | {r['first']:.1f} | "
                    f"{r['docs'] / r['seconds']:,.1f} | {r['tokens'] / r['seconds']:,.0f} | {ratio} | "
                    f"{r['peak_rss'] / 2**20:,.0f} |",
                    flush=True,
                )
            if "naive" in modes:
                for mode in [m for m in modes[1:] if m != "ceiling"]:  # the ceiling scores one text
                    diff = max_rel_diff(work / f"{name}-{mode}.jsonl", work / f"{name}-naive.jsonl")
                    print(f"<!-- {name}: {mode} total_nll vs naive, max relative difference {diff:.1e} -->")


if __name__ == "__main__":
    main()
