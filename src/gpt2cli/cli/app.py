"""Assembles the Typer app and runs it: errors are rendered here once, as one line and a hint.

Only Typer, our errors/config and the command modules (which import nothing heavy at module
level) load before a command runs, so ``gpt2 --help`` stays fast and torch-free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Sequence

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.exceptions import Abort, Exit

from gpt2cli import __version__
from gpt2cli.cli import activations, attention, bench, completion, finetune, generate, lens, score
from gpt2cli.cli import models as models_cmd
from gpt2cli.cli import options as opt
from gpt2cli.cli import repl as repl_cmd
from gpt2cli.cli.help import HelpCommand, HelpGroup
from gpt2cli.cli.output import StdoutClosed, error_line
from gpt2cli.cli.serve import serve as serve_command
from gpt2cli.errors import (
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    DeviceUnavailableError,
    Gpt2Error,
    OutOfMemoryError,
)

DEBUG = "--debug"

app = typer.Typer(
    name="gpt2",
    cls=HelpGroup,
    help="Run OpenAI's GPT-2 family locally: generate, chat, score, inspect, benchmark, fine-tune, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"gpt2cli {__version__}\n")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    debug: bool = typer.Option(
        False, DEBUG, help="Show full tracebacks on errors (also after the command, or GPT2_DEBUG=1)."
    ),
) -> None:
    """Run OpenAI's GPT-2 family locally: generate, chat, score, inspect, benchmark, fine-tune, serve."""


app.command("generate", no_args_is_help=False, cls=HelpCommand, epilog=generate.EXAMPLES)(generate.generate)
app.add_typer(models_cmd.app, name="models")
app.command("score", no_args_is_help=False, cls=HelpCommand)(score.score)
app.command("repl", cls=HelpCommand)(repl_cmd.repl)
app.command("serve", cls=HelpCommand)(serve_command)
app.command("finetune", cls=HelpCommand)(finetune.finetune)
app.command("bench", cls=HelpCommand)(bench.bench)
app.command("completion", cls=HelpCommand)(completion.completion)
app.command("lens", no_args_is_help=False, cls=HelpCommand)(lens.lens)
app.command("attention", no_args_is_help=False, cls=HelpCommand)(attention.attention)
app.command("activations", no_args_is_help=False, cls=HelpCommand)(activations.activations)


def _wants_debug(args: Sequence[str]) -> bool:
    return DEBUG in _before_separator(args) or os.environ.get("GPT2_DEBUG", "") not in ("", "0")


def _before_separator(args: Sequence[str]) -> list[str]:
    args = list(args)
    return args[: args.index("--")] if "--" in args else args


def hoist_debug(args: Sequence[str]) -> list[str]:
    """``gpt2 generate hi --debug`` -> ``gpt2 --debug generate hi``: the flag works anywhere
    (before a ``--`` separator), as every hint that names it expects."""
    head = _before_separator(args)
    if DEBUG not in head:
        return list(args)
    rest = list(args)[len(head) :]
    return [DEBUG, *(a for a in head if a != DEBUG), *rest]


def run(args: Sequence[str]) -> int:
    """Run the CLI on ``args``; return the exit code (errors already rendered on stderr)."""
    debug = _wants_debug(args)
    opt.ENV_VALUES.clear()
    try:
        opt.check_environment()
        result = app(args=hoist_debug(args), prog_name="gpt2", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except Exit as exc:
        return exc.exit_code
    except Gpt2Error as exc:
        hint = exc.hint
        if isinstance(exc, DeviceUnavailableError) and opt.DEVICE_ENV in opt.ENV_VALUES:
            value = opt.ENV_VALUES[opt.DEVICE_ENV]
            hint = f"the device came from {opt.DEVICE_ENV}={value!r}; unset it, or {hint}"
        return _fail(exc.message, hint, exc.exit_code, debug)
    except NoArgsIsHelpError as exc:
        exc.show()  # bare `gpt2` (or a group): help is the answer, not an error
        return 0
    except UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else _command_path(args)
        return _fail(_plain_usage(exc.format_message()), f"see '{command} --help'", EXIT_USAGE, debug)
    except ClickException as exc:
        return _fail(exc.format_message(), None, exc.exit_code, debug)
    except (Abort, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt) or isinstance(exc.__cause__, KeyboardInterrupt):
            sys.stderr.write("\n")
            return EXIT_INTERRUPTED
        return _fail("aborted", None, EXIT_RUNTIME, debug)
    except StdoutClosed:
        raise
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise StdoutClosed from exc
        return _fail(str(exc), None, EXIT_RUNTIME, debug)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        oom = _out_of_memory(exc)
        if oom is not None:
            return _fail(oom.message, oom.hint, oom.exit_code, debug)
        return _fail(
            f"unexpected {type(exc).__name__}: {exc}", "rerun with --debug for the traceback", 1, debug
        )


def _command_path(args: Sequence[str]) -> str:
    """The command ``args`` name ("gpt2 models verify"), for errors click raises without one
    (an option's missing value): the words before the first that is not a subcommand."""
    command: object = typer.main.get_command(app)
    path = ["gpt2"]
    for word in _before_separator(args):
        if word.startswith("-"):
            continue
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            break
        path.append(word)
    return " ".join(path)


def _plain_usage(message: str) -> str:
    """Typer's value errors without pydantic's wording ("Value error, 'xml' is not one of ..."), on
    one line (click lists a missing argument's choices one per line)."""
    return " ".join(message.replace("Value error, ", "").split())


def _out_of_memory(exc: BaseException) -> OutOfMemoryError | None:
    """An allocation failure (CPU or GPU) as our error, or None."""
    text = str(exc)
    if (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))
    ):
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return OutOfMemoryError(f"out of memory: {first[:160]}")
    return None


def _fail(message: str, hint: str | None, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(error_line(message, hint))
    sys.stderr.flush()
    return code


def _replace_unencodable() -> None:
    """Characters the terminal's encoding (a Latin-1 locale, say) cannot show become '?'
    instead of crashing mid-output; what was generated is never lost to an encoding error."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a closed or unusual stream
                reconfigure(errors="replace")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = sys.argv[1:] if argv is None else argv
    _replace_unencodable()
    try:
        code = run(args)
        sys.stdout.flush()
    except (StdoutClosed, BrokenPipeError):
        # The reader went away (`| head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    sys.exit(code)
