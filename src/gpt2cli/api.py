"""The library API the CLI itself uses: ``load`` a model, then stream, generate or complete.

Layers, as in mlx-lm: ``LM.stream`` yields text pieces then one ``GenerationResult``;
``LM.generate`` yields the text of one sample; ``LM.complete`` returns the finished result.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from gpt2cli.config import GenerationConfig, GPT2Config
from gpt2cli.device import make_generator, pick_device, pick_dtype
from gpt2cli.engine import Engine, EngineStats
from gpt2cli.errors import BadInputError, CorruptWeightsError, NotGPT2Error
from gpt2cli.hub import ResolvedModel, resolve
from gpt2cli.model import GPT2
from gpt2cli.stopping import StopMatcher
from gpt2cli.tokenizer import StreamDecoder, Tokenizer
from gpt2cli.weights import normalize_state_dict, read_state_dict, weight_files

if TYPE_CHECKING:
    from gpt2cli.scoring import ScoreResult, TokenScore

Warn = Callable[[str], None]


@dataclass
class TextPiece:
    """A piece of newly generated text of sample ``sample``."""

    sample: int
    text: str


@dataclass
class SampleResult:
    text: str
    tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list, repr=False)


@dataclass
class GenerationResult:
    """Everything about one finished generation request."""

    model: str
    prompt_tokens: int
    samples: list[SampleResult]
    seconds: float
    tokens_per_second: float
    time_to_first_token: float
    prompt_tokens_per_second: float
    prompt_truncated: int = 0
    stats: EngineStats = field(default_factory=EngineStats, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The ``--format json`` object."""
        return {
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "samples": [
                {"text": s.text, "tokens": s.tokens, "finish_reason": s.finish_reason} for s in self.samples
            ],
            "seconds": round(self.seconds, 6),
            "tokens_per_second": round(self.tokens_per_second, 3),
        }

    def stats_dict(self) -> dict[str, Any]:
        return asdict(self.stats)


