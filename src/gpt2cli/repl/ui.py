"""The REPL's faces: a prompt-toolkit terminal UI (history, multi-line input, Tab completion,
bottom toolbar, Rich-rendered streaming) and a plain line-per-turn loop for piped stdin.

All conversation logic lives in ``repl.session``; this module only reads input and shows output.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.application.current import get_app
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input.typeahead import get_typeahead, store_typeahead
from prompt_toolkit.input.vt100_parser import Vt100Parser
from prompt_toolkit.key_binding import KeyBindings, KeyPress, KeyPressEvent
from prompt_toolkit.keys import Keys

from gpt2cli.cli.output import color_allowed, stderr_console, write
from gpt2cli.errors import BadInputError
from gpt2cli.repl.session import (
    COMMAND_NAMES,
    MODES,
    SETTINGS,
    Outcome,
    Session,
    block_is_open,
    script_inputs,
    unblock,
)
from gpt2cli.signals import handled
from gpt2cli.text import trimmed

LEAVE_HINT = "Use Ctrl-D or /bye to leave."
FILE_COMMANDS = ("/save", "/save!", "/load")


def data_dir() -> Path:
    """The user data directory: $XDG_DATA_HOME/gpt2cli, else ~/.local/share/gpt2cli."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gpt2cli"


def history_path() -> Path:
    return data_dir() / "repl_history"


def _history() -> History:
    """Persistent history, or in memory when the data directory cannot be created."""
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError:
        return InMemoryHistory()
    return FileHistory(str(path))


class SlashCompleter(Completer):
    """Completes slash commands, /set options, /mode values and the file names of /save and /load."""

    def __init__(self) -> None:
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: Any) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        head, _, rest = text.partition(" ")
        if _ and head in FILE_COMMANDS:
            yield from self.paths.get_completions(Document(rest, len(rest)), complete_event)
            return
        if not _:
            choices: Iterable[str] = COMMAND_NAMES
            word = head
        elif head in ("/set", "/mode") and " " not in rest:
            choices, word = (SETTINGS if head == "/set" else MODES), rest
        else:
            return
        for choice in choices:
            if choice.startswith(word.lower()):
                yield Completion(choice, start_position=-len(word))


def _key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        """Alt-Enter (Esc then Enter) inserts a new line instead of sending."""
        event.current_buffer.insert_text("\n")

    @kb.add("enter", filter=Condition(lambda: block_is_open(get_app().current_buffer.text)))
    def _in_block(event: KeyPressEvent) -> None:
        """Enter inside an open \"\"\" block starts the next line: the block is one input (and
        one history entry)."""
        event.current_buffer.insert_text("\n")

    return kb


@contextlib.contextmanager
def no_echo(stream: Any = None) -> Iterator[None]:
    """Keys typed while a reply streams are not echoed into it (they wait for the next prompt).

    Turns off the terminal's echo and line editing on ``stream`` (stdin) and restores them;
    Ctrl-C still interrupts. Does nothing when ``stream`` is not a terminal.
    """
    stream = sys.stdin if stream is None else stream
    try:
        import termios

        fd = stream.fileno()
        before = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        yield
        return
    quiet = list(before)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)  # lflags; ISIG stays: Ctrl-C still works
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)


def pending_keys(stream: Any = None) -> list[KeyPress]:
    """The keys already typed on ``stream`` (a terminal without line editing), read without
    waiting; none where it is not a terminal."""
    stream = sys.stdin if stream is None else stream
    try:
        fd = stream.fileno()
        if not os.isatty(fd):
            return []
        chunks = []
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    except (OSError, ValueError, AttributeError):
        return []
    keys: list[KeyPress] = []
    Vt100Parser(keys.append).feed_and_flush(b"".join(chunks).decode("utf-8", "replace"))
    return keys


def after_last_ctrl_c(keys: list[KeyPress]) -> list[KeyPress] | None:
    """The keys typed after the last Ctrl-C among ``keys`` (None: there is none). As the terminal
    does for a Ctrl-C that becomes a signal, the keys before it are dropped."""
    for i in range(len(keys) - 1, -1, -1):
        if keys[i].key == Keys.ControlC:
            return keys[i + 1 :]
    return None


