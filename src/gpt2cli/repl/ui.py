"""The REPL's faces: a prompt-toolkit terminal UI (history, multi-line input, Tab completion,
bottom toolbar, Rich-rendered streaming) and a plain line-per-turn loop for piped stdin.

All conversation logic lives in ``repl.session``; this module only reads input and shows output.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from gpt2cli.cli.output import color_allowed, stderr_console, write
from gpt2cli.repl.session import COMMAND_NAMES, MODES, SETTINGS, Outcome, Session
from gpt2cli.text import trimmed

BLOCK = '"""'
LEAVE_HINT = "Use Ctrl-D or /bye to leave."


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
    """Completes slash commands, /set options and /mode values."""

    def get_completions(self, document: Document, complete_event: Any) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        head, _, rest = text.partition(" ")
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

    return kb


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
            self.reply(text)

    def read(self) -> str:
        """One input: a line, or a block between triple quotes (as in ollama).

        Raises:
            KeyboardInterrupt: Ctrl-C. EOFError: Ctrl-D on an empty line.
        """
        line = self.prompt.prompt(">>> ")
        if not line.lstrip().startswith(BLOCK):
            return line
        body = line.lstrip()[len(BLOCK) :]
        if body.rstrip().endswith(BLOCK):
            return body.rstrip()[: -len(BLOCK)]
        parts = [body] if body else []
        while True:
            more = self.prompt.prompt("... ")
            if more.rstrip().endswith(BLOCK):
                parts.append(more.rstrip()[: -len(BLOCK)])
                return "\n".join(parts).strip("\n")
            parts.append(more)

    def show_outcome(self, outcome: Outcome) -> None:
        if outcome.error:
            self.note(outcome.text, error=True)
        elif outcome.text:
            self.notes.print(outcome.text)

    def reply(self, text: str) -> None:
        """Stream the reply; Ctrl-C stops it and keeps what was shown."""
        pieces = self.session.respond(text)
        shown = False
        try:
            for piece in trimmed(pieces):
                self.console.out(piece, end="", highlight=False)
                shown = True
        except KeyboardInterrupt:
            pieces.close()  # commits the exchange with what was shown
            self.console.out("" if not shown else "\n", end="")
            self.note("[stopped]")
            self.console.out("")
            return
        self.console.out("\n")


def terminal_ui(session: Session) -> TerminalUI:
    """The UI for a terminal on stdin; with stdout redirected, only replies go there (the prompt,
    notes and command output go to the terminal on stderr)."""
    from prompt_toolkit.output import create_output

    if sys.stdout is not None and sys.stdout.isatty():
        return TerminalUI(session)
    return TerminalUI(session, output=create_output(always_prefer_tty=True), notes=stderr_console())


def run_piped(session: Session, lines: Iterable[str]) -> None:
    """Each input line is a turn; replies go to stdout as plain text, notes to stderr.

    Raises:
        KeyboardInterrupt: Ctrl-C (after ending the reply's line).
    """
    for line in lines:
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            outcome = session.command(text)
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
