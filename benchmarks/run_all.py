"""The standard benchmark set: gpt2cli beside transformers, llama.cpp and CTranslate2, in one run.

A benchmark, not a test (CI never runs it). Usage:

    .venv/bin/python benchmarks/run_all.py [--repeats 3] [--new-tokens 64] [--threads N]
        [--sizes 124m,355m] [--no-llama] [--no-ct2] [--no-busy] [--no-score] [--out benchmarks/RESULTS.md]

1. gpt2-shaped random checkpoints (std 0.02; speed does not depend on the values) are made with
   the project's own factory (tests/checkpoints.py) and cached in ~/.cache/gpt2cli-bench.
2. Every engine is loaded once, then each repeat runs every workload on every engine in turn
   (the order rotating per repeat), so that all engines see the same machine load:
   decode batch 1 after a 16-token prompt, prefill of 512 tokens, decode batch 8 (124M only).
   Engines: gpt2cli (float32, bfloat16, float16, int8), transformers (float32, in-process),
   llama.cpp (``llama-bench``: f32, f16, bf16, q8_0) and CTranslate2 (float32, int8).
3. llama.cpp is built from the llama-cpp-python sdist (``pip download --no-binary``: it vendors
   llama.cpp's source; CMake, Release, GGML_NATIVE) and the checkpoint converted with its
   convert_hf_to_gguf.py. CTranslate2 (``pip install ctranslate2``, never a gpt2cli
   dependency) converts the same checkpoint with ``ct2-transformers-converter``.
4. The busy-machine row: the batch-1 decode again while another process keeps one core busy.
5. Scoring throughput (context 1024, stride 512) and a quality line per precision: mean KL of
   the next-token distributions and perplexity against gpt2cli float32.
6. The machine: CPU, its read bandwidth (torch.sum over 1 GiB, 1 thread and N threads) and
   the load average before and after; one Markdown report to --out and stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("GPT2_BENCH_CACHE", Path.home() / ".cache" / "gpt2cli-bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {"124m": (12, 12, 768), "355m": (24, 16, 1024), "774m": (36, 20, 1280), "1558m": (48, 25, 1600)}
LLAMA_TYPES = ("f32", "f16", "bf16", "q8_0")
OURS = (("float32", None), ("bfloat16", None), ("float16", None), ("float32", "int8"))
PRECISION = {"float32": "fp32", "bfloat16": "half", "float16": "half", "int8": "int8"}
PEER_PRECISION = {
    "f32": "fp32",
    "float32": "fp32",
    "f16": "half",
    "bf16": "half",
    "q8_0": "int8",
    "int8": "int8",
}
PROMPT, PREFILL = 16, 512


def log(msg: str) -> None:
    print(f"[run_all {dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def make_checkpoint_of(size: str) -> Path:
    """The gpt2-shaped random checkpoint of ``size``, made once with tests/checkpoints.py."""
    dest = CACHE / f"gpt2-{size}-random"
    if (dest / "model.safetensors").is_file():
        return dest
    from checkpoints import make_checkpoint

    n_layer, n_head, n_embd = SIZES[size]
    log(f"making the {size} random checkpoint in {dest}")
    return make_checkpoint(
        dest, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024, std=0.02, seed=0
    )


# --- engines ----------------------------------------------------------------------------------


@dataclass
class Engine:
    """One engine at one precision: measures tokens/s of a workload, one run per call."""

    name: str
    weights: str
    decode: Callable[[int, int, int], float]  # (prompt, batch, new) -> decode tok/s
    prefill: Callable[[int], float]  # prompt -> prefill tok/s
    weight_bytes: int = 0
    batches: tuple[int, ...] = (1, 8)
    warms_itself: bool = False  # llama-bench runs a warm-up of its own before the timed run

    @property
    def label(self) -> str:
        return f"{self.name} {self.weights}"


def _ids(n: int, seed: int) -> list[int]:
    from gpt2cli.bench import random_prompt

    return random_prompt(n, 50257, seed)


def python_engines(ckpt: Path, big: bool, args: argparse.Namespace) -> list[Engine]:
    """gpt2cli at each precision and transformers float32, loaded in this process."""
    from gpt2cli.bench import BenchSpec, _load_ours, _load_transformers, _Timer

    engines = []
    variants = OURS if not big else (("float32", None), ("bfloat16", None), ("float32", "int8"))
    for dtype, quantize in variants:
        spec = BenchSpec(model=str(ckpt), device="cpu", dtype=dtype, quantize=quantize, offline=True)
        lm, subject = _load_ours(spec)
        engines.append(_from_subject("gpt2cli", quantize or dtype, subject, _Timer))
        engines[-1].weight_bytes = subject.weight_bytes
        engines[-1].lm = lm  # type: ignore[attr-defined]  # kept alive, and for the quality line
    if not big and not args.no_transformers:
        model, subject = _load_transformers(ckpt, torch.device("cpu"), torch.float32)
        engines.append(_from_subject("transformers", "float32", subject, _Timer))
        engines[-1].model = model  # type: ignore[attr-defined]
    return engines


def _from_subject(name: str, weights: str, subject, timer_cls) -> Engine:  # noqa: ANN001
    def decode(prompt: int, batch: int, new: int) -> float:
        timer = timer_cls(prompt, batch)
        timer.runs.append(subject.run_once(_ids(prompt, 1), batch, new))
        return timer.figures()["decode_tokens_per_second"].median

    def prefill(prompt: int) -> float:
        timer = timer_cls(prompt, 1)
        timer.runs.append(subject.run_once(_ids(prompt, 2), 1, 2))
        return timer.figures()["prefill_tokens_per_second"].median

    warm = subject.run_once(_ids(PROMPT, 0), 1, 4)  # compiles kernels, warms caches
    del warm
    return Engine(name, weights, decode, prefill)


def ct2_engines(ckpt: Path, size: str, args: argparse.Namespace) -> tuple[list[Engine], str]:
    if args.no_ct2:
        return [], "CTranslate2 skipped (--no-ct2)"
    try:
        import ctranslate2
    except ImportError:
        return [], "CTranslate2 not installed (pip install ctranslate2)"
    engines = []
    for quant in ("float32", "int8"):
        out = CACHE / f"ct2-{size}-{quant}"
        if not (out / "model.bin").is_file():
            log(f"converting to CTranslate2 {quant}")
            conv = Path(sys.executable).parent / "ct2-transformers-converter"
            subprocess.run([str(conv), "--model", str(ckpt), "--output_dir", str(out), "--quantization", quant,
                            "--force"], check=True, capture_output=True)  # fmt: skip
        engines.append(_ct2_engine(out, quant, args.threads))
        engines[-1].weight_bytes = (out / "model.bin").stat().st_size
    return engines, f"CTranslate2 {ctranslate2.__version__} (each precision in its own process)"


def _ct2_engine(model_dir: Path, quant: str, threads: int) -> Engine:
    """CTranslate2 in a process of its own, as llama.cpp is. In ours, once it has run (its
    wheel brings a second libgomp), numba's parallel regions slowed down for good: our float32
    decode from 52 to 41 tok/s, a hot 768 x 768 GEMV from 19 to 80-110 us, numba's own worker
    thread idle while one of the new threads worked (measured 2026-12-02): a cost of sharing
    one process that no user of either pays."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_ct2_serve, args=(theirs, str(model_dir), quant, threads), daemon=True)
    proc.start()
    theirs.close()  # the child's end: a child that dies closes the pipe, and recv() says so
    try:
        ready = ours.recv()
    except EOFError:
        ready = None
    if ready != "ready":
        proc.join(timeout=5)
        raise RuntimeError(f"CTranslate2 {quant} did not start (its process exited with {proc.exitcode})")

    def ask(*request: object) -> float:
        ours.send(request)
        return float(ours.recv())

    engine = Engine("CTranslate2", quant, lambda p, b, n: ask("decode", p, b, n), lambda p: ask("prefill", p))
    engine.proc = proc  # type: ignore[attr-defined]  # kept alive with the engine
    return engine


