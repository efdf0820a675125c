"""Benchmarking the engine: timed generation runs over random token ids, and their statistics.

The workload of one configuration (P prompt tokens, N new tokens, batch B) is B sequences that
continue one random prompt of P tokens, greedily, N tokens each, EOS ignored: the shape of
``gpt2 generate --num-samples B``. The engine is driven with token ids (no tokenizer in the
timing); a warm-up run precedes the timed repeats, and the device is synchronised before
every clock read. ``--compare transformers`` runs the same workload through
``GPT2LMHeadModel.generate`` in this process, timed at the same points (after the prefill's
forward pass, then after every decode step).

Definitions (both engines):
- prefill seconds: start of the request to the first logits (prompt forward pass done);
- prefill tokens/s: P / prefill seconds (the prompt, counted once: gpt2cli prefills once and
  shares the cache between the B rows, transformers runs all B rows through the prefill);
- time to first token: start to the first token chosen;
- decode tokens/s: B x (N - 1) / time from the first token to the last;
- per-token latency: the times between consecutive steps (p50, p90);
- bytes read per step: every weight and buffer of the model once, the position table excepted
  (one row of it is read); achieved bandwidth = bytes per step x decode steps/s, i.e. for
  batch 1 bytes per token x decode tokens/s.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gpt2cli.config import check_seed, random_seed
from gpt2cli.device import configure_threads, peak_memory_bytes, synchronize
from gpt2cli.errors import BadInputError, MissingExtraError

COMPARE_WITH = ("transformers",)
WARMUP_NEW_TOKENS = 16  # new tokens per warm-up run (same prompt and batch shapes)

Progress = Callable[[str, int, int], None]
"""Progress callback: (what is running, runs done, runs in total)."""


@dataclass(frozen=True)
class BenchSpec:
    """What to benchmark: one model and every combination of prompt lengths and batch sizes."""

    model: str = "gpt2"
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    prompt_tokens: tuple[int, ...] = (512,)
    new_tokens: int = 128
    batch_sizes: tuple[int, ...] = (1,)
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    seed: int = 0
    offline: bool = False
    draft_model: str | None = None  # speculative decoding: measured beside plain decoding
    draft_tokens: int = 4
    compile: bool = False  # decode through the compiled step (``--compile``)

    def validate(self) -> BenchSpec:
        """Check the numbers before anything is loaded; returns self (a copy when -1 drew a seed).

        Raises:
            BadInputError: an empty list, or a count that is zero or negative.
        """
        _positive_list("prompt-tokens", self.prompt_tokens)
        _positive_list("batch-size", self.batch_sizes)
        if self.new_tokens < 2:
            raise BadInputError(
                f"--max-new-tokens must be at least 2, got {self.new_tokens}",
                hint="decoding is timed between the first and the last new token",
            )
        if check_seed(self.seed, "--seed") is None:  # the rule generate has: -1 draws a seed
            return replace(self, seed=random_seed()).validate()
        if self.repeats < 1:
            raise BadInputError(f"repeats must be at least 1, got {self.repeats}")
        if self.warmup < 0:
            raise BadInputError(f"warmup must be 0 or more, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise BadInputError(f"threads must be at least 1, got {self.threads}")
        if self.draft_model is not None and self.batch_sizes != (1,):
            raise BadInputError(
                "speculative decoding runs one sequence", hint="use --batch-size 1 with --draft-model"
            )
        if self.draft_tokens < 1:
            raise BadInputError(f"draft-tokens must be at least 1, got {self.draft_tokens}")
        return self

    def workloads(self) -> list[tuple[int, int]]:
        """Every (prompt tokens, batch size) combination, in sweep order."""
        return [(p, b) for p in self.prompt_tokens for b in self.batch_sizes]

    def check_window(self, window: int) -> None:
        """Raises BadInputError when a prompt plus the new tokens does not fit the window."""
        longest = max(self.prompt_tokens) + (self.draft_tokens if self.draft_model else 0)
        if longest + self.new_tokens > window:
            raise BadInputError(
                f"prompt-tokens {longest} + max-new-tokens {self.new_tokens} exceed the model's "
                f"{window}-token window",
                hint=f"keep prompt-tokens + max-new-tokens <= {window}",
            )


def _positive_list(name: str, values: Iterable[int]) -> None:
    values = tuple(values)
    if not values:
        raise BadInputError(f"{name} needs at least one value", hint="e.g. 128 or a comma list 128,512")
    for v in values:
        if v < 1:
            raise BadInputError(f"{name} values must be at least 1, got {v}")


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    """``"128,512"`` -> (128, 512).

    Raises:
        BadInputError: empty, or an item that is not an integer.
    """
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise BadInputError(f"{name} needs at least one value", hint="e.g. 128 or a comma list 128,512")
    values = []
    for item in items:
        try:
            values.append(int(item))
        except ValueError:
            raise BadInputError(f"{name}: {item!r} is not a whole number", hint="e.g. 128,512") from None
    _positive_list(name, values)
    return tuple(values)


@dataclass
class Spread:
    """Median and range of one figure over the repeats."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class BenchResult:
    """The figures of one engine on one configuration (medians over the repeats, plus spreads)."""

    engine: str
    model: str
    device: str
    dtype: str
    quantization: str
    torch_version: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    batch_size: int
    repeats: int
    seed: int  # of the random prompts: the same seed times the same prompts again
    load_seconds: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    time_to_first_token_s: float
    token_latency_p50_s: float
    token_latency_p90_s: float
    peak_memory_bytes: int
    weight_bytes_per_step: int
    bandwidth_bytes_per_second: float
    spread: dict[str, Spread] = field(default_factory=dict)
    acceptance_rate: float | None = None  # speculative decoding: draft tokens kept / proposed

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: flat figures, with ``spread`` holding {median, min, max} per figure."""
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """One CSV row: the figures plus ``<figure>_min`` / ``<figure>_max`` columns."""
        row = {k: v for k, v in asdict(self).items() if k != "spread"}
        for name, s in self.spread.items():
            row[f"{name}_min"] = s.min
            row[f"{name}_max"] = s.max
        return row


RATIO_FIGURES = ("prefill_tokens_per_second", "decode_tokens_per_second", "time_to_first_token_s")


@dataclass
class Comparison:
    """Ours beside theirs on one configuration; ratio > 1 means gpt2cli is faster."""

    prompt_tokens: int
    batch_size: int
    ours: BenchResult
    theirs: BenchResult
    ratio: dict[str, float]

    @classmethod
    def of(cls, ours: BenchResult, theirs: BenchResult) -> Comparison:
        a, b = ours, theirs
        ratio = {
            "prefill_tokens_per_second": _div(a.prefill_tokens_per_second, b.prefill_tokens_per_second),
            "decode_tokens_per_second": _div(a.decode_tokens_per_second, b.decode_tokens_per_second),
            # a time: theirs / ours, so that > 1 still means we are faster
            "time_to_first_token_s": _div(theirs.time_to_first_token_s, ours.time_to_first_token_s),
        }
        return cls(ours.prompt_tokens, ours.batch_size, ours, theirs, ratio)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "batch_size": self.batch_size,
            "against": self.theirs.engine,
            "ratio": self.ratio,
        }


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


@dataclass
class BenchReport:
    """Every result of a run, and the comparisons when another engine ran too."""

    results: list[BenchResult]
    comparisons: list[Comparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"results": [r.to_dict() for r in self.results]}
        if self.comparisons:
            out["comparisons"] = [c.to_dict() for c in self.comparisons]
        return out


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``run``: ``report`` holds the configurations that finished before it, out
    of ``configurations`` (every workload of every engine the run would have timed)."""

    def __init__(self, report: BenchReport, configurations: int) -> None:
        super().__init__()
        self.report, self.configurations = report, configurations


