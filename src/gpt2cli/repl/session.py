"""The state of one REPL conversation, with no UI: turns kept as token ids, the two modes,
slash commands, settings, the context window, and JSON transcripts.

The conversation is held as token ids (each turn's prompt ids plus the ids the model
generated), and every turn passes the whole context to ``LM.stream`` as ids, with the
session's own ``PromptCache``: the stream reuses the longest prefix it shares with the ids the
cache holds, so a new turn runs only its new tokens. When the context would pass the model's
window, the oldest whole exchanges leave it (GPT-2's positions are absolute, so that costs one full prefill).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2cli.chat import TEMPLATES, ChatTemplate, Message, pick_template
from gpt2cli.config import GenerationConfig
from gpt2cli.errors import BadInputError, Gpt2Error
from gpt2cli.kvcache import PromptCache

if TYPE_CHECKING:
    from gpt2cli.api import LM, GenerationResult

MODES = ("chat", "complete")
TRANSCRIPT_FORMAT = "gpt2cli-repl-transcript"

# /set names -> (parser, GenerationConfig field); "none" clears the optional ones.
SETTINGS: dict[str, type] = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "max_new_tokens": int,
    "seed": int,
}
_OPTIONAL = {"top_k", "top_p", "min_p", "repetition_penalty", "seed"}
SET_NAMES = {key: key for key in SETTINGS}  # messages name values as /set takes them


@dataclass
class Turn:
    """One turn: what the user typed or the model replied, and the ids it adds to the context."""

    role: str  # "user" or "assistant"
    content: str
    ids: list[int]
    mode: str = "chat"

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, "mode": self.mode, "tokens": self.ids}


@dataclass
class Outcome:
    """What a slash command answers: text to show, whether it is an error, whether to leave.

    ``confirm``: the command to run if the user agrees to the question in ``text`` (a terminal
    asks; a script cannot, so it is an error there).
    """

    text: str = ""
    error: bool = False
    leave: bool = False
    confirm: str | None = None


@dataclass
class Command:
    name: str
    usage: str
    help: str
    run: Callable[[Session, str], Outcome]
    aliases: tuple[str, ...] = field(default_factory=tuple)


class Session:
    """A conversation with one loaded model.

    Args:
        lm: the loaded model (the session's ``cache`` keeps its keys/values across turns).
        cfg: sampling settings; ``stop`` and ``num_samples`` are set per turn.
        template: how chat turns are written.
        mode: "chat" (transcript turns) or "complete" (continue the running text).
    """

    def __init__(self, lm: LM, cfg: GenerationConfig, template: ChatTemplate, mode: str = "chat") -> None:
        if mode not in MODES:
            raise BadInputError(f"unknown mode {mode!r}", hint=f"use one of: {', '.join(MODES)}")
        self.lm = lm
        self.cfg = dataclasses.replace(cfg, num_samples=1).validate()
        self.template = template
        self.mode = mode
        self.turns: list[Turn] = []
        self.start = 0  # turns[:start] have left the window
        self.last_result: GenerationResult | None = None
        self.warn: Callable[[str], None] | None = None
        self.cache = PromptCache()  # ids + keys/values of the conversation so far

    # --- context -------------------------------------------------------------------------

    @property
    def window(self) -> int:
        return self.lm.window

    @property
    def context_ids(self) -> list[int]:
        return [i for turn in self.turns[self.start :] for i in turn.ids]

    @property
    def context_tokens(self) -> int:
        return sum(len(turn.ids) for turn in self.turns[self.start :])

    @property
    def tokens_per_second(self) -> float | None:
        return self.last_result.tokens_per_second if self.last_result else None

    def _fit(self, new_tokens: int) -> None:
        """Drop the oldest whole exchanges until the context, the new turn and room to reply fit."""
        reserve = min(self.cfg.max_new_tokens, self.window // 2)
        used = self.context_tokens
        while self.start < len(self.turns) and used + new_tokens + reserve > self.window:
            used -= len(self.turns[self.start].ids)
            self.start += 1
            # a reply leaves with the input it answered
            if self.start < len(self.turns) and self.turns[self.start].role == "assistant":
                used -= len(self.turns[self.start].ids)
                self.start += 1

    # --- turns ---------------------------------------------------------------------------

    def respond(self, text: str) -> Generator[str, None, None]:
        """Add the user's ``text`` and stream the reply's text pieces.

        The exchange is committed when the stream ends, is closed, or is interrupted (Ctrl-C
        inside it): what was yielded stays in the context, the rest is dropped.
        """
        from gpt2cli.api import TextPiece

        user, prefix, suffix = self._user_turn(text)
        self._fit(len(user.ids) + len(prefix))
        prompt = self.context_ids + user.ids + prefix
        cfg = dataclasses.replace(self.cfg, stop=self.template.stop if self.mode == "chat" else ())
        shown: list[str] = []
        result: GenerationResult | None = None
        try:
            for event in self.lm.stream(prompt, cfg, warn=self.warn, cache=self.cache):
                if isinstance(event, TextPiece):
                    yield event.text
                    # Only once the consumer asks for more has it shown this piece: a Ctrl-C
                    # between the yield and the print closes us here, and the piece is dropped.
                    shown.append(event.text)
                else:
                    result = event
        finally:
            self._commit(user, prompt, prefix, suffix, "".join(shown), result)

    def _user_turn(self, text: str) -> tuple[Turn, list[int], list[int]]:
        """The user's turn, and the ids that open and close the reply in this mode."""
        if self.mode == "complete":
            running = "".join(t.content for t in self.turns)
            if running and not running[-1].isspace() and text and not text[0].isspace():
                text = " " + text  # words typed on their own line join the running text
            return Turn("user", text, self.lm.encode(text), "complete"), [], []
        message: Message = {"role": "user", "content": text}
        user = Turn("user", text, self.lm.encode(self.template.turn(message)), "chat")
        prefix = self.template.reply_prefix()
        marker = "\x00"
        after = self.template.turn({"role": "assistant", "content": marker}).split(marker, 1)[1]
        return user, self.lm.encode(prefix), self.lm.encode(after)

    def _commit(
        self,
        user: Turn,
        prompt: list[int],
        prefix: list[int],
        suffix: list[int],
        text: str,
        result: GenerationResult | None,
    ) -> None:
        if result is not None:
            generated = result.samples[0].token_ids
            self.last_result = result
        else:  # interrupted: the prompt cache holds the ids fed so far
            cached = self.cache.ids
            generated = cached[len(prompt) :] if cached[: len(prompt)] == prompt else []
        if self.mode == "chat":
            text = text.rstrip()
            content = self.template.clean_reply(text)
        else:
            content = text
        ids = prefix + self._ids_for_text(generated, text) + suffix
        self.turns += [user, Turn("assistant", content, ids, self.mode)]

    def _ids_for_text(self, generated: list[int], text: str) -> list[int]:
        """The generated ids that spell ``text``; a tail a stop string cut through is re-encoded.

        Keeping the model's own ids (not a re-encoding) is what lets the next turn reuse the cache.
        """
        target = text.encode("utf-8")
        spelled = b""
        kept: list[int] = []
        for token in generated:
            piece = self.lm.tokenizer.token_bytes(token)
            if not target.startswith(spelled + piece):
                break
            spelled += piece
            kept.append(token)
        while kept:  # never split a character between kept ids and the re-encoded rest
            try:
                target[len(spelled) :].decode("utf-8")
                break
            except UnicodeDecodeError:
                spelled = spelled[: -len(self.lm.tokenizer.token_bytes(kept.pop()))]
        rest = target[len(spelled) :].decode("utf-8", errors="replace")
        return kept + (self.lm.encode(rest) if rest else [])

    # --- slash commands ------------------------------------------------------------------

    def command(self, line: str) -> Outcome:
        """Run a slash command line (``/set top_k 20``); errors come back as one line."""
        name, _, arg = line.strip().partition(" ")
        cmd = COMMAND_INDEX.get(name.lower())
        if cmd is None:
            return Outcome(f"unknown command {name}: type /help for the commands", error=True)
        try:
            return cmd.run(self, arg.strip())
        except Gpt2Error as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            return Outcome(f"{exc.message}{hint}", error=True)

    def set_option(self, name: str, raw: str) -> None:
        """Change one sampling setting.

        Raises:
            BadInputError: unknown option or a value out of range.
        """
        key = name.replace("-", "_").lower()
        if key not in SETTINGS:
            raise BadInputError(f"unknown setting {name!r}", hint=f"one of: {', '.join(SETTINGS)}")
        value: Any
        if raw.lower() == "none" and key in _OPTIONAL:
            value = None
        else:
            try:
                value = SETTINGS[key](raw)
            except ValueError:
                kind = "an integer" if SETTINGS[key] is int else "a number"
                raise BadInputError(f"{key} must be {kind}, got {raw!r}") from None
        self.cfg = dataclasses.replace(self.cfg, **{key: value}).validate(names=SET_NAMES)

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self.cfg, key) for key in SETTINGS}

    def show(self) -> str:
        t = self.template
        lines = [
            f"model:    {self.lm.name}",
            f"device:   {self.lm.device} ({str(self.lm.dtype).removeprefix('torch.')})",
            f"mode:     {self.mode} (template {t.kind}, {t.user_name} / {t.bot_name})",
            "settings: " + " ".join(f"{k}={v}" for k, v in self.settings().items()),
            f"context:  {self.context_tokens}/{self.window} tokens, {len(self.turns) - self.start} turns",
        ]
        if self.start:
            lines.append(f"          {self.start} earlier turns dropped to fit the window")
        return "\n".join(lines)

    def reset(self) -> None:
        self.turns, self.start = [], 0

    def undo(self) -> bool:
        """Drop the last exchange; False when there is none."""
        if not self.turns:
            return False
        if self.turns[-1].role == "assistant":
            self.turns.pop()
        if self.turns and self.turns[-1].role == "user":
            self.turns.pop()
        self.start = min(self.start, len(self.turns))
        return True

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise BadInputError(f"unknown mode {mode!r}", hint=f"use one of: {', '.join(MODES)}")
        self.mode = mode

    # --- transcripts ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        t = self.template
        return {
            "format": TRANSCRIPT_FORMAT,
            "version": 1,
            "model": self.lm.name,
            "mode": self.mode,
            "template": {"kind": t.kind, "user_name": t.user_name, "bot_name": t.bot_name},
            "settings": self.settings(),
            "dropped": self.start,
            "turns": [turn.to_json() for turn in self.turns],
        }

    def save(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write the transcript as JSON.

        Raises:
            Gpt2Error: the file cannot be written (or exists, without ``overwrite``).
        """
        path = Path(path).expanduser()
        if not overwrite and path.exists():
            raise Gpt2Error(f"{path} exists", hint=f"/save! {path} overwrites it")
        try:
            path.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n", "utf-8")
        except OSError as exc:
            raise Gpt2Error(f"cannot save to {path}: {exc.strerror or exc}") from None
        return path

    def load(self, path: str | Path) -> Path:
        """Replace the conversation, mode, template and settings with a saved transcript's.

        Raises:
            BadInputError: the file is missing, not JSON, or not a transcript.
        """
        path = Path(path).expanduser()
        try:
            raw = json.loads(path.read_text("utf-8"))
        except OSError as exc:
            raise BadInputError(f"cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise BadInputError(f"{path} is not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != TRANSCRIPT_FORMAT:
            raise BadInputError(f"{path} is not a gpt2 repl transcript", hint="save one with /save FILE")
        try:
            self._restore(raw)
        except BadInputError as exc:  # a template or setting out of range: say which file
            hint = exc.hint if exc.hint and "--" not in exc.hint else "fix that value in the file"
            raise BadInputError(f"{path}: {exc.message}", hint=hint) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadInputError(f"{path} is not a valid transcript: {exc}") from None
        return path

    def _restore(self, raw: dict[str, Any]) -> None:
        spec = raw.get("template") or {}
        template = pick_template(
            self.lm.name,
            spec.get("kind", self.template.kind),
            spec.get("user_name", self.template.user_name),
            spec.get("bot_name", self.template.bot_name),
        )
        settings = {k: v for k, v in raw.get("settings", {}).items() if k in SETTINGS}
        cfg = dataclasses.replace(self.cfg, **settings)
        mode = raw.get("mode", self.mode)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        turns = [self._turn_from_json(t, template) for t in raw["turns"]]
        dropped = int(raw.get("dropped", 0))
        self.cfg, self.template, self.mode = cfg.validate(names=SET_NAMES), template, mode
        self.turns, self.start = turns, min(max(dropped, 0), len(turns))

    def _turn_from_json(self, raw: dict[str, Any], template: ChatTemplate) -> Turn:
        role, content, mode = raw["role"], raw["content"], raw.get("mode", "chat")
        if role not in ("user", "assistant") or not isinstance(content, str) or mode not in MODES:
            raise ValueError(f"bad turn {raw!r:.60}")
        ids = raw.get("tokens")
        if ids is None:  # hand-written transcripts: write the turn as the template would
            text = content if mode == "complete" else template.turn({"role": role, "content": content})
            ids = self.lm.encode(text)
        try:
            self.lm.tokenizer.check_ids(ids)
        except BadInputError as exc:
            raise ValueError(exc.message) from None
        return Turn(role, content, list(ids), mode)


def _help(session: Session, arg: str) -> Outcome:
    usages = [", ".join([c.usage, *c.aliases]) for c in COMMANDS]
    width = max(len(u) for u in usages)
    lines = [f"{u:<{width}}  {c.help}" for u, c in zip(usages, COMMANDS, strict=True)]
    lines += [
        "",
        f"/set options: {', '.join(SETTINGS)} ('none' clears top_k, top_p, min_p, repetition_penalty, seed)",
        'Multi-line input: start and end with """, or Alt-Enter for a new line. Ctrl-D leaves.',
    ]
    return Outcome("\n".join(lines))