def _ct2_serve(conn, model_dir: str, quant: str, threads: int) -> None:  # noqa: ANN001
    """The CTranslate2 process: loads the model, warms it up, then answers decode / prefill
    requests (tok/s) until the pipe closes."""
    import ctranslate2

    gen = ctranslate2.Generator(model_dir, device="cpu", compute_type=quant, intra_threads=threads)
    vocab = json.loads((Path(model_dir) / "vocabulary.json").read_text())

    def run(prompt: int, batch: int, new: int) -> list[float]:
        tokens = [vocab[i] for i in _ids(prompt, 1)]
        prompts = [tokens] * batch
        stamps: list[float] = []
        t0 = time.perf_counter()
        step = -1
        for result in gen.generate_tokens(prompts if batch > 1 else tokens, max_length=new, min_length=new,
                                          sampling_topk=1):  # fmt: skip
            if result.step != step:  # one result per row and step
                step = result.step
                stamps.append(time.perf_counter() - t0)
        return stamps

    run(PROMPT, 1, 4)  # warm-up
    conn.send("ready")
    while True:
        try:
            kind, *params = conn.recv()
        except EOFError:
            return
        if kind == "decode":
            prompt, batch, new = params
            stamps = run(prompt, batch, new)
            conn.send(batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        else:  # prefill: the first token's time is the prompt's forward pass
            conn.send(params[0] / run(params[0], 1, 1)[0])


def llama_engines(ckpt: Path, size: str, args: argparse.Namespace) -> tuple[list[Engine], str]:
    if args.no_llama:
        return [], "llama.cpp skipped (--no-llama)"
    try:
        tree = llama_tree()
        bin_dir = build_llama(tree)
    except (subprocess.CalledProcessError, OSError, ValueError) as exc:
        return [], f"llama.cpp unavailable: {exc}"
    types = LLAMA_TYPES if size == "124m" else ("f32", "q8_0")
    engines = [_llama_engine(bin_dir, to_gguf(tree, ckpt, size, t), t, args.threads) for t in types]
    return engines, f"llama.cpp from llama-cpp-python {tree.parent.parent.name.split('-')[-1]} (vendored)"


def _llama_engine(bin_dir: Path, gguf: Path, outtype: str, threads: int) -> Engine:
    def bench(*flags: str) -> float:
        cmd = [
            str(bin_dir / "llama-bench"),
            "-m",
            str(gguf),
            "-t",
            str(threads),
            "-r",
            "1",
            "-o",
            "json",
            *flags,
        ]
        (test,) = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        return float(test["avg_ts"])

    def decode(prompt: int, batch: int, new: int) -> float:
        return bench("-p", "0", "-n", str(new), "-d", str(prompt))  # decode after `prompt` tokens

    def prefill(prompt: int) -> float:
        return bench("-p", str(prompt), "-n", "0")

    e = Engine("llama.cpp", outtype, decode, prefill, batches=(1,), warms_itself=True)
    e.weight_bytes = gguf.stat().st_size
    return e


def llama_tree() -> Path:
    """llama.cpp's source from the llama-cpp-python sdist (downloaded once)."""
    found = sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    sdist = CACHE / "sdist"
    log("downloading the llama-cpp-python sdist (it vendors llama.cpp)")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "llama-cpp-python", "-d", str(sdist)], check=True)  # fmt: skip
    (archive,) = sorted(sdist.glob("llama_cpp_python-*.tar.gz"))[-1:]
    subprocess.run(["tar", "xzf", str(archive), "-C", str(CACHE)], check=True)
    return sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
