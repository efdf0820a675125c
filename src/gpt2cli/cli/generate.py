"""`gpt2 generate`: continue a prompt, streaming the text to stdout."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from gpt2cli.batch.jsonl import LOOKAHEAD
from gpt2cli.cli import batch
from gpt2cli.cli import options as opt
from gpt2cli.cli.output import color_allowed, dim, is_terminal, stderr_console, warn, write, write_json
from gpt2cli.cli.prompt_input import note_ignored_stdin, read_prompt
from gpt2cli.config import MAX_NUM_SAMPLES, GenerationConfig
from gpt2cli.errors import EXIT_INTERRUPTED

EXAMPLES = """\
Examples:
  gpt2 generate "The meaning of life is" -n 60
  gpt2 generate "def fib(n):" -t 0 --stop "\\n\\n"     # greedy, stop at a blank line
  echo "Dear diary," | gpt2 generate -m gpt2-medium   # the prompt from stdin
  gpt2 generate "Hello" --num-samples 3 --seed 7 --format json

Piped text output ends with a newline: the model's own, or one added when the text does not
end with one (never inside --format json/jsonl). With a PROMPT argument stdin is not read.
"""


def generate(
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt; '-' or none with piped stdin reads stdin.")
    ] = None,
    model: opt.Model = "gpt2",
    max_new_tokens: opt.MaxNewTokens = 128,
    temperature: opt.Temperature = 0.8,
    top_k: opt.TopK = 40,
    top_p: opt.TopP = 0.95,
    min_p: opt.MinP = 0.0,
    repetition_penalty: opt.RepetitionPenalty = 1.0,
    seed: opt.Seed = None,
    stop: Annotated[
        list[str] | None,
        typer.Option(
            "--stop",
            help="Stop at this text (not printed); repeatable. Backslash escapes are read: "
            "\\n, \\t, \\xHH, \\uHHHH, \\\\ for a backslash.",
            rich_help_panel=opt.SAMPLING_PANEL,
        ),
    ] = None,
    stop_raw: Annotated[
        list[str] | None,
        typer.Option(
            "--stop-raw",
            help="Like --stop, taken literally (no escapes).",
            rich_help_panel=opt.SAMPLING_PANEL,
        ),
    ] = None,
    num_samples: Annotated[
        int,
        typer.Option(
            "--num-samples",
            help=f"Samples generated together as a batch (1 to {MAX_NUM_SAMPLES}).",
            rich_help_panel=opt.SAMPLING_PANEL,
        ),
    ] = 1,
    ignore_eos: Annotated[
        bool,
        typer.Option(
            "--ignore-eos", help="Keep generating past <|endoftext|>.", rich_help_panel=opt.SAMPLING_PANEL
        ),
    ] = False,
    echo: Annotated[
        bool,
        typer.Option(
            "--echo", help="Print the prompt before the generated text.", rich_help_panel=opt.OUTPUT_PANEL
        ),
    ] = False,
    output_format: Annotated[
        opt.TextFormat,
        typer.Option(
            "--format", help="text, json (one object) or jsonl (streamed).", rich_help_panel=opt.OUTPUT_PANEL
        ),
    ] = opt.TextFormat.text,
    stats: Annotated[
        bool,
        typer.Option(
            "--stats",
            help="Print tokens/s, time to first token and the seed on stderr (after Ctrl-C too).",
            rich_help_panel=opt.OUTPUT_PANEL,
        ),
    ] = False,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    offline: opt.Offline = False,
    allow_pickle: opt.AllowPickle = False,
    quantize: opt.Quantize = None,
    compile_decode: opt.Compile = False,
    draft_model: Annotated[
        str | None,
        typer.Option(
            "--draft-model",
            help="Speculative decoding: a smaller GPT-2 with the same vocabulary.",
            rich_help_panel=opt.PERFORMANCE_PANEL,
        ),
    ] = None,
    draft_tokens: Annotated[
        int,
        typer.Option(
            "--draft-tokens",
            min=1,
            max=16,
            help="Tokens the draft model proposes per step.",
            rich_help_panel=opt.PERFORMANCE_PANEL,
        ),
    ] = 4,
    jsonl: batch.Jsonl = None,
    output: batch.Output = None,
    prompt_field: Annotated[
        str,
        typer.Option(
            "--prompt-field", help="--jsonl: the field holding the prompt.", rich_help_panel=batch.BATCH_PANEL
        ),
    ] = "prompt",
    id_field: batch.IdField = "id",
    resume: batch.Resume = False,
    on_error: batch.OnErrorOption = batch.OnError.skip,
    workers: batch.Workers = 1,
    ray: batch.Ray = False,
    ray_address: batch.RayAddress = None,
    lookahead: batch.Lookahead = LOOKAHEAD,
) -> None:
    """Continue PROMPT with a GPT-2 model and stream the text to stdout.

    A literal <|endoftext|> in the prompt is GPT-2's end-of-text token, as in transformers.

    --jsonl IN generates one completion per line's prompt (a line may set its own
    max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop and
    ignore_eos) and writes one JSON line per input line (id, text, tokens, finish_reason).
    """
    cfg = (
        GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=tuple(opt.unescape(s) for s in stop or ()) + tuple(stop_raw or ()),
            num_samples=num_samples,
            ignore_eos=ignore_eos,
        )
        .validate()
        .with_seed()
    )  # the seed is drawn here, so it can be reported
    job = batch.job_options(jsonl, output, id_field, resume, on_error, workers, ray, ray_address, lookahead)
    if job is not None:
        for option, given in (
            ("PROMPT", prompt is not None),
            ("--num-samples", num_samples != 1),
            ("--echo", echo),
            ("--format", output_format is not opt.TextFormat.text),
            ("--stats", stats),
            ("--compile", compile_decode),
            ("--draft-model", draft_model is not None),
        ):
            batch.refuse(option, given)
        from gpt2cli.batch.tasks import GenerateSettings, ModelSettings

        model_settings = ModelSettings(model, device, dtype, offline, allow_pickle, quantize)
        batch.run(job, model_settings, GenerateSettings(cfg, prompt_field), ("generated", "completions"))
        return
    text = read_prompt(prompt)

    from gpt2cli.cli.loading import load_model

    lm = load_model(
        model,
        device=device,
        dtype=dtype,
        offline=offline,
        allow_pickle=allow_pickle,
        quantize=quantize,
        compile=compile_decode,
    )
    draft = None
    if draft_model is not None:
        draft = load_model(
            draft_model,
            device=device,
            dtype=dtype,
            offline=offline,
            allow_pickle=allow_pickle,
            compile=compile_decode,
        )
    if prompt not in (None, "-"):
        note_ignored_stdin()
    renderer = _RENDERERS[output_format](text if echo else None, cfg.num_samples, cfg.seed)
    events = lm.stream(text, cfg, warn=warn, draft=draft, draft_tokens=draft_tokens)
    try:
        for event in events:
            renderer.event(event)
    except KeyboardInterrupt as exc:
        partial = _partial_result(events, exc)
        renderer.interrupted(partial)
        if stats:
            _print_stats(partial, lm.precision, cfg.seed, interrupted=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if stats and renderer.result is not None:
        _print_stats(renderer.result, lm.precision, cfg.seed)


def _partial_result(events: Any, exc: KeyboardInterrupt) -> Any:
    """The result of what was generated before Ctrl-C (GenerationInterrupted carries it).

    Ctrl-C can also land here, between two events: the stream is then asked for it.
    """
    if hasattr(exc, "partial"):
        return exc.partial
    try:
        events.throw(KeyboardInterrupt())
    except KeyboardInterrupt as inner:
        return getattr(inner, "partial", None)
    except (StopIteration, RuntimeError, ValueError):
        return None
    return None


class _Renderer:
    """Turns the library's event stream into output; keeps what it has so Ctrl-C loses nothing."""

    def __init__(self, echo: str | None, n: int, seed: int | None = None) -> None:
        self.echo, self.n, self.seed = echo, n, seed
        self.texts = [""] * n
        self.result: Any = None

    def event(self, event: Any) -> None:
        from gpt2cli.api import TextPiece

        if isinstance(event, TextPiece):
            self.texts[event.sample] += event.text
            self.piece(event.sample, event.text)
        else:
            self.result = event
            self.done(event)

    def piece(self, sample: int, text: str) -> None: ...

    def done(self, result: Any) -> None: ...

    def interrupted(self, partial: Any) -> None: ...


