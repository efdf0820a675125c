"""`gpt2 repl`: an interactive conversation (chat or completion) with a GPT-2 model."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated

import typer

from gpt2cli.cli import options as opt
from gpt2cli.cli.output import is_terminal, warn
from gpt2cli.config import GenerationConfig
from gpt2cli.errors import EXIT_INTERRUPTED


class Mode(str, Enum):
    chat = "chat"
    complete = "complete"


class Template(str, Enum):
    transcript = "transcript"
    dialogpt = "dialogpt"


def repl(
    model: opt.Model = "gpt2",
    max_new_tokens: opt.MaxNewTokens = 128,
    temperature: opt.Temperature = 0.8,
    top_k: opt.TopK = 40,
    top_p: opt.TopP = 0.95,
    min_p: opt.MinP = 0.0,
    repetition_penalty: opt.RepetitionPenalty = 1.0,
    seed: opt.Seed = None,
    mode: Annotated[
        Mode, typer.Option("--mode", help="chat (a User/Assistant transcript) or complete (continue text).")
    ] = Mode.chat,
    template: Annotated[
        Template | None,
        typer.Option(
            "--template", help="Chat template: transcript or dialogpt (default: dialogpt for DialoGPT ids)."
        ),
    ] = None,
    user_name: Annotated[str, typer.Option("--user-name", help="The user's name in the chat.")] = "User",
    bot_name: Annotated[str, typer.Option("--bot-name", help="The model's name in the chat.")] = "Assistant",
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    offline: opt.Offline = False,
    allow_pickle: opt.AllowPickle = False,
    quantize: opt.Quantize = None,
) -> None:
    """Talk with a GPT-2 model: slash commands (/help), history, Ctrl-C stops a reply, Ctrl-D leaves.

    With stdin not a terminal, each line is a turn and replies are printed as plain text.
    """
    from gpt2cli.chat import pick_template

    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    ).validate()
    kind = template.value if template else None
    pick_template(model, kind, user_name, bot_name)  # bad names fail before the model loads

    from gpt2cli.cli.loading import load_model
    from gpt2cli.repl.session import make_session

    lm = load_model(
        model, device=device, dtype=dtype, offline=offline, allow_pickle=allow_pickle, quantize=quantize
    )
    session = make_session(lm, cfg, template=kind, user_name=user_name, bot_name=bot_name, mode=mode.value)
    session.warn = warn

    from gpt2cli.repl import ui

    if is_terminal(sys.stdin):
        ui.terminal_ui(session).run()
        return
    try:
        ui.run_piped(session, sys.stdin)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