class LM:
    """A loaded GPT-2: model, tokenizer and engine on one device."""

    def __init__(self, model: GPT2, tokenizer: Tokenizer, resolved: ResolvedModel) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.resolved = resolved
        self.engine = Engine(model)

    @property
    def name(self) -> str:
        return self.resolved.name

    @property
    def config(self) -> GPT2Config:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' float dtype (float32 for an int8 model, whose activations are float32)."""
        stored = self.model.wte.weight.dtype
        return stored if stored.is_floating_point else self.model.compute_dtype

    @property
    def window(self) -> int:
        return self.config.n_positions

    def encode(self, text: str) -> list[int]:
        """Text to ids; a literal ``<|endoftext|>`` is the special token, as in transformers."""
        return self.tokenizer.encode(text, allow_special=True)

    def prepare_prompt(self, prompt: str | list[int], warn: Warn | None = None) -> tuple[list[int], int]:
        """Prompt ids, keeping the most recent ``window`` tokens; returns (ids, dropped)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            ids = [self.tokenizer.eot_id]  # an empty prompt generates unconditionally
        dropped = max(0, len(ids) - self.window)
        if dropped:
            ids = ids[dropped:]
            if warn:
                warn(
                    f"prompt is {len(ids) + dropped} tokens, longer than the {self.window}-token "
                    f"window: kept the last {self.window}"
                )
        return ids, dropped

    def stream(
        self,
        prompt: str | list[int],
        cfg: GenerationConfig | None = None,
        *,
        warn: Warn | None = None,
        draft: LM | None = None,
        draft_tokens: int = 4,
    ) -> Iterator[TextPiece | GenerationResult]:
        """Generate, yielding ``TextPiece``s as text completes, then one ``GenerationResult``.

        ``draft``: a smaller model with the same vocabulary for speculative decoding
        (``draft_tokens`` proposals per step); one sample only. Greedy output is identical to
        this model's alone; sampled output follows this model's distribution.
        """
        cfg = (cfg or GenerationConfig()).validate()
        ids, dropped = self.prepare_prompt(prompt, warn)
        eot = self.tokenizer.eot_id
        generator = make_generator(cfg.seed, self.device)
        tokens: Any
        if draft is not None and self._can_speculate(draft, ids, cfg, draft_tokens, warn):
            from gpt2cli.speculative import SpeculativeStream

            # The same LM as its own draft needs a second cache: a second engine.
            draft_engine = draft.engine if draft.engine is not self.engine else Engine(draft.model)
            tokens = SpeculativeStream(
                self.engine, draft_engine, ids, cfg, eot, k=draft_tokens, generator=generator
            )
        else:
            tokens = self.engine.generate(ids, cfg, eos_id=eot, generator=generator)
        run = _SampleTexts(self.tokenizer, cfg)
        t0 = time.perf_counter()
        ttft: float | None = None
        for step in tokens:
            if ttft is None:
                ttft = time.perf_counter() - t0
            for sample, token in enumerate(step):
                if token is None:
                    continue
                text, stopped = run.push(sample, token, is_eos=token == eot and not cfg.ignore_eos)
                if text:
                    yield TextPiece(sample, text)
                if stopped:
                    tokens.stop(sample, "stop")
        for sample, text in run.flush():
            yield TextPiece(sample, text)
        seconds = time.perf_counter() - t0
        yield self._result(ids, dropped, run, tokens.finish_reasons, tokens.stats, seconds, ttft)

    def _can_speculate(
        self, draft: LM, ids: list[int], cfg: GenerationConfig, k: int, warn: Warn | None
    ) -> bool:
        """Check a draft model fits; False (plain decoding) when the request cannot use it.

        Raises:
            BadInputError: a draft with another vocabulary or device, or several samples.
        """
        same_vocab = draft.tokenizer.n_vocab == self.tokenizer.n_vocab
        if draft.config.vocab_size != self.config.vocab_size or not same_vocab:
            raise BadInputError(
                f"draft model {draft.name} has another vocabulary than {self.name}",
                hint="use a GPT-2 family model as the draft (e.g. distilgpt2)",
            )
        if draft.device != self.device:
            raise BadInputError("the draft model must be on the same device as the target")
        if cfg.num_samples != 1:
            raise BadInputError("speculative decoding generates one sample", hint="drop --num-samples")
        needed = len(ids) + cfg.max_new_tokens + k + 1
        if needed > min(self.window, draft.window) or k < 1:
            if warn:
                warn("prompt + new tokens exceed the window: decoding without the draft model")
            return False
        return True

    def _result(
        self,
        ids: list[int],
        dropped: int,
        run: _SampleTexts,
        reasons: list[str | None],
        stats: EngineStats,
        seconds: float,
        ttft: float | None,
    ) -> GenerationResult:
        samples = [
            SampleResult(run.texts[i], len(run.ids[i]), reasons[i] or "length", run.ids[i])
            for i in range(len(run.texts))
        ]
        generated = sum(s.tokens for s in samples)
        return GenerationResult(
            model=self.name,
            prompt_tokens=len(ids),
            samples=samples,
            seconds=seconds,
            tokens_per_second=generated / stats.decode_seconds if stats.decode_seconds > 0 else 0.0,
            time_to_first_token=ttft or 0.0,
            prompt_tokens_per_second=(
                stats.prefill_tokens / stats.prefill_seconds if stats.prefill_seconds > 0 else 0.0
            ),
            prompt_truncated=dropped,
            stats=stats,
        )

    def generate(self, prompt: str | list[int], **options: Any) -> Iterator[str]:
        """Yield the text of one sample as it is generated (options as in GenerationConfig)."""
        for event in self.stream(prompt, GenerationConfig(**options)):
            if isinstance(event, TextPiece):
                yield event.text

    def complete(self, prompt: str | list[int], **options: Any) -> GenerationResult:
        """Generate to the end and return the result (options as in GenerationConfig)."""
        result = None
        for event in self.stream(prompt, GenerationConfig(**options)):
            if isinstance(event, GenerationResult):
                result = event
        assert result is not None
        return result

    def score(
        self,
        source: str | bytes | os.PathLike[str] | IO[bytes],
        *,
        context: int | None = None,
        stride: int | None = None,
        batch_size: int = 8,
        errors: str = "strict",
        per_token: bool = False,
        top: int = 0,
        name: str | None = None,
        on_token: Callable[[TokenScore], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ScoreResult:
        """Score text (``str``), UTF-8 ``bytes``, a file path or a binary stream (see ``scoring``).

        ``context`` defaults to the model's window and ``stride`` to half the context.

        Raises:
            BadInputError: bad window settings; ScoreInputError for unreadable or empty input.
        """
        from gpt2cli.scoring import Scorer

        context = self.window if context is None else context
        stride = max(1, context // 2) if stride is None else stride
        scorer = Scorer(self.model, self.tokenizer, context=context, stride=stride, batch_size=batch_size)
        if isinstance(source, str):
            source, name = io.BytesIO(source.encode("utf-8", "surrogatepass")), name or "<text>"
        elif isinstance(source, bytes):
            source, name = io.BytesIO(source), name or "<bytes>"
        return scorer.score(
            source,
            name=name,
            errors=errors,
            per_token=per_token,
            top=top,
            on_token=on_token,
            progress=progress,
        )


class _SampleTexts:
    """Per-sample streaming decoders and stop matchers."""

    def __init__(self, tokenizer: Tokenizer, cfg: GenerationConfig) -> None:
        n = cfg.num_samples
        self.decoders = [StreamDecoder(tokenizer) for _ in range(n)]
        self.matchers = [StopMatcher(cfg.stop) for _ in range(n)]
        self.texts = [""] * n
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.done = [False] * n

    def push(self, sample: int, token: int, *, is_eos: bool) -> tuple[str, bool]:
        if self.done[sample]:
            return "", False
        if is_eos:
            return self._finish(sample), False
        self.ids[sample].append(token)
        text, stopped = self.matchers[sample].push(self.decoders[sample].push(token))
        self.texts[sample] += text
        self.done[sample] = stopped
        return text, stopped

    def _finish(self, sample: int) -> str:
        text, stopped = self.matchers[sample].push(self.decoders[sample].flush())
        if not stopped:
            text += self.matchers[sample].flush()
        self.texts[sample] += text
        self.done[sample] = True
        return text

    def flush(self) -> Iterator[tuple[int, str]]:
        for sample in range(len(self.texts)):
            if not self.done[sample]:
                text = self._finish(sample)
                if text:
                    yield sample, text


def load(
    spec: str = "gpt2",
    *,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    quantize: str | None = None,
    compile: bool = False,
) -> LM:
    """Resolve ``spec`` (alias, ``org/name[@rev]`` or directory), download if needed, and load it.

    ``quantize`` ("int8") stores the linear weights and the lm_head as int8 with per-row
    scales. ``compile`` runs decode steps through ``torch.compile`` (CUDA graphs on CUDA).

    Raises:
        Gpt2Error: any of its kinds (model not found, offline miss, unsafe or corrupt weights...).
    """
    resolved = resolve(spec, offline=offline, allow_pickle=allow_pickle, progress=progress)
    return load_resolved(
        resolved, device=device, dtype=dtype, allow_pickle=allow_pickle, quantize=quantize, compile=compile
    )


def load_resolved(
    resolved: ResolvedModel,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    quantize: str | None = None,
    compile: bool = False,
) -> LM:
    """Load a model already on disk."""
    from gpt2cli import fastpath

    method = fastpath.check_quantize(quantize)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    path = resolved.path
    config = GPT2Config.from_json(path / "config.json")
    tokenizer = _load_tokenizer(path, config)
    try:
        converter = fastpath.storage_converter(torch_device, torch_dtype, method)
        raw_state = read_state_dict(weight_files(path, allow_pickle), converter)
    except CorruptWeightsError as exc:
        if resolved.spec.repo_id is not None:  # a Hub model in the cache: the cache can repair it
            exc.hint = f"re-download it: `gpt2 models verify {resolved.name} --repair`"
        raise
    model = build_model(config, raw_state)
    fastpath.place(model, torch_device, torch_dtype, method, converter)
    lm = LM(model, tokenizer, resolved)
    if compile:
        fastpath.compile_decode(lm.engine)
    return lm


def build_model(config: GPT2Config, raw_state: dict[str, torch.Tensor]) -> GPT2:
    """A GPT2 built on the meta device and given ``raw_state``'s tensors (no second copy)."""
    state = normalize_state_dict(raw_state, config, contiguous=False)
    raw_state.clear()
    for name in list(state):  # one Conv1D transpose at a time: its original is freed right after
        state[name] = state[name].contiguous()
    with torch.device("meta"):
        model = GPT2(config)
    model.requires_grad_(False)  # weights read as int8 cannot be parameters that require grad
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model


def _load_tokenizer(path: Path, config: GPT2Config) -> Tokenizer:
    if not (path / "vocab.json").is_file() or not (path / "merges.txt").is_file():
        raise NotGPT2Error(f"{path} has no vocab.json/merges.txt: GPT-2's tokenizer files are needed")
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.n_vocab > config.vocab_size:
        raise CorruptWeightsError(
            f"the tokenizer has {tokenizer.n_vocab} tokens but the model only {config.vocab_size}"
        )
    return tokenizer