def _set(session: Session, arg: str) -> Outcome:
    words = arg.split()
    if len(words) != 2:
        return Outcome(f"usage: /set OPTION VALUE (options: {', '.join(SETTINGS)})", error=True)
    name, value = words
    session.set_option(name, value)
    key = name.replace("-", "_").lower()
    value = getattr(session.cfg, key)
    if value is None:  # cleared ('none', or a seed of -1)
        return Outcome(f"set {key} to none" + (" (a random seed each reply)" if key == "seed" else ""))
    return Outcome(f"set {key} to {value}")


def _show(session: Session, arg: str) -> Outcome:
    return Outcome(session.show())


def _reset(session: Session, arg: str) -> Outcome:
    session.reset()
    return Outcome("conversation cleared")


def _undo(session: Session, arg: str) -> Outcome:
    if not session.undo():
        return Outcome("nothing to undo", error=True)
    return Outcome("dropped the last exchange")


def _save(session: Session, arg: str) -> Outcome:
    if not arg:
        return Outcome("usage: /save FILE", error=True)
    if Path(arg).expanduser().is_dir():
        return Outcome(f"{arg} is a folder: give a file name (/save {Path(arg) / 'chat.json'})", error=True)
    if Path(arg).expanduser().exists():
        return Outcome(f"{arg} exists: overwrite it?", error=True, confirm=f"/save! {arg}")
    return Outcome(f"saved {len(session.turns)} turns to {session.save(arg, overwrite=False)}")