class _TextRenderer(_Renderer):
    """Streams one sample live; several samples are printed one after another when done."""

    def __init__(self, echo: str | None, n: int, seed: int | None = None) -> None:
        super().__init__(echo, n, seed)
        self.started = False
        if n == 1:
            self._start()

    def _start(self) -> None:
        if self.echo is not None and not self.started:
            write(dim(self.echo))
        self.started = True

    def piece(self, sample: int, text: str) -> None:
        if self.n == 1:
            write(text)

    def done(self, result: Any) -> None:
        self._finish()

    def interrupted(self, partial: Any) -> None:
        self._finish()

    def _finish(self) -> None:
        if self.n == 1:
            write(_newline_after((self.echo or "") + self.texts[0]))
            return
        for i, text in enumerate(self.texts):
            if i:
                write("\n")
            if is_terminal(sys.stdout):
                write(dim(f"--- sample {i + 1}/{self.n} ---") + "\n")
            shown = (self.echo or "") + text
            write(shown + _newline_after(shown))


def _newline_after(shown: str) -> str:
    """The newline text output ends with: added only when what was shown does not end with one."""
    return "\n" if shown and not shown.endswith("\n") else ""


def _echoed(obj: dict[str, Any], echo: str | None) -> dict[str, Any]:
    """A result's JSON with ``--echo``'s prompt in front of each sample's text, as shown."""
    if echo is not None:
        for sample in obj["samples"]:
            sample["text"] = echo + sample["text"]
    return obj