"""llama.cpp 0.3.36's AMX q8_0 kernel dies of SIGILL (tilezero) on the test machine, which
advertises AMX: built for the native CPU without AMX (its AVX512-VNNI kernels)."""


def build_llama(tree: Path) -> Path:
    """Build llama-bench (cached); returns the bin directory."""
    build = CACHE / "build-noamx"
    bin_dir = build / "bin"
    if (bin_dir / "llama-bench").is_file():
        return bin_dir
    log("building llama.cpp (llama-bench): minutes on a small CPU")
    subprocess.run(
        ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    jobs = str(os.cpu_count() or 1)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", jobs], check=True)
    return bin_dir


def to_gguf(tree: Path, ckpt: Path, size: str, outtype: str) -> Path:
    """The checkpoint converted with llama.cpp's own converter (cached)."""
    out = CACHE / f"gpt2-{size}-random-{outtype}.gguf"
    if out.is_file():
        return out
    log(f"converting {size} to GGUF {outtype}")
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    subprocess.run(
        [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", outtype, "--outfile", str(out)],
        check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return out


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Figures:
    """Per engine label and workload, the figure of every repeat."""

    runs: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, label: str, workload: str, value: float) -> None:
        self.runs.setdefault((label, workload), []).append(value)

    def median(self, label: str, workload: str) -> float | None:
        values = self.runs.get((label, workload))
        return statistics.median(values) if values else None

    def spread(self, label: str, workload: str) -> str:
        values = self.runs.get((label, workload))
        if not values:
            return "—"
        return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


Workload = tuple[str, Callable[[Engine], float], Callable[[Engine], object], Callable[[Engine], bool]]
"""(name, run one measurement, its untimed warm-up, applies to this engine)."""

WARM_TOKENS = 16
"""Tokens of the untimed decode before each timed one. Every engine gets a warm-up right
before it is timed, as llama-bench gives itself one: without it, whichever engine followed
another's run paid for it (our float32 decode right after a llama-bench process: 42-45 tok/s
against 49-51 after a 16-token warm-up, measured 2026-12-02)."""


def workloads(big: bool, new: int) -> list[Workload]:
    def decode(batch: int) -> tuple[Callable[[Engine], float], Callable[[Engine], object]]:
        return lambda e: e.decode(PROMPT, batch, new), lambda e: e.decode(PROMPT, batch, WARM_TOKENS)

    items: list[Workload] = [
        ("decode b1", *decode(1), lambda e: True),
        (f"prefill {PREFILL}", lambda e: e.prefill(PREFILL), lambda e: e.prefill(PREFILL), lambda e: True),
    ]
    if not big:
        items.append(("decode b8", *decode(8), lambda e: 8 in e.batches))
    return items


def interleaved(
    engines: list[Engine], work: list[Workload], repeats: int, figures: Figures, tag: str = ""
) -> None:
    """Each repeat runs every workload on every engine, the engine order rotating per repeat;
    each timed run right after its untimed warm-up."""
    for r in range(repeats):
        order = engines[r % len(engines) :] + engines[: r % len(engines)]
        for name, run, warm, applies in work:
            for e in order:
                if applies(e):
                    log(f"repeat {r + 1}/{repeats}: {e.label} {name}{tag}")
                    if not e.warms_itself:
                        warm(e)
                    figures.add(e.label, name + tag, run(e))


class BusyCore:
    """Another process keeping one core busy (a spinning Python loop) while in the with-block."""

    def __enter__(self) -> BusyCore:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # the scheduler and our load watch see it
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def read_bandwidth(threads: int) -> tuple[float, float]:
    """GB/s of torch.sum over 1 GiB of float32 (beyond any cache): (1 thread, ``threads``)."""
    a = torch.ones(1 << 28)
    out = []
    for n in (1, threads):
        torch.set_num_threads(n)
        a.sum()
        best = min(_timed(a.sum) for _ in range(5))
        out.append(a.numel() * 4 / best / 1e9)
    torch.set_num_threads(threads)
    return out[0], out[1]


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def quality(engines: list[Engine]) -> list[str]:
    """KL(fp32 || variant) and perplexity of every gpt2cli precision on 512 random tokens (prefill paths)."""
    from gpt2cli.quantize import compare_next_token

    ours = {e.weights: e for e in engines if e.name == "gpt2cli"}
    ref = ours.get("float32")
    if ref is None:
        return []
    ids = torch.tensor([_ids(512, 7)])
    lines = []
    for weights, e in ours.items():
        if weights == "float32":
            continue
        with torch.inference_mode():
            r = compare_next_token(ref.lm.model, e.lm.model, ids)  # type: ignore[attr-defined]
        dppl = r["perplexity"] / r["perplexity_reference"] - 1
        lines.append(f"| gpt2cli {weights} | {r['mean_kl']:.2e} | {dppl * 100:+.3f}% |")
    return lines


def scoring(engines: list[Engine], args: argparse.Namespace) -> list[str]:
    """Scored tokens/s, context 1024 stride 512, gpt2cli precisions and transformers' recipe."""
    from score_throughput import make_text, transformers_recipe

    ours = [e for e in engines if e.name == "gpt2cli" and e.weights in ("float32", "bfloat16", "int8")]
    if not ours:
        return []
    lm0 = ours[0].lm  # type: ignore[attr-defined]
    text = make_text(lm0, args.score_tokens)
    ids = torch.tensor([[lm0.tokenizer.eot_id, *lm0.encode(text)]])
    runs: dict[str, list[float]] = {}
    ppl: dict[str, float] = {}
    tf = next((e for e in engines if e.name == "transformers"), None)
    for r in range(args.repeats):
        for e in ours:
            log(f"repeat {r + 1}: scoring {e.label}")
            t0 = time.perf_counter()
            result = e.lm.score(text, context=1024, stride=512)  # type: ignore[attr-defined]
            runs.setdefault(e.label, []).append(result.tokens / (time.perf_counter() - t0))
            ppl[e.label] = result.perplexity
        if tf is not None:
            log(f"repeat {r + 1}: scoring transformers")
            t0 = time.perf_counter()
            _, scored = transformers_recipe(tf.model, ids, 1024, 512)  # type: ignore[attr-defined]
            runs.setdefault("transformers float32", []).append(scored / (time.perf_counter() - t0))
    base = statistics.median(runs["gpt2cli float32"])
    tf_rate = statistics.median(runs["transformers float32"]) if "transformers float32" in runs else None
    lines = [
        "| engine | scored tok/s | × gpt2cli fp32 | × transformers | perplexity Δ vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for label, values in runs.items():
        rate = statistics.median(values)
        d = f"{(ppl[label] / ppl['gpt2cli float32'] - 1) * 100:+.3f}%" if label in ppl else "—"
        vs_tf = f"{rate / tf_rate:.2f}×" if tf_rate else "—"
        lines.append(f"| {label} | {rate:.0f} | {rate / base:.2f}× | {vs_tf} | {d} |")
    return lines


# --- the report -------------------------------------------------------------------------------


def table(engines: list[Engine], figures: Figures, work_names: list[str]) -> list[str]:
    head = ["engine", "weights", *[f"{w} tok/s" for w in work_names], "decode GB/s"]
    head += [f"{w}: ours ÷ best peer" for w in work_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in engines:
        cells = [e.name, e.weights, *[figures.spread(e.label, w) for w in work_names]]
        d = figures.median(e.label, "decode b1")
        cells.append(f"{d * e.weight_bytes / 1e9:.1f}" if d and e.weight_bytes else "—")
        for w in work_names:
            cells.append(_vs_best_peer(e, engines, figures, w))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _vs_best_peer(e: Engine, engines: list[Engine], figures: Figures, work: str) -> str:
    if e.name != "gpt2cli":
        return ""
    mine = figures.median(e.label, work)
    prec = PRECISION[e.weights]
    peers = [(figures.median(p.label, work), p.label) for p in engines
             if p.name in ("llama.cpp", "CTranslate2") and PEER_PRECISION[p.weights] == prec]  # fmt: skip
    peers = [(v, label) for v, label in peers if v]
    if not mine or not peers:
        return "—"
    best, label = max(peers)
    return f"{mine / best:.2f}× ({label})"


def busy_table(engines: list[Engine], figures: Figures) -> list[str]:
    lines = ["| engine | decode b1 idle-ish | decode b1, one core busy | slowdown |", "|---|---|---|---|"]
    for e in engines:
        idle, busy = figures.median(e.label, "decode b1"), figures.median(e.label, "decode b1 busy")
        if idle and busy:
            lines.append(f"| {e.label} | {idle:.1f} | {busy:.1f} | {idle / busy:.2f}× |")
    return lines


def machine(threads: int, bw: tuple[float, float], notes: list[str]) -> str:
    cpu = "unknown CPU"
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next(
            line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")
        )
        flags = text
    except (OSError, StopIteration):
        pass
    simd = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    return (
        f"{cpu} ({', '.join(simd) or 'AVX2 or less'}), {os.cpu_count()} cores visible, {threads} threads; "
        f"read bandwidth {bw[0]:.1f} GB/s (1 thread), {bw[1]:.1f} GB/s ({threads} threads); "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {tf}; {'; '.join(notes)}; {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sizes", default="124m", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--no-llama", action="store_true")
    parser.add_argument("--no-ct2", action="store_true")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-busy", action="store_true", help="skip the busy-machine row")
    parser.add_argument("--no-score", action="store_true", help="skip scoring and the quality line")
    parser.add_argument("--score-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    bw = read_bandwidth(args.threads)
    report: list[str] = []
    notes: list[str] = []
    for size in args.sizes.split(","):
        big = size != "124m"
        ckpt = make_checkpoint_of(size)
        engines = python_engines(ckpt, big, args)
        peers_ct2, note_ct2 = ct2_engines(ckpt, size, args) if not big else ([], "")
        peers_llama, note_llama = llama_engines(ckpt, size, args)
        notes += [n for n in (note_ct2, note_llama) if n and n not in notes]
        engines += peers_ct2 + peers_llama
        figures = Figures()
        work = workloads(big, args.new_tokens)
        interleaved(engines, work, args.repeats, figures)
        if not args.no_busy and not big:
            busy = [e for e in engines if e.weights in ("float32", "f32", "int8", "q8_0")]
            with BusyCore():
                interleaved(busy, work[:1], args.repeats, figures, tag=" busy")
        report += [f"## {size}", "", *table(engines, figures, [w[0] for w in work]), ""]
        if not args.no_busy and not big:
            report += [
                "One core kept busy by another process (a spinning loop):",
                "",
                *busy_table(engines, figures),
                "",
            ]
        if not args.no_score and not big:
            report += ["Scoring (context 1024, stride 512):", "", *scoring(engines, args), ""]
            report += ["Quality against gpt2cli float32 (512 random tokens, full forward):", "",
                       "| variant | mean KL (nats) | perplexity Δ |", "|---|---|---|", *quality(engines), ""]  # fmt: skip
        del engines
    load_after = os.getloadavg()
    head = [
        f"Machine: {machine(args.threads, bw, notes)}",
        "",
        f"Load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}.",
        f"Medians (min–max) of {args.repeats} repeats, engines interleaved per repeat; random gpt2-shaped "
        f"weights, random prompt ids, greedy, EOS ignored, {args.new_tokens} new tokens. decode b1: batch 1 after "
        f"a {PROMPT}-token prompt; decode b8: 8 rows continuing one prompt (aggregate tok/s); decode GB/s: "
        "weight bytes × decode b1 tok/s. Ratios > 1: gpt2cli faster than the fastest peer of its precision "
        "(llama.cpp, CTranslate2; half = f16/bf16).",
        "",
    ]
    text = "\n".join(head + report) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