def _save_over(session: Session, arg: str) -> Outcome:
    if not arg:
        return Outcome("usage: /save! FILE", error=True)
    return Outcome(f"saved {len(session.turns)} turns to {session.save(arg)}")


def _load(session: Session, arg: str) -> Outcome:
    if not arg:
        return Outcome("usage: /load FILE", error=True)
    path = session.load(arg)
    return Outcome(f"loaded {len(session.turns)} turns from {path} (mode {session.mode})")


def _mode(session: Session, arg: str) -> Outcome:
    if not arg:  # no argument: say which mode this is
        return Outcome(f"mode: {session.mode} (/mode {' or /mode '.join(MODES)} switches)")
    session.set_mode(arg.lower())
    return Outcome(f"mode: {session.mode}")


def _exit(session: Session, arg: str) -> Outcome:
    return Outcome(leave=True)


COMMANDS = [
    Command("/help", "/help", "show this help", _help, ("/?",)),
    Command("/set", "/set OPTION VALUE", "change a sampling setting", _set),
    Command("/show", "/show", "model, device, settings and context use", _show),
    Command("/reset", "/reset", "forget the conversation", _reset, ("/clear",)),
    Command("/undo", "/undo", "drop the last exchange", _undo),
    Command("/save", "/save FILE", "save the conversation as JSON (asks before overwriting)", _save),
    Command("/save!", "/save! FILE", "save, overwriting FILE", _save_over),
    Command("/load", "/load FILE", "load a saved transcript (with its mode and settings)", _load),
    Command("/mode", "/mode [chat|complete]", "show the mode, or switch between chat and completion", _mode),
    Command("/exit", "/exit", "leave (Ctrl-D too)", _exit, ("/quit", "/bye")),
]
COMMAND_INDEX = {name: c for c in COMMANDS for name in (c.name, *c.aliases)}
COMMAND_NAMES = sorted(COMMAND_INDEX)


