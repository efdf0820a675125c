"""The server's counters and histograms, and ``GET /metrics`` in Prometheus' text format.

Names follow the habits of vLLM and llama.cpp (``*_total`` counters, ``*_seconds``
histograms with cumulative ``le`` buckets). Written here rather than with prometheus_client:
a few counters and three histograms do not earn a dependency. The engine thread and the
event loop both record into one ``Metrics``, under its lock.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; one more for +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> Iterable[str]:
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            yield f'{name}_bucket{{le="{le}"}} {running}'
        yield f"{name}_sum {self.total!r}"
        yield f"{name}_count {self.count}"


@dataclass
class Gauges:
    """What is true now, read from the scheduler and the prompt pool when /metrics is asked."""

    waiting: int
    running: int
    active_rows: int
    active_rows_max: int
    steps: int
    batched_steps: int
    cache_tokens: int
    cache_entries: int
    cache_lookups: int
    cache_hits: int
    cache_hit_tokens: int


class Metrics:
    """Everything ``/metrics`` reports that is counted as it happens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.prefill_tokens = 0
        self.prefill_seconds = 0.0
        self.generation_tokens = 0
        self.engine_seconds = 0.0  # time the engine thread spent in steps
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def request(self, path: str, status: int | str) -> None:
        """An HTTP request has been answered (``status`` 499: the client left first)."""
        key = (_path_label(path), str(status))
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def step(self, seconds: float, tokens: int) -> None:
        with self._lock:
            self.engine_seconds += seconds
            self.generation_tokens += tokens

    def started(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def finished(self, prefill_tokens: int, prefill_seconds: float, latency: float) -> None:
        with self._lock:
            self.prefill_tokens += prefill_tokens
            self.prefill_seconds += prefill_seconds
            self.latency.observe(latency)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self._lock:
            self.per_token.observe(seconds)

    def render(self, gauges: Gauges) -> str:
        """The text exposition format (version 0.0.4)."""
        with self._lock:
            prompt_rate = self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0
            gen_rate = self.generation_tokens / self.engine_seconds if self.engine_seconds else 0.0
            singles: list[tuple[str, str, str, float]] = [
                ("queue_waiting", "gauge", "Prompts waiting for the engine.", gauges.waiting),
                ("requests_running", "gauge", "Prompts the engine is generating for.", gauges.running),
                ("active_rows", "gauge", "Sequences decoding in the engine now.", gauges.active_rows),
                ("active_rows_max", "gauge", "The most sequences decoding at once.", gauges.active_rows_max),
                ("engine_steps_total", "counter", "Engine steps run.", gauges.steps),
                (
                    "batched_steps_total",
                    "counter",
                    "Engine steps that decoded sequences of more than one request.",
                    gauges.batched_steps,
                ),
                ("prompt_tokens_total", "counter", "Prompt tokens of requests started.", self.prompt_tokens),
                (
                    "prefill_tokens_total",
                    "counter",
                    "Prompt tokens run through the model (the rest came from the prompt cache).",
                    self.prefill_tokens,
                ),
                ("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
                (
                    "prompt_tokens_per_second",
                    "gauge",
                    "Prefill throughput: prompt tokens run per second of prefill.",
                    prompt_rate,
                ),
                (
                    "generation_tokens_per_second",
                    "gauge",
                    "Generation throughput: tokens generated per second the engine was busy.",
                    gen_rate,
                ),
                ("prompt_cache_tokens", "gauge", "Tokens held by the prompt cache.", gauges.cache_tokens),
                ("prompt_cache_entries", "gauge", "Sequences the prompt cache holds.", gauges.cache_entries),
                (
                    "prompt_cache_lookups_total",
                    "counter",
                    "Requests that looked in the prompt cache.",
                    gauges.cache_lookups,
                ),
                (
                    "prompt_cache_hits_total",
                    "counter",
                    "Requests that reused at least one cached prompt token.",
                    gauges.cache_hits,
                ),
                (
                    "prompt_cache_hit_tokens_total",
                    "counter",
                    "Prompt tokens reused from the prompt cache.",
                    gauges.cache_hit_tokens,
                ),
            ]
            histograms = [
                ("time_to_first_token_seconds", "Arrival to first token.", self.ttft),
                ("time_per_output_token_seconds", "Between tokens of one sequence.", self.per_token),
                ("request_latency_seconds", "Arrival to last token.", self.latency),
            ]
            out = _family(
                "gpt2_requests_total",
                "counter",
                "HTTP requests answered, by path and status (499: the client left first).",
                (
                    f'gpt2_requests_total{{path="{path}",status="{status}"}} {n}'
                    for (path, status), n in sorted(self.requests.items())
                ),
            )
            for name, kind, text, value in singles:
                out += _family(f"gpt2_{name}", kind, text, [f"gpt2_{name} {_number(value)}"])
            for name, text, histogram in histograms:
                out += _family(f"gpt2_{name}", "histogram", text, histogram.lines(f"gpt2_{name}"))
            return "\n".join(out) + "\n"


def _family(name: str, kind: str, help: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", *samples]


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _path_label(path: str) -> str:
    """Known routes by name, the rest as "other" (so a scanner cannot grow the label set)."""
    if path in PATHS:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