class _JsonRenderer(_Renderer):
    def done(self, result: Any) -> None:
        write_json(_echoed(result.to_json(), self.echo), pretty=is_terminal(sys.stdout))

    def interrupted(self, partial: Any) -> None:
        counts = [s.tokens for s in partial.samples] if partial is not None else [None] * self.n
        samples = [
            {"text": (self.echo or "") + t, "tokens": c, "finish_reason": "interrupted"}
            for t, c in zip(self.texts, counts, strict=True)
        ]
        write_json({"samples": samples, "interrupted": True, "seed": self.seed})


class _JsonlRenderer(_Renderer):
    def __init__(self, echo: str | None, n: int, seed: int | None = None) -> None:
        super().__init__(echo, n, seed)
        if echo is not None:
            for i in range(n):
                write_json({"type": "text", "sample": i, "text": echo})

    def piece(self, sample: int, text: str) -> None:
        write_json({"type": "text", "sample": sample, "text": text})

    def done(self, result: Any) -> None:
        write_json({"type": "summary", **_echoed(result.to_json(), self.echo)})

    def interrupted(self, partial: Any) -> None:
        write_json({"type": "summary", "interrupted": True, "seed": self.seed})


_RENDERERS: dict[opt.TextFormat, type[_Renderer]] = {
    opt.TextFormat.text: _TextRenderer,
    opt.TextFormat.json: _JsonRenderer,
    opt.TextFormat.jsonl: _JsonlRenderer,
}


def _print_stats(result: Any, precision: str, seed: int | None, interrupted: bool = False) -> None:
    """One line on stderr; after Ctrl-C, the figures of what was generated until then."""
    parts = []
    if result is not None:
        generated = sum(s.tokens for s in result.samples)
        parts = [
            f"prompt: {result.prompt_tokens} tokens, {result.prompt_tokens_per_second:.1f} tok/s",
            f"generation: {generated} tokens, {result.tokens_per_second:.1f} tok/s",
            f"first token: {result.time_to_first_token * 1000:.0f} ms",
            f"weights: {precision}",
        ]
        stats = result.stats
        if stats.draft_proposed:
            parts.append(f"draft: {stats.draft_accepted}/{stats.draft_proposed} accepted")
        if stats.compiled_steps:
            parts.append(f"compiled steps: {stats.compiled_steps}")
    parts.append(f"seed: {seed}")
    line = ("interrupted | " if interrupted else "") + " | ".join(parts)
    console = stderr_console()
    console.print(line, style="dim" if color_allowed(sys.stderr) else None)
