"""`gpt2 finetune`: train GPT-2 on your own text (full, LoRA, or from scratch) into a checkpoint dir."""

from __future__ import annotations

import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli import options as opt
from gpt2cli.cli.output import is_terminal, stderr_console, write
from gpt2cli.errors import EXIT_INTERRUPTED
from gpt2cli.signals import handled


class DataFormat(str, Enum):
    auto = "auto"
    text = "text"
    jsonl = "jsonl"


class Size(str, Enum):
    """--from-scratch sizes (the architectures are in train/settings.py)."""

    tiny = "tiny"
    mini = "mini"
    small = "small"
    gpt2 = "gpt2"


def finetune(
    data: Annotated[
        list[Path],
        typer.Argument(
            help="Text files or directories of them (walked recursively, in sorted order): .txt/.md "
            "(one document each) or .jsonl (a text field per line)."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the trained model to.")],
    model: opt.Model = "gpt2",
    data_format: Annotated[
        DataFormat,
        typer.Option(
            "--data-format",
            help="auto (by suffix), text (any file, .py or none, is one document) or jsonl (every file).",
        ),
    ] = DataFormat.auto,
    block_size: Annotated[
        int | None,
        typer.Option("--block-size", help="Tokens per sequence (default: the model's window)."),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of the blocks held out for evaluation.")
    ] = 0.05,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the data (default 1).")] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Optimizer steps to take (caps --epochs if both).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Sequences per process per micro-step.")
    ] = 8,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", help="Micro-steps accumulated per optimizer step.")
    ] = 1,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Peak learning rate (default 5e-5 full, 3e-4 LoRA, 1e-3 from scratch)."),
    ] = None,
    warmup_steps: Annotated[
        int | None, typer.Option("--warmup-steps", help="Linear warmup steps (default 5% of the steps).")
    ] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.01,
    grad_clip: Annotated[
        float, typer.Option("--grad-clip", help="Clip the gradient norm (0 disables).")
    ] = 1.0,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for initialisation, split and shuffling (0 to 2^64-1).")
    ] = 0,
    eval_every: Annotated[
        int | None,
        typer.Option("--eval-every", help="Held-out evaluation every N steps (default: at most 10 a run)."),
    ] = None,
    save_every: Annotated[
        int | None,
        typer.Option("--save-every", help="Checkpoint every N steps (default: only at the end)."),
    ] = None,
    lora: Annotated[
        int | None, typer.Option("--lora", help="Train rank-R LoRA adapters instead of all weights.")
    ] = None,
    lora_alpha: Annotated[
        float | None,
        typer.Option("--lora-alpha", help="LoRA scale numerator, > 0 (default 2 x rank); needs --lora."),
    ] = None,
    from_scratch: Annotated[
        bool,
        typer.Option("--from-scratch", help="Train a new model (--model gives only the tokenizer)."),
    ] = False,
    size: Annotated[Size, typer.Option("--size", help="Size for --from-scratch.")] = Size.tiny,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations: less memory, more time.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint in --output.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --output even if it is not a checkpoint of ours.")
    ] = False,
    device: opt.Device = "auto",
    offline: opt.Offline = False,
    allow_pickle: opt.AllowPickle = False,
) -> None:
    """Fine-tune a GPT-2 on DATA and write a Hugging Face-layout checkpoint to --output.

    Documents are joined with <|endoftext|> and packed into blocks. Run under
    `torchrun --nproc-per-node N -m gpt2cli finetune ...` to train with DDP.
    """
    from gpt2cli.train.settings import FinetuneSettings

    settings = FinetuneSettings(
        data=list(data),
        output=output,
        model=model,
        data_format=data_format.value,
        block_size=block_size,
        val_fraction=val_fraction,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        seed=seed,
        eval_every=eval_every,
        save_every=save_every,
        lora=lora,
        lora_alpha=lora_alpha,
        from_scratch=from_scratch,
        size=size.value,
        gradient_checkpointing=gradient_checkpointing,
        resume=resume,
        overwrite=overwrite,
        device=device,
        offline=offline,
        allow_pickle=allow_pickle,
    ).validate()

    from gpt2cli.device import configure_threads
    from gpt2cli.train.loop import finetune as run_finetune

    configure_threads(None)  # GPT2_THREADS, if set

    reporter = _Reporter()
    try:
        with handled(signal.SIGTERM, _terminate):  # a `kill` keeps the steps done, as Ctrl-C does
            result = run_finetune(settings, reporter.event)
    except KeyboardInterrupt as exc:
        reporter.close()
        saved = reporter.last_save
        where = f"; saved step {saved.step} to {saved.path} (continue with --resume)" if saved else ""
        terminated = isinstance(exc, _Terminated)
        sys.stderr.write(f"gpt2: {'terminated' if terminated else 'interrupted'}{where}\n")
        raise typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None
    finally:
        reporter.close()
    if result.first_eval and result.final_eval:
        reporter.line(
            f"held-out perplexity {result.first_eval.perplexity:.2f} -> {result.final_eval.perplexity:.2f} "
            f"after {result.steps} steps ({result.seconds:.1f} s)"
        )
    if reporter.is_main:
        write(f"{result.output}\n")


EXIT_TERMINATED = 128 + 15  # the shell's status for a process ended by SIGTERM


class _Terminated(KeyboardInterrupt):
    """SIGTERM during training: handled as Ctrl-C is (the last finished step is saved)."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


class _Reporter:
    """Renders training events on stderr: a Rich progress bar on a terminal, else plain lines."""

    def __init__(self) -> None:
        self.console = stderr_console()
        self.live = is_terminal(sys.stderr)
        self.progress: Any = None
        self.task: Any = None
        self.every = 1
        self.last_save: Any = None
        self.is_main = False
        self.eval_text = ""

    def line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            self.console.print(text)

    def event(self, event: Any) -> None:
        from gpt2cli.train.loop import DataEvent, EvalEvent, SaveEvent, StartEvent, StepEvent

        self.is_main = True  # the library reports on rank 0 only
        if isinstance(event, DataEvent):
            self.line(f"data: {event.files}, {event.documents} documents")
        elif isinstance(event, StartEvent):
            self._start(event)
        elif isinstance(event, StepEvent):
            self._step(event)
        elif isinstance(event, EvalEvent):
            self.eval_text = f"held-out loss {event.loss:.4f} ppl {event.perplexity:.2f}"
            self.line(f"step {event.step}: {self.eval_text}")
        elif isinstance(event, SaveEvent):
            self.last_save = event
            self.line(f"step {event.step}: saved {'model' if event.final else 'checkpoint'} to {event.path}")

    def _start(self, e: Any) -> None:
        self.every = max(1, e.total_steps // 20)
        self.line(
            f"training on {e.device} x{e.world}: {e.tokens} tokens, {e.train_blocks} train / {e.val_blocks} "
            f"held-out blocks of {e.block_size}, global batch {e.global_batch}, "
            f"{e.trainable:,} of {e.parameters:,} parameters trainable, steps {e.start_step}..{e.total_steps}"
        )
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("finetune"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.progress.add_task("train", total=e.total_steps, completed=e.start_step, info="")
            self.progress.start()

    def _step(self, e: Any) -> None:
        text = f"loss {e.loss:.4f} lr {e.lr:.2e} {e.tokens_per_second:,.0f} tok/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=e.step, info=f"{text} | {self.eval_text}")
        elif e.step % self.every == 0 or e.step == e.total_steps:
            self.line(f"step {e.step}/{e.total_steps}: {text}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
