"""The library API the CLI itself uses: ``load`` a model, then stream, generate or complete.

Layers, as in mlx-lm: ``LM.stream`` yields text pieces then one ``GenerationResult``;
``LM.generate`` yields the text of one sample; ``LM.complete`` returns the finished result.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Any

import torch

from gpt2cli.config import GenerationConfig, GPT2Config
from gpt2cli.device import pick_device, pick_dtype
from gpt2cli.engine import Engine, EngineStats, Request
from gpt2cli.errors import BadInputError, CorruptWeightsError
from gpt2cli.hub import ResolvedModel, resolve
from gpt2cli.kvcache import PromptCache
from gpt2cli.loader import build_model, load_tokenizer
from gpt2cli.model import GPT2
from gpt2cli.text import Piece, RequestTexts
from gpt2cli.tokenizer import Tokenizer
from gpt2cli.weights import read_state_dict, weight_files

if TYPE_CHECKING:
    from gpt2cli.comparison import CompareResult, TokenDiff
    from gpt2cli.fastpath import StaticDecoder
    from gpt2cli.inspection import ActivationsFile, AttentionResult, LensResult, Spec
    from gpt2cli.scoring import ScoreInputError, Scorer, ScoreResult, TokenScore

Warn = Callable[[str], None]


TextPiece = Piece  # a piece of newly generated text of sample ``sample`` (text.Piece)


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
    seed: int | None = None  # the seed the sampling used (drawn when the request gave none)

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
            "seed": self.seed,
        }

    def stats_dict(self) -> dict[str, Any]:
        return asdict(self.stats)


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``LM.stream``: ``partial`` is the result of what was generated until then."""

    def __init__(self, partial: GenerationResult) -> None:
        super().__init__()
        self.partial = partial