@dataclass
class _Run:
    """Clock readings of one timed request (seconds from its start)."""

    prefill_seconds: float
    step_times: list[float]  # after each step's token was chosen; [0] is the first token
    acceptance_rate: float | None = None


class _Timer:
    """Turns the runs of one configuration into a BenchResult."""

    def __init__(self, prompt_tokens: int, batch: int) -> None:
        self.prompt_tokens, self.batch = prompt_tokens, batch
        self.runs: list[_Run] = []

    def figures(self) -> dict[str, Spread]:
        prefill = [self.prompt_tokens / r.prefill_seconds for r in self.runs]
        ttft = [r.step_times[0] for r in self.runs]
        decode = [
            self.batch * (len(r.step_times) - 1) / (r.step_times[-1] - r.step_times[0]) for r in self.runs
        ]
        gaps = [[b - a for a, b in zip(r.step_times, r.step_times[1:], strict=False)] for r in self.runs]
        return {
            "prefill_tokens_per_second": Spread.of(prefill),
            "decode_tokens_per_second": Spread.of(decode),
            "time_to_first_token_s": Spread.of(ttft),
            "token_latency_p50_s": Spread.of([_percentile(g, 50) for g in gaps]),
            "token_latency_p90_s": Spread.of([_percentile(g, 90) for g in gaps]),
        }


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# --- memory -------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or on Linux the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the peak RSS (Linux >= 4.0); elsewhere the peak stays process-wide
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last reset: allocator peak on CUDA, peak RSS (VmHWM) on CPU."""
    if device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return peak_memory_bytes(device)


def weight_bytes_per_step(model: torch.nn.Module, position_table: str) -> int:
    """Bytes of weights one decode step reads: all parameters and buffers once, shared storage
    counted once, the position table ``position_table`` (one row read per step) left out."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        if name == position_table or t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


