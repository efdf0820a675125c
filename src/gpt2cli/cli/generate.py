"""`gpt2 generate`: continue a prompt, streaming the text to stdout."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from gpt2cli.batch.jsonl import LOOKAHEAD
from gpt2cli.cli import batch
from gpt2cli.cli import options as opt
from gpt2cli.cli.output import color_allowed, dim, is_terminal, stderr_console, warn, write, write_json
from gpt2cli.cli.prompt_input import read_prompt
from gpt2cli.config import GenerationConfig
from gpt2cli.errors import EXIT_INTERRUPTED


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
        list[str] | None, typer.Option("--stop", help="Stop at this text (not printed); repeatable.")
    ] = None,
    num_samples: Annotated[
        int, typer.Option("--num-samples", help="Samples generated together as a batch.")
    ] = 1,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the generated text.")] = False,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Keep generating past <|endoftext|>.")
    ] = False,
    output_format: Annotated[
        opt.TextFormat, typer.Option("--format", help="text, json (one object) or jsonl (streamed).")
    ] = opt.TextFormat.text,
    stats: Annotated[
        bool,
        typer.Option("--stats", help="Print prompt/generation tokens/s and time to first token on stderr."),
    ] = False,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    offline: opt.Offline = False,
    allow_pickle: opt.AllowPickle = False,
    quantize: opt.Quantize = None,
    compile_decode: opt.Compile = False,
    draft_model: Annotated[
        str | None,
        typer.Option("--draft-model", help="Speculative decoding: a smaller GPT-2 with the same vocabulary."),
    ] = None,
    draft_tokens: Annotated[
        int, typer.Option("--draft-tokens", min=1, max=16, help="Tokens the draft model proposes per step.")
    ] = 4,
    jsonl: batch.Jsonl = None,
    output: batch.Output = None,
    prompt_field: Annotated[
        str, typer.Option("--prompt-field", help="--jsonl: the field holding the prompt.")
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
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
        num_samples=num_samples,
        ignore_eos=ignore_eos,
    ).validate()
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

    from gpt2cli.api import load

    lm = load(
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
        draft = load(
            draft_model,
            device=device,
            dtype=dtype,
            offline=offline,
            allow_pickle=allow_pickle,
            compile=compile_decode,
        )
    renderer = _RENDERERS[output_format](text if echo else None, cfg.num_samples)
    try:
        for event in lm.stream(text, cfg, warn=warn, draft=draft, draft_tokens=draft_tokens):
            renderer.event(event)
    except KeyboardInterrupt:
        renderer.interrupted()
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if stats and renderer.result is not None:
        _print_stats(renderer.result, lm.precision)


class _Renderer:
    """Turns the library's event stream into output; keeps what it has so Ctrl-C loses nothing."""

    def __init__(self, echo: str | None, n: int) -> None:
        self.echo, self.n = echo, n
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

    def interrupted(self) -> None: ...


class _TextRenderer(_Renderer):
    """Streams one sample live; several samples are printed one after another when done."""

    def __init__(self, echo: str | None, n: int) -> None:
        super().__init__(echo, n)
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

    def interrupted(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self.n == 1:
            if not self.texts[0].endswith("\n"):
                write("\n")
            return
        for i, text in enumerate(self.texts):
            if i:
                write("\n")
            if is_terminal(sys.stdout):
                write(dim(f"--- sample {i + 1}/{self.n} ---") + "\n")
            write((self.echo or "") + text + ("" if text.endswith("\n") else "\n"))


class _JsonRenderer(_Renderer):
    def done(self, result: Any) -> None:
        obj = result.to_json()
        if self.echo is not None:
            for sample in obj["samples"]:
                sample["text"] = self.echo + sample["text"]
        write_json(obj, pretty=is_terminal(sys.stdout))

    def interrupted(self) -> None:
        samples = [
            {"text": (self.echo or "") + t, "tokens": None, "finish_reason": "interrupted"}
            for t in self.texts
        ]
        write_json({"samples": samples, "interrupted": True})


class _JsonlRenderer(_Renderer):
    def __init__(self, echo: str | None, n: int) -> None:
        super().__init__(echo, n)
        if echo is not None:
            for i in range(n):
                write_json({"type": "text", "sample": i, "text": echo})

    def piece(self, sample: int, text: str) -> None:
        write_json({"type": "text", "sample": sample, "text": text})

    def done(self, result: Any) -> None:
        write_json({"type": "summary", **result.to_json()})

    def interrupted(self) -> None:
        write_json({"type": "summary", "interrupted": True})


_RENDERERS: dict[opt.TextFormat, type[_Renderer]] = {
    opt.TextFormat.text: _TextRenderer,
    opt.TextFormat.json: _JsonRenderer,
    opt.TextFormat.jsonl: _JsonlRenderer,
}


def _print_stats(result: Any, precision: str) -> None:
    generated = sum(s.tokens for s in result.samples)
    line = (
        f"prompt: {result.prompt_tokens} tokens, {result.prompt_tokens_per_second:.1f} tok/s | "
        f"generation: {generated} tokens, {result.tokens_per_second:.1f} tok/s | "
        f"first token: {result.time_to_first_token * 1000:.0f} ms | weights: {precision}"
    )
    stats = result.stats
    if stats.draft_proposed:
        line += f" | draft: {stats.draft_accepted}/{stats.draft_proposed} accepted"
    if stats.compiled_steps:
        line += f" | compiled steps: {stats.compiled_steps}"
    console = stderr_console()
    console.print(line, style="dim" if color_allowed(sys.stderr) else None)