class TerminalUI:
    """The interactive loop on a terminal.

    Args:
        session: the conversation.
        console: a Rich console for output (default: stdout, colour only where allowed).
        history: prompt history (default: the file in the user data directory).
        output: where the prompt is drawn (default: prompt-toolkit's, from the app session).
        notes: a Rich console for notes and command output (default: ``console``).
    """

    def __init__(
        self,
        session: Session,
        console: Any = None,
        history: History | None = None,
        output: Any = None,
        notes: Any = None,
    ) -> None:
        from rich.console import Console

        self.session = session
        self.console = console or Console(
            highlight=False, markup=False, emoji=False, soft_wrap=True, no_color=not color_allowed(sys.stdout)
        )
        self.notes = notes or self.console
        self.prompt: PromptSession[str] = PromptSession(
            history=history if history is not None else _history(),
            completer=SlashCompleter(),
            complete_while_typing=False,
            key_bindings=_key_bindings(),
            bottom_toolbar=self.toolbar,
            prompt_continuation="... ",
            output=output,
        )

    def toolbar(self) -> str:
        s = self.session
        tps = f"{s.tokens_per_second:.1f} tok/s" if s.tokens_per_second is not None else "- tok/s"
        return (
            f" {s.lm.name} | {s.lm.device} | {s.mode} | "
            f"context {s.context_tokens}/{s.window} | {tps}   /help for commands"
        )

    def note(self, text: str, error: bool = False) -> None:
        self.notes.print(text, style="red" if error else "dim")

    def run(self) -> None:
        """Read and answer turns until /exit or Ctrl-D."""
        self.note(f"{self.session.lm.name} on {self.session.lm.device}. /help for commands, Ctrl-D to leave.")
        while True:
            try:
                text = self.read()
            except KeyboardInterrupt:
                if not self.prompt.default_buffer.text:
                    self.note(LEAVE_HINT)
                continue
            except EOFError:
                return
            if not text.strip():
                continue
            if text.startswith("/") and "\n" not in text:
                outcome = self.session.command(text)
                self.show_outcome(outcome)
                if outcome.leave:
                    return
                continue
            try:
                self.reply(text)
            except KeyboardInterrupt:  # a second Ctrl-C before the stop began: still only a stop
                self.note("[stopped]")

    def read(self) -> str:
        """One input: a line, or a block between triple quotes (as in ollama); Enter inside an
        open block adds a line, so the block is one input and one history entry.

        Raises:
            KeyboardInterrupt: Ctrl-C. EOFError: Ctrl-D on an empty line.
        """
        return unblock(self.prompt.prompt(">>> "))

    def show_outcome(self, outcome: Outcome) -> None:
        if outcome.confirm is not None:  # a question: ask it, and run the command on yes
            try:
                answer = self.prompt.prompt(f"{outcome.text} [y/N] ", bottom_toolbar=None)
            except (KeyboardInterrupt, EOFError):  # Ctrl-C or Ctrl-D answers no; the session goes on
                answer = ""
            if answer.strip().lower() in ("y", "yes"):
                self.show_outcome(self.session.command(outcome.confirm))
            else:
                self.note("nothing saved")
        elif outcome.error:
            self.note(outcome.text, error=True)
        elif outcome.text:
            self.notes.print(outcome.text)

    def reply(self, text: str) -> None:
        """Stream the reply; Ctrl-C stops it and keeps what was shown."""
        pieces = self.session.respond(text)
        shown = typed_stop = False
        try:
            with no_echo():
                typed_stop = self.take_typed_ahead()
                if typed_stop:
                    raise KeyboardInterrupt
                for piece in trimmed(pieces):
                    self.console.out(piece, end="", highlight=False)
                    shown = True
        except KeyboardInterrupt:
            # A second Ctrl-C must not cut the stop short (and end the session): ignored meanwhile.
            with handled(signal.SIGINT, signal.SIG_IGN):
                if not typed_stop:  # a signal: the terminal dropped the keys typed before it; so do we
                    get_typeahead(self.prompt.input)
                pieces.close()  # commits the exchange with what was shown
                self.console.out("" if not shown else "\n", end="")
                self.note("[stopped]")
                self.console.out("")
            return
        self.console.out("\n")

    def take_typed_ahead(self) -> bool:
        """Whether a Ctrl-C was pressed while the prompt still held the terminal (just after
        Enter): it reached us as a key, not a signal. The keys typed after it (all of them when
        there is none) are kept for the next prompt.
        """
        typed = get_typeahead(self.prompt.input) + pending_keys()
        kept = after_last_ctrl_c(typed)
        store_typeahead(self.prompt.input, typed if kept is None else kept)
        return kept is not None


def terminal_ui(session: Session) -> TerminalUI:
    """The UI for a terminal on stdin; with stdout redirected, only replies go there (the prompt,
    notes and command output go to the terminal on stderr)."""
    from prompt_toolkit.output import create_output

    if sys.stdout is not None and sys.stdout.isatty():
        return TerminalUI(session)
    return TerminalUI(session, output=create_output(always_prefer_tty=True), notes=stderr_console())


def run_piped(session: Session, lines: Iterable[str]) -> None:
    """Each input line is a turn (a \"\"\" block is one); replies go to stdout as plain text,
    notes to stderr. A failing command ends the script (its replies so far are out).

    Raises:
        KeyboardInterrupt: Ctrl-C (after ending the reply's line).
        BadInputError: a slash command failed (exit 2), naming its line.
    """
    for number, text in script_inputs(iter(lines)):
        if not text.strip():
            continue
        if text.startswith("/") and "\n" not in text:
            outcome = session.command(text)
            if outcome.error or outcome.confirm is not None:
                hint = f"{outcome.confirm} does it without asking" if outcome.confirm else None
                raise BadInputError(f"line {number}: {text}: {outcome.text}", hint=hint)
            if outcome.text:
                sys.stderr.write(outcome.text + "\n")
                sys.stderr.flush()
            if outcome.leave:
                return
            continue
        pieces = session.respond(text)
        try:
            for piece in trimmed(pieces):
                write(piece)
        finally:
            pieces.close()
            write("\n")