# --- the engines --------------------------------------------------------------------------


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    """``n`` uniformly random token ids (speed does not depend on the values)."""
    gen = torch.Generator().manual_seed(seed % 2**64)  # seeds near 2**64 - 1 plus an offset wrap
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


@dataclass
class _Subject:
    """An engine loaded and ready: how to run one request, and what to label its results."""

    engine: str
    run_once: Callable[[list[int], int, int], _Run]
    device: torch.device
    dtype: torch.dtype
    quantization: str
    load_seconds: float
    weight_bytes: int
    vocab: int


def _time_engine(engine: Any, request: Any, device: torch.device) -> _Run:
    """Step ``engine`` until ``request`` ends, reading the clock after each of sample 0's tokens."""
    times: list[float] = []
    first = request.sequences[0]
    synchronize(device)
    t0 = time.perf_counter()
    while not request.done:
        tokens = sum(1 for event in engine.step() if event.seq is first)
        synchronize(device)
        times.extend([time.perf_counter() - t0] * tokens)
    engine.release()
    return _Run(request.stats.prefill_seconds, times, request.stats.acceptance_rate)


def _ours(lm: Any, spec: BenchSpec, draft: Any = None) -> Callable[[list[int], int, int], _Run]:
    """How to time one request on our engine: a fresh engine each run (no prefix reuse)."""
    from gpt2cli.config import GenerationConfig
    from gpt2cli.engine import Request

    def run_once(ids: list[int], batch: int, new_tokens: int) -> _Run:
        cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, num_samples=batch, ignore_eos=True)
        engine = lm._engine(ids, cfg, None, draft, spec.draft_tokens)
        request = engine.submit(Request(ids, cfg, lm.tokenizer.eot_id))
        return _time_engine(engine, request, lm.device)

    return run_once


def _load_ours(spec: BenchSpec) -> tuple[Any, _Subject]:
    from gpt2cli.api import load

    t0 = time.perf_counter()
    lm = load(
        spec.model,
        device=spec.device,
        dtype=spec.dtype,
        offline=spec.offline,
        quantize=spec.quantize,
        compile=spec.compile,
    )
    synchronize(lm.device)
    load_seconds = time.perf_counter() - t0
    spec.check_window(lm.window)
    subject = _Subject(
        engine="gpt2cli" + (" (compiled)" if spec.compile else ""),
        run_once=_ours(lm, spec),
        device=lm.device,
        dtype=lm.dtype,
        quantization=spec.quantize or "none",
        load_seconds=load_seconds,
        weight_bytes=weight_bytes_per_step(lm.model, "wpe.weight"),
        vocab=lm.config.vocab_size,
    )
    return lm, subject