class LM:
    """A loaded GPT-2: model, tokenizer and engine on one device."""

    def __init__(self, model: GPT2, tokenizer: Tokenizer, resolved: ResolvedModel) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.resolved = resolved
        self.decoder: StaticDecoder | None = None  # the compiled decode step (--compile)

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
    def precision(self) -> str:
        """How the weights are stored: "int8" when quantized, else the dtype's name."""
        if self.model.lm_head_q is not None:
            return "int8"
        return str(self.model.wte.weight.dtype).removeprefix("torch.")

    @property
    def window(self) -> int:
        return self.config.n_positions

    def encode(self, text: str) -> list[int]:
        """Text to ids; a literal ``<|endoftext|>`` is the special token, as in transformers."""
        return self.tokenizer.encode(text, allow_special=True)

    def prepare_prompt(self, prompt: str | list[int], warn: Warn | None = None) -> tuple[list[int], int]:
        """Prompt ids, keeping the most recent ``window`` tokens; returns (ids, dropped).

        Raises:
            BadInputError: a token id that is not in the vocabulary.
        """
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            ids = list(prompt)
            self.tokenizer.check_ids(ids)
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
        cache: PromptCache | None = None,
        logprobs: int | None = None,
    ) -> Iterator[TextPiece | GenerationResult]:
        """Generate, yielding ``TextPiece``s as text completes, then one ``GenerationResult``.

        Args:
            cache: the caller's ``PromptCache``: its longest prefix shared with the prompt is
                reused, and afterwards it holds the prompt and sample 0's tokens. Without
                one the stream has a cache of its own: streams never share state.
            draft: a smaller model with the same vocabulary for speculative decoding
                (``draft_tokens`` proposals per round); one sample only. Greedy output is
                identical to this model's alone; sampled output follows this model's distribution.
            logprobs: attach each token's log-probability and this many alternatives to the pieces.
        """
        cfg = (cfg or GenerationConfig()).validate().with_seed()  # a drawn seed is reported
        ids, dropped = self.prepare_prompt(prompt, warn)
        use_draft = draft is not None and self._can_speculate(draft, ids, cfg, draft_tokens, warn)
        engine = self._engine(ids, cfg, cache, draft if use_draft else None, draft_tokens)
        request = engine.submit(Request(ids, cfg, self.tokenizer.eot_id, logprobs, cache))
        texts = RequestTexts(self.tokenizer, request)
        t0 = time.perf_counter()
        ttft: float | None = None
        try:
            while not request.done:
                for event in engine.step():
                    ttft = time.perf_counter() - t0 if ttft is None else ttft
                    piece = texts.push(engine, event)
                    if piece is not None:
                        yield piece
        except KeyboardInterrupt:  # Ctrl-C: what was generated so far rides on the exception
            partial = self._result(request, texts, dropped, time.perf_counter() - t0, ttft, "interrupted")
            raise GenerationInterrupted(partial) from None
        engine.release()
        if request.error is not None:
            raise request.error
        yield from texts.close()
        yield self._result(request, texts, dropped, time.perf_counter() - t0, ttft)

    def generate_many(
        self,
        prompts: Iterable[str | list[int] | tuple[str | list[int], GenerationConfig]],
        cfg: GenerationConfig | None = None,
        *,
        max_batch: int = 8,
        warn: Warn | None = None,
    ) -> Iterator[GenerationResult]:
        """Generate for many prompts through one batch where they join and leave; results in input order.

        Each item is a prompt (with ``cfg``) or a (prompt, config) pair. At most ``max_batch``
        sequences decode at once; prompts are read lazily, a few ahead of the batch.
        """
        base = (cfg or GenerationConfig()).validate()
        engine = Engine(self.model, max_rows=max_batch, decode=self.decoder)
        source = iter(prompts)
        running: dict[int, tuple[Request, RequestTexts, int, float]] = {}
        finished: dict[int, GenerationResult] = {}
        first_token_at: dict[int, float] = {}  # id(request) -> when its first token came
        submitted = emitted = 0
        exhausted = False
        while True:
            while not exhausted and len(engine.waiting) < 2:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                text, item_cfg = item if isinstance(item, tuple) else (item, base)
                item_cfg = item_cfg.validate().with_seed()  # a drawn seed is reported
                if item_cfg.num_samples > max_batch:
                    raise BadInputError(
                        f"num-samples {item_cfg.num_samples} exceeds the batch of {max_batch}"
                    )
                ids, dropped = self.prepare_prompt(text, warn)
                request = engine.submit(Request(ids, item_cfg, self.tokenizer.eot_id))
                running[submitted] = (
                    request,
                    RequestTexts(self.tokenizer, request),
                    dropped,
                    time.perf_counter(),
                )
                submitted += 1
            if engine.idle and exhausted:
                break
            events = engine.step()
            now = time.perf_counter()
            texts_of = {id(r): t for r, t, _, _ in running.values()}
            for event in events:
                texts_of[id(event.seq.request)].push(engine, event)
                first_token_at.setdefault(id(event.seq.request), now)
            engine.release()
            for index in [i for i, (r, _, _, _) in running.items() if r.done]:
                request, texts, dropped, t0 = running.pop(index)
                if request.error is not None:
                    raise request.error
                list(texts.close())
                ttft = first_token_at.pop(id(request), t0) - t0
                finished[index] = self._result(request, texts, dropped, time.perf_counter() - t0, ttft)
            while emitted in finished:
                yield finished.pop(emitted)
                emitted += 1

    def _engine(
        self,
        ids: list[int],
        cfg: GenerationConfig,
        cache: PromptCache | None,
        draft: LM | None,
        draft_tokens: int,
    ) -> Engine:
        """A new engine for one request, working in ``cache`` itself when it has one sample."""
        n = cfg.num_samples
        capacity = len(ids) + cfg.max_new_tokens + (draft_tokens + 1 if draft is not None else 0)
        kv = None
        if cache is not None and n == 1:
            if cache.kv is None:
                cache.kv = self.model.new_cache(1, self.window if self.decoder else capacity)
            kv = cache.kv
        return Engine(
            self.model,
            max_rows=n,
            capacity=capacity,
            kv=kv,
            decode=self.decoder,
            draft=draft.model if draft is not None else None,
            draft_tokens=draft_tokens,
            draft_decode=draft.decoder if draft is not None else None,
        )

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
        if k < 1:
            raise BadInputError(f"draft tokens must be at least 1, got {k}")
        if len(ids) + k + 1 > draft.window:
            if warn:
                warn(
                    f"the prompt does not fit the draft model's {draft.window}-token window: "
                    "decoding without it"
                )
            return False
        return True

    def _result(
        self,
        request: Request,
        texts: RequestTexts,
        dropped: int,
        seconds: float,
        ttft: float | None,
        unfinished: str = "length",
    ) -> GenerationResult:
        """The result; samples still running are reported with the reason ``unfinished``."""
        stats = request.stats
        if not stats.decode_seconds and unfinished != "length":  # interrupted before the engine set it
            stats.decode_seconds = max(0.0, seconds - (ttft or 0.0))
        samples = [
            SampleResult(t.text, len(t.ids), t.finish_reason(seq.finish_reason) or unfinished, t.ids)
            for t, seq in zip(texts.samples, request.sequences, strict=True)
        ]
        generated = sum(s.tokens for s in samples)
        return GenerationResult(
            model=self.name,
            prompt_tokens=len(request.prompt),
            samples=samples,
            seconds=seconds,
            tokens_per_second=generated / stats.decode_seconds if stats.decode_seconds > 0 else 0.0,
            time_to_first_token=ttft or 0.0,
            prompt_tokens_per_second=(
                stats.prefill_tokens / stats.prefill_seconds if stats.prefill_seconds > 0 else 0.0
            ),
            prompt_truncated=dropped,
            stats=stats,
            seed=request.cfg.seed,
        )

    def generate(
        self, prompt: str | list[int], *, cache: PromptCache | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield the text of one sample as it is generated (options as in GenerationConfig)."""
        for event in self.stream(prompt, GenerationConfig(**options), cache=cache):
            if isinstance(event, TextPiece):
                yield event.text

    def complete(
        self, prompt: str | list[int], *, cache: PromptCache | None = None, **options: Any
    ) -> GenerationResult:
        """Generate to the end and return the result (options as in GenerationConfig)."""
        result = None
        for event in self.stream(prompt, GenerationConfig(**options), cache=cache):
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
        batch_size: int | None = None,
        errors: str = "strict",
        per_token: bool = False,
        top: int = 0,
        name: str | None = None,
        on_token: Callable[[TokenScore], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        protocol: str = "lm-eval",
    ) -> ScoreResult:
        """Score text (``str``), UTF-8 ``bytes``, a file path or a binary stream (see ``scoring``).

        ``context`` defaults to the model's window and ``stride`` to half the context.
        ``protocol``: "lm-eval" (the default reading) or "hf" (Hugging Face's perplexity guide).

        Raises:
            BadInputError: bad window settings; ScoreInputError for unreadable or empty input;
            ScoreInterrupted (a KeyboardInterrupt) on Ctrl-C, with the result so far.
        """
        scorer = self.scorer(context, stride, batch_size, protocol)
        source, name = _byte_source(source, name)
        return scorer.score(
            source,
            name=name,
            errors=errors,
            per_token=per_token,
            top=top,
            on_token=on_token,
            progress=progress,
        )

    def score_many(
        self,
        texts: Iterable[str | bytes],
        *,
        context: int | None = None,
        stride: int | None = None,
        batch_size: int | None = None,
        lookahead: int | None = None,
        errors: str = "strict",
        per_token: bool = False,
    ) -> Iterator[ScoreResult | ScoreInputError]:
        """Score many texts, each as ``score`` scores it alone, packed into shared batches.

        Windows of ``lookahead`` texts at a time are sorted by length and run in batches of
        ``batch_size`` x ``context`` padded tokens (see ``packing``; ``batch_size`` defaults as
        ``scoring.default_batch_size`` says). Yields one result per
        text in input order; a text that cannot be scored (empty, invalid UTF-8) yields its
        ``ScoreInputError`` in its place.

        Raises:
            BadInputError: bad window settings.
        """
        from gpt2cli.packing import DEFAULT_LOOKAHEAD, PackedScorer

        packed = PackedScorer(
            self.scorer(context, stride, batch_size), lookahead=lookahead or DEFAULT_LOOKAHEAD
        )
        return packed.score_many(texts, errors=errors, per_token=per_token)

    def scorer(
        self,
        context: int | None = None,
        stride: int | None = None,
        batch_size: int | None = None,
        protocol: str = "lm-eval",
    ) -> Scorer:
        """A ``Scorer`` over this model; ``context`` defaults to the window, ``stride`` to half of it."""
        from gpt2cli.scoring import Scorer

        context = self.window if context is None else context
        stride = max(1, context // 2) if stride is None else stride
        return Scorer(
            self.model,
            self.tokenizer,
            context=context,
            stride=stride,
            batch_size=batch_size,
            protocol=protocol,
        )

    # --- looking inside (inspection.py, comparison.py; docs/inspect.md) ---------------------------

    def _inspect_ids(self, text: str | list[int], prepend_bos: bool) -> list[int]:
        from gpt2cli.inspection import text_ids

        return text_ids(self.tokenizer, text, self.window, prepend_bos=prepend_bos)

    def lens(
        self,
        text: str | list[int],
        *,
        at: str = "post",
        layers: Spec = None,
        positions: Spec = None,
        top: int = 5,
        prepend_bos: bool = True,
    ) -> LensResult:
        """The logit lens: what each layer's residual stream predicts at each position.

        Args:
            at: ``post`` (a block's output), ``mid`` (after its attention) or ``pre`` (its input).
            layers, positions: None (all), an index, a list, or a string such as ``"0,5:8,-1"``.
            top: candidates per cell.
            prepend_bos: start the text with ``<|endoftext|>`` (so its first token is predicted).

        Raises:
            BadInputError: a text longer than the window, or a selection out of range.
        """
        from gpt2cli.inspection import logit_lens

        ids = self._inspect_ids(text, prepend_bos)
        return logit_lens(
            self.model,
            self.tokenizer,
            ids,
            name=self.name,
            at=at,
            layers=layers,
            positions=positions,
            top=top,
        )

    def attention(
        self, text: str | list[int], *, layers: Spec = None, heads: Spec = None, prepend_bos: bool = True
    ) -> AttentionResult:
        """Attention weights (layer, head, query, key) of the chosen layers and heads (see ``lens``)."""
        from gpt2cli.inspection import attention

        ids = self._inspect_ids(text, prepend_bos)
        return attention(self.model, self.tokenizer, ids, name=self.name, layers=layers, heads=heads)

    def activations(
        self, text: str | list[int], hooks: Iterable[str] = ("*",), *, prepend_bos: bool = True
    ) -> dict[str, torch.Tensor]:
        """Activations of one text at the hook points matching the globs ``hooks``, token axis first.

        Names are TransformerLens' (``blocks.{L}.hook_resid_pre|mid|post``, ``blocks.{L}.attn.hook_z``,
        ``blocks.{L}.attn.hook_pattern``, ``blocks.{L}.mlp.hook_post``, ``ln_final.hook_normalized``);
        shapes as in ``inspection.activations``. ``"tokens"`` holds the ids.

        Raises:
            BadInputError: a glob that matches no hook point, or a text longer than the window.
        """
        from gpt2cli.inspection import activations, match_hooks

        names = match_hooks(list(hooks), self.config.n_layer)
        ids = self._inspect_ids(text, prepend_bos)
        return {"tokens": torch.tensor(ids), **activations(self.model, ids, names)}

    def save_activations(
        self,
        texts: Iterable[str | list[int]],
        path: str | os.PathLike[str],
        hooks: Iterable[str] = ("blocks.*.hook_resid_post",),
        *,
        overwrite: bool = False,
        prepend_bos: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> ActivationsFile:
        """Write the activations of many texts to one safetensors file as they are computed.

        See ``inspection.save_activations`` for the layout (``tokens``, ``offsets``, one tensor
        per hook point). ``progress`` gets (texts done, tokens done).
        """
        from gpt2cli.inspection import save_activations

        return save_activations(
            self.model,
            self.tokenizer,
            texts,
            path,
            hooks=list(hooks),
            model_name=self.name,
            overwrite=overwrite,
            prepend_bos=prepend_bos,
            progress=progress,
        )

    def compare(
        self,
        other: LM,
        source: str | bytes | os.PathLike[str] | IO[bytes],
        *,
        context: int | None = None,
        stride: int | None = None,
        errors: str = "strict",
        per_token: bool = False,
        name: str | None = None,
        names: tuple[str, str] | None = None,
        on_token: Callable[[TokenDiff], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> CompareResult:
        """Compare this model (A) with ``other`` (B) over the same tokens of a text, as ``score`` reads it.

        ``context`` defaults to the smaller window and ``stride`` to half the context; ``names``
        (default: the two models' names) label A and B in the result.

        Raises:
            BadInputError: different vocabularies, bad window settings, or unreadable input.
        """
        from gpt2cli.comparison import Comparer, check_same_tokenizer

        names = names or (self.name, other.name)
        check_same_tokenizer(
            self.tokenizer, other.tokenizer, self.config.vocab_size, other.config.vocab_size, names
        )
        context = min(self.window, other.window) if context is None else context
        stride = max(1, context // 2) if stride is None else stride
        comparer = Comparer(
            self.model,
            other.model,
            self.tokenizer,
            names=names,
            context=context,
            stride=stride,
        )
        source, name = _byte_source(source, name)
        return comparer.compare(
            source, name=name, errors=errors, per_token=per_token, on_token=on_token, progress=progress
        )


def _byte_source(
    source: str | bytes | os.PathLike[str] | IO[bytes], name: str | None
) -> tuple[os.PathLike[str] | IO[bytes], str | None]:
    """Text (``str``) and ``bytes`` as a binary stream with a display name; paths and streams as given."""
    if isinstance(source, str):
        return io.BytesIO(source.encode("utf-8", "surrogatepass")), name or "<text>"
    if isinstance(source, bytes):
        return io.BytesIO(source), name or "<bytes>"
    return source, name


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
    tokenizer = load_tokenizer(path, config)
    try:
        converter = fastpath.storage_converter(torch_device, torch_dtype, method)
        raw_state = read_state_dict(weight_files(path, allow_pickle), converter)
        model = build_model(config, raw_state)
    except CorruptWeightsError as exc:
        if resolved.spec.repo_id is not None:  # a Hub model in the cache: the cache can repair it
            exc.hint = f"re-download it: `gpt2 models verify {resolved.name} --repair`"
        else:  # a directory of the user's: nothing to download it from
            exc.hint = f"write or copy the model to {path} again (a model directory cannot be repaired)"
        raise
    fastpath.place(model, torch_device, torch_dtype, method, converter)
    lm = LM(model, tokenizer, resolved)
    if compile:
        lm.decoder = fastpath.StaticDecoder(model)
    return lm
