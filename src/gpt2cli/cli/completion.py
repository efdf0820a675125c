"""`gpt2 completion`: print the shell completion script, or install it where the shell looks."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli.output import write
from gpt2cli.errors import Gpt2Error


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def install_path(shell: Shell) -> Path:
    """Where each shell finds a user's completions without further setup (zsh: see the note)."""
    home = Path.home()
    data = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return {
        Shell.bash: data / "bash-completion" / "completions" / "gpt2",  # bash-completion loads it
        Shell.zsh: home / ".zfunc" / "_gpt2",  # needs ~/.zfunc on $fpath before compinit
        Shell.fish: config / "fish" / "completions" / "gpt2.fish",
    }[shell]


ZSH_NOTE = "add to ~/.zshrc, before compinit: fpath=(~/.zfunc $fpath); then restart zsh"


def completion(
    shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")],
    install: Annotated[
        bool,
        typer.Option("--install", help="Write the script where the shell finds it, instead of printing it."),
    ] = False,
) -> None:
    """Print the completion script for SHELL (or install it with --install).

    Print it to try it at once: source <(gpt2 completion bash). Scripts complete commands,
    options, choice values, model aliases and file names without starting Python.
    """
    from gpt2cli.cli.completion_scripts import render

    script = render(shell.value)
    if not install:
        write(script)
        return
    path = install_path(shell)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script, encoding="utf-8")
    except OSError as exc:
        raise Gpt2Error(f"cannot write {path}: {exc.strerror or exc}") from exc
    write(f"{path}\n")
    note = ZSH_NOTE if shell is Shell.zsh else "open a new shell to use it"
    sys.stderr.write(f"installed {shell.value} completion: {note}\n")