def _speculative_subject(lm: Any, spec: BenchSpec) -> _Subject:
    """Our engine decoding with a draft model (speculative), on the same loaded target."""
    from gpt2cli.api import load
    from gpt2cli.config import GenerationConfig

    assert spec.draft_model is not None
    draft = load(
        spec.draft_model, device=spec.device, dtype=spec.dtype, offline=spec.offline, compile=spec.compile
    )
    lm._can_speculate(draft, [0], GenerationConfig(max_new_tokens=spec.new_tokens), spec.draft_tokens, None)
    return _Subject(
        engine=f"gpt2cli+draft:{draft.name}",
        run_once=_ours(lm, spec, draft),
        device=lm.device,
        dtype=lm.dtype,
        quantization=spec.quantize or "none",
        load_seconds=0.0,
        weight_bytes=weight_bytes_per_step(lm.model, "wpe.weight"),
        vocab=lm.config.vocab_size,
    )


def _load_transformers(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, _Subject]:
    try:
        import transformers
    except ImportError:
        raise MissingExtraError(
            "--compare transformers needs the transformers package, which is not installed",
            hint="pip install transformers",
        ) from None
    transformers.logging.set_verbosity_error()  # its load report and progress bars are noise here
    transformers.logging.disable_progress_bar()
    t0 = time.perf_counter()
    model = _from_pretrained(transformers.GPT2LMHeadModel, path, dtype).to(device).eval()
    synchronize(device)
    load_seconds = time.perf_counter() - t0

    def run_once(ids: list[int], batch: int, new_tokens: int) -> _Run:
        stamps: list[float] = []

        def stamp(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            synchronize(device)  # called once per step, right after that step's forward pass
            stamps.append(time.perf_counter() - t0)
            return scores

        input_ids = torch.tensor([ids] * batch, device=device)
        config = transformers.GenerationConfig(
            max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                logits_processor=transformers.LogitsProcessorList([stamp]),
            )
        if out.shape[1] != len(ids) + new_tokens:
            raise RuntimeError(f"transformers stopped after {out.shape[1] - len(ids)} tokens")
        # stamp k is taken after step k's forward pass, just before its argmax picks token k
        return _Run(stamps[0], stamps)

    n_params = weight_bytes_per_step(model, "transformer.wpe.weight")
    subject = _Subject(
        engine="transformers",
        run_once=run_once,
        device=device,
        dtype=dtype,
        quantization="none",
        load_seconds=load_seconds,
        weight_bytes=n_params,
        vocab=model.config.vocab_size,
    )
    return model, subject


def _from_pretrained(cls: Any, path: Path, dtype: torch.dtype) -> Any:
    try:
        return cls.from_pretrained(str(path), dtype=dtype)  # transformers >= 4.56
    except TypeError:
        return cls.from_pretrained(str(path), torch_dtype=dtype)


def _measure(
    subject: _Subject,
    spec: BenchSpec,
    model_name: str,
    progress: Progress | None,
    done: list[int],
    total: int,
) -> Iterator[BenchResult]:
    """Warm up and time every configuration of ``spec`` on ``subject``."""
    threads = torch.get_num_threads()
    for i, (prompt_tokens, batch) in enumerate(spec.workloads()):
        label = f"{subject.engine}: prompt {prompt_tokens}, batch {batch}"
        timer = _Timer(prompt_tokens, batch)
        for w in range(spec.warmup):  # same shapes, fewer new tokens: kernels and JITs warm up
            warm_ids = random_prompt(prompt_tokens, subject.vocab, spec.seed + 1000 + w)
            subject.run_once(warm_ids, batch, min(spec.new_tokens, WARMUP_NEW_TOKENS))
        reset_peak_memory(subject.device)
        for r in range(spec.repeats):
            if progress:
                progress(label, done[0], total)
            ids = random_prompt(prompt_tokens, subject.vocab, spec.seed + 100 * i + r)
            timer.runs.append(subject.run_once(ids, batch, spec.new_tokens))
            done[0] += 1
        figures = timer.figures()
        decode = figures["decode_tokens_per_second"].median
        accepted = [r.acceptance_rate for r in timer.runs if r.acceptance_rate is not None]
        yield BenchResult(
            engine=subject.engine,
            model=model_name,
            device=str(subject.device),
            dtype=str(subject.dtype).removeprefix("torch."),
            quantization=subject.quantization,
            torch_version=torch.__version__,
            threads=threads,
            prompt_tokens=prompt_tokens,
            new_tokens=spec.new_tokens,
            batch_size=batch,
            repeats=spec.repeats,
            seed=spec.seed,
            load_seconds=subject.load_seconds,
            prefill_tokens_per_second=figures["prefill_tokens_per_second"].median,
            decode_tokens_per_second=decode,
            time_to_first_token_s=figures["time_to_first_token_s"].median,
            token_latency_p50_s=figures["token_latency_p50_s"].median,
            token_latency_p90_s=figures["token_latency_p90_s"].median,
            peak_memory_bytes=peak_memory(subject.device),
            weight_bytes_per_step=subject.weight_bytes,
            bandwidth_bytes_per_second=subject.weight_bytes * decode / batch,
            spread=figures,
            acceptance_rate=statistics.median(accepted) if accepted else None,
        )
    if progress:
        progress(f"{subject.engine}: done", done[0], total)


def run(
    spec: BenchSpec,
    *,
    compare: str | None = None,
    compare_dtype: str | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Benchmark gpt2cli on every configuration of ``spec``, then optionally transformers.

    The engines run one after the other (ours is freed first), so each peak-memory figure
    holds one model. ``compare_dtype`` runs transformers in another dtype (default: ours).

    Raises:
        BadInputError: a bad value, or prompt + new tokens past the model's window.
        MissingExtraError: ``compare="transformers"`` without transformers installed.
        Gpt2Error: loading the model failed (any of its kinds).
        BenchInterrupted: Ctrl-C; its ``report`` holds the configurations finished before it.
    """
    spec = spec.validate()
    if compare is not None and compare not in COMPARE_WITH:
        raise BadInputError(f"cannot compare with {compare!r}", hint="use --compare transformers")
    if compare is not None:
        _check_transformers()
    configure_threads(spec.threads)
    if compare is not None and spec.draft_model is not None:
        raise BadInputError("--draft-model is measured against plain decoding: drop --compare")
    engines = 2 if compare or spec.draft_model else 1
    total = len(spec.workloads()) * spec.repeats * engines
    ours: list[BenchResult] = []
    others: list[BenchResult] = []  # the draft-model or transformers runs, in the same order
    try:
        _run_engines(spec, compare, compare_dtype, progress, total, ours, others)
    except KeyboardInterrupt as exc:
        raise BenchInterrupted(_report(ours, others, spec), len(spec.workloads()) * engines) from exc
    return _report(ours, others, spec)


def _report(ours: list[BenchResult], others: list[BenchResult], spec: BenchSpec) -> BenchReport:
    """Every result, and a comparison per configuration both engines finished."""
    pairs = zip(ours, others, strict=False)  # strict=False: Ctrl-C may have cut ``others`` short
    if spec.draft_model is not None:  # the speculative run against plain decoding
        return BenchReport(ours + others, [Comparison.of(b, a) for a, b in pairs])
    return BenchReport(ours + others, [Comparison.of(a, b) for a, b in pairs])


def _run_engines(
    spec: BenchSpec,
    compare: str | None,
    compare_dtype: str | None,
    progress: Progress | None,
    total: int,
    ours: list[BenchResult],
    others: list[BenchResult],
) -> None:
    """Load and time our engine, then the draft-model or transformers run: results appended as
    each configuration finishes (so that Ctrl-C keeps them)."""
    done = [0]
    if progress:
        progress("gpt2cli: loading", 0, total)
    lm, ours_subject = _load_ours(spec)
    path, device = lm.resolved.path, lm.device
    ours.extend(_measure(ours_subject, spec, lm.name, progress, done, total))
    if spec.draft_model is not None:
        others.extend(_measure(_speculative_subject(lm, spec), spec, lm.name, progress, done, total))
        return
    del lm, ours_subject
    gc.collect()
    if compare is None:
        return
    if progress:
        progress("transformers: loading", done[0], total)
    from gpt2cli.device import pick_dtype

    dtype = pick_dtype(compare_dtype or ours[0].dtype, device)
    model, theirs_subject = _load_transformers(path, device, dtype)
    same = replace(spec, quantize=None)
    others.extend(_measure(theirs_subject, same, ours[0].model, progress, done, total))
    del model, theirs_subject
    gc.collect()


def _check_transformers() -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise MissingExtraError(
            "--compare transformers needs the transformers package, which is not installed",
            hint="pip install transformers",
        )