def make_session(
    lm: LM,
    cfg: GenerationConfig,
    *,
    template: str | None = None,
    user_name: str = "User",
    bot_name: str = "Assistant",
    mode: str = "chat",
) -> Session:
    """A session with the template picked for ``lm`` (DialoGPT for DialoGPT models).

    Raises:
        BadInputError: unknown template or mode, or bad speaker names.
    """
    if template is not None and template not in TEMPLATES:
        raise BadInputError(f"unknown chat template {template!r}", hint=f"use one of: {', '.join(TEMPLATES)}")
    return Session(lm, cfg, pick_template(lm.name, template, user_name, bot_name), mode)


BLOCK = '"""'


def block_is_open(text: str) -> bool:
    """Whether ``text`` opens a triple-quoted block (as in ollama) that it has not closed yet."""
    stripped = text.lstrip()
    return stripped.startswith(BLOCK) and not stripped[len(BLOCK) :].rstrip().endswith(BLOCK)


def unblock(text: str) -> str:
    """The text inside a triple-quoted block (newlines kept), or ``text`` itself if it is none."""
    stripped = text.lstrip()
    if not stripped.startswith(BLOCK):
        return text
    body = stripped[len(BLOCK) :].rstrip()
    if body.endswith(BLOCK):
        body = body[: -len(BLOCK)]
    return body.strip("\n")


def script_inputs(lines: Iterator[str]) -> Iterator[tuple[int, str]]:
    """(line number, input) for a piped script: each line is an input, a block is one."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if pending:
            pending.append(line)
            if not block_is_open("\n".join(pending)):
                yield start, unblock("\n".join(pending))
                pending = []
        elif block_is_open(line):
            pending, start = [line], number
        else:
            yield number, unblock(line)
    if pending:  # a block never closed: what was typed is still a turn
        yield start, unblock("\n".join(pending))
