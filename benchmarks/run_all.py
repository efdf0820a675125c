"""The standard benchmark set: gpt2cli, transformers and llama.cpp on one 124M GPT-2, side by side.

A benchmark, not a test (CI never runs it). Usage:

    .venv/bin/python benchmarks/run_all.py [--repeats 3] [--new-tokens 128] [--threads N]
                                           [--skip f16-512] [--reuse llama] [--out benchmarks/RESULTS.md]

1. A gpt2-shaped (12 layers, 768 wide, 1024 positions) random checkpoint is made with the
   project's own checkpoint factory (tests/checkpoints.py; speed does not depend on the values)
   and cached in ~/.cache/gpt2cli-bench.
2. gpt2cli (library ``gpt2cli.bench``) runs batch 1 and 8 x prompt 16 and 512 in float32,
   float16 weights and int8 (``quantize="int8"``: reported as unavailable where the branch
   has no int8 yet); transformers runs the same workloads in float32, in the same process.
3. llama.cpp: ``pip download --no-deps --no-binary :all: llama-cpp-python`` fetches the sdist
   that vendors llama.cpp's source; only ``llama-bench`` is built (CMake, CPU, Release,
   -DLLAMA_CURL=OFF, -DGGML_NATIVE=ON) and cached; the same checkpoint is converted to GGUF
   f32, f16 and q8_0 with that tree's convert_hf_to_gguf.py, and
   ``llama-bench -p 16,512 -n <new> -t <threads> -o json`` runs each (batch 1 only: llama-bench
   decodes one sequence).
4. One Markdown table with the ratios, and the machine it ran on, goes to --out and stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("GPT2_BENCH_CACHE", Path.home() / ".cache" / "gpt2cli-bench"))
LLAMA_TARGETS = ("llama-bench", "llama-perplexity")
PROMPTS = (16, 512)
BATCHES = (1, 8)
VARIANTS = (("float32", None, "f32"), ("float16", None, "f16"), ("float32", "int8", "q8_0"))


def log(msg: str) -> None:
    print(f"[run_all {dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# --- the checkpoint ---------------------------------------------------------------------------


def make_124m() -> Path:
    """The gpt2-shaped random checkpoint, made once with tests/checkpoints.py."""
    dest = CACHE / "gpt2-124m-random"
    if (dest / "model.safetensors").is_file():
        return dest
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import make_checkpoint  # the project's own checkpoint factory

    log(f"making the 124M random checkpoint in {dest}")
    # no stored attn.bias buffers and n_ctx in config.json: what convert_hf_to_gguf.py wants
    return make_checkpoint(dest, n_layer=12, n_head=12, n_embd=768, n_positions=1024, std=0.02, seed=0)


# --- gpt2cli and transformers -----------------------------------------------------------------


@dataclass
class Row:
    engine: str
    weights: str
    batch: int
    prefill: dict[int, float]  # prompt tokens -> prefill tok/s
    decode: dict[int, float]  # prompt tokens -> decode tok/s
    note: str = ""


def run_python_engines(ckpt: Path, args: argparse.Namespace) -> list[Row]:
    from gpt2cli.bench import BenchSpec, run
    from gpt2cli.errors import Gpt2Error

    rows: list[Row] = []
    for dtype, quantize, label in VARIANTS:
        prompts = tuple(p for p in PROMPTS if f"{label}-{p}" not in args.skip)
        batches = tuple(b for b in BATCHES if f"{label}-b{b}" not in args.skip)
        skipped = [f"prompt {p}" for p in PROMPTS if p not in prompts]
        if not batches or not prompts:
            continue
        spec = BenchSpec(
            model=str(ckpt),
            device="cpu",
            dtype=dtype,
            quantize=quantize,
            prompt_tokens=prompts,
            new_tokens=args.new_tokens,
            batch_sizes=batches,
            repeats=args.repeats,
            warmup=1,
            threads=args.threads,
        )
        compare = "transformers" if label == "f32" else None
        log(f"gpt2cli {label}{' and transformers f32' if compare else ''}: prompts {prompts}")
        try:
            report = run(spec, compare=compare, progress=_progress_log)
        except Gpt2Error as exc:
            log(f"gpt2cli {label}: {exc.message}")
            rows += [
                Row("gpt2cli", _weights(label), b, {}, {}, f"not available: {exc.message}") for b in batches
            ]
            continue
        for engine in ("gpt2cli", "transformers") if compare else ("gpt2cli",):
            for b in batches:
                mine = [r for r in report.results if r.engine == engine and r.batch_size == b]
                note = f"{', '.join(skipped)} skipped (slow)" if skipped and engine == "gpt2cli" else ""
                rows.append(
                    Row(
                        engine,
                        _weights(label),
                        b,
                        {r.prompt_tokens: r.prefill_tokens_per_second for r in mine},
                        {r.prompt_tokens: r.decode_tokens_per_second for r in mine},
                        note,
                    )
                )
    return rows


def _weights(label: str) -> str:
    return {"f32": "fp32", "f16": "fp16", "q8_0": "int8"}[label]


_last_progress = [""]


def _progress_log(label: str, done: int, total: int) -> None:
    if label != _last_progress[0]:
        _last_progress[0] = label
        log(f"  {label} ({done}/{total})")


# --- llama.cpp ----------------------------------------------------------------------------------


def llama_tree() -> Path:
    """llama.cpp's source from the llama-cpp-python sdist (downloaded once)."""
    found = sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    sdist = CACHE / "sdist"
    log("downloading the llama-cpp-python sdist (it vendors llama.cpp)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "llama-cpp-python",
            "-d",
            str(sdist),
        ],
        check=True,
    )
    (archive,) = sorted(sdist.glob("llama_cpp_python-*.tar.gz"))[-1:]
    subprocess.run(["tar", "xzf", str(archive), "-C", str(CACHE)], check=True)
    return sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def build_llama(tree: Path) -> Path:
    """Build llama-bench and llama-perplexity (cached); returns the bin directory."""
    build = CACHE / "build"
    bin_dir = build / "bin"
    if all((bin_dir / t).is_file() for t in LLAMA_TARGETS):
        return bin_dir
    log("building llama.cpp (llama-bench, llama-perplexity): minutes on a small CPU")
    subprocess.run(
        ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    jobs = str(os.cpu_count() or 1)
    subprocess.run(["cmake", "--build", str(build), "--target", *LLAMA_TARGETS, "-j", jobs], check=True)
    return bin_dir


def to_gguf(tree: Path, ckpt: Path, outtype: str) -> Path:
    """The checkpoint converted with llama.cpp's own converter (cached)."""
    out = CACHE / f"gpt2-124m-random-{outtype}.gguf"
    if out.is_file():
        return out
    log(f"converting to GGUF {outtype}")
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    subprocess.run(
        [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", outtype, "--outfile", str(out)],
        check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return out


def run_llama(bin_dir: Path, gguf: Path, args: argparse.Namespace) -> dict[str, float]:
    """llama-bench's mean tokens/s: {"pp16": .., "pp512": .., "tg": ..}."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", ",".join(map(str, PROMPTS)),
           "-n", str(args.new_tokens), "-t", str(args.threads), "-r", str(args.repeats), "-o", "json"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    figures = {}
    for test in json.loads(out):
        key = f"pp{test['n_prompt']}" if test["n_gen"] == 0 else "tg"
        figures[key] = float(test["avg_ts"])
    return figures


def run_llama_cpp(ckpt: Path, args: argparse.Namespace) -> tuple[list[Row], str]:
    if args.no_llama:
        return [], "llama.cpp skipped (--no-llama)"
    try:
        tree = llama_tree()
        bin_dir = build_llama(tree)
    except (subprocess.CalledProcessError, OSError, ValueError) as exc:
        return [], f"llama.cpp unavailable: {exc}"
    rows = []
    for _, _, outtype in VARIANTS:
        log(f"llama-bench {outtype}")
        figures = run_llama(bin_dir, to_gguf(tree, ckpt, outtype), args)
        prefill = {p: figures[f"pp{p}"] for p in PROMPTS if f"pp{p}" in figures}
        rows.append(
            Row("llama.cpp", outtype, 1, prefill, {16: figures["tg"]}, "decode from an empty context")
        )
    return rows, f"llama.cpp from llama-cpp-python {tree.parent.parent.name.split('-')[-1]} (vendored source)"


# --- the table ----------------------------------------------------------------------------------


def _find(rows: list[Row], engine: str, weights: str, batch: int) -> Row | None:
    return next((r for r in rows if (r.engine, r.weights, r.batch) == (engine, weights, batch)), None)


LLAMA_OF = {"fp32": "f32", "fp16": "f16", "int8": "q8_0"}


def markdown(rows: list[Row]) -> str:
    head = (
        "| engine | weights | batch | prefill 16 tok/s | prefill 512 tok/s | decode tok/s (after 16) | "
        "decode tok/s (after 512) | decode × transformers fp32 | decode × llama.cpp | prefill 512 × transformers | "
        "prefill 512 × llama.cpp | note |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        tf = _find(rows, "transformers", "fp32", r.batch)
        ll = _find(rows, "llama.cpp", LLAMA_OF.get(r.weights, r.weights), 1) if r.batch == 1 else None
        cells = [
            r.engine,
            r.weights,
            str(r.batch),
            _num(r.prefill.get(16)),
            _num(r.prefill.get(512)),
            _num(r.decode.get(16)),
            _num(r.decode.get(512)),
            _ratio(r.decode.get(16), tf.decode.get(16) if tf and r is not tf else None),
            _ratio(r.decode.get(16), ll.decode.get(16) if ll and r.engine != "llama.cpp" else None),
            _ratio(r.prefill.get(512), tf.prefill.get(512) if tf and r is not tf else None),
            _ratio(r.prefill.get(512), ll.prefill.get(512) if ll and r.engine != "llama.cpp" else None),
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}×"


def machine(threads: int, llama_note: str) -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (
        f"{cpu} ({simd}), {os.cpu_count()} cores visible, {threads} threads; {platform.system()} "
        f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {tf}; {llama_note}; {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def _cached_part(part: str, args: argparse.Namespace, compute) -> tuple[list[Row], str]:
    """Run one part (python engines, or llama.cpp), or with --reuse load its last results."""
    path = CACHE / f"results-{part}.json"
    if part in args.reuse and path.is_file():
        saved = json.loads(path.read_text())
        rows = [
            Row(**{**r, "prefill": _int_keys(r["prefill"]), "decode": _int_keys(r["decode"])})
            for r in saved["rows"]
        ]
        return rows, saved["note"] + f" (measured {saved['when']})"
    rows, note = compute()
    when = f"{dt.datetime.now(dt.timezone.utc):%H:%M} UTC"
    path.write_text(json.dumps({"rows": [asdict(r) for r in rows], "note": note, "when": when}))
    return rows, note


def _int_keys(d: dict[str, float]) -> dict[int, float]:
    return {int(k): v for k, v in d.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--skip", action="append", default=[], help="f16-512 (weights-prompt) or f16-b8 (weights-batch)"
    )
    parser.add_argument("--reuse", action="append", default=[], choices=["python", "llama"],
                        help="take this part's results from its last run instead of running it")  # fmt: skip
    parser.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    ckpt = make_124m()
    python_rows = _cached_part("python", args, lambda: (run_python_engines(ckpt, args), ""))[0]
    llama_rows, llama_note = _cached_part("llama", args, lambda: run_llama_cpp(ckpt, args))
    rows = python_rows + llama_rows
    notes = [
        "Medians; ratios > 1 mean faster than the engine named. Random 124M gpt2-shaped weights, random prompt ids, "
        f"greedy, EOS ignored, {args.new_tokens} new tokens, {args.repeats} repeats.",
        "Batch 8 = 8 sequences continuing one prompt (gpt2cli prefills it once; transformers runs 8 rows); "
        "prefill tok/s counts the prompt once. Decode tok/s counts all rows.",
        "Scoring throughput: `gpt2 score` does not exist on this branch yet; not measured.",
    ]
    text = "\n".join([f"Machine: {machine(args.threads, llama_note)}", "", markdown(rows), "", *notes]) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
