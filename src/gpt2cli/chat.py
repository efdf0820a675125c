"""Chat templates: turning a list of messages into the text a GPT-2 model continues.

GPT-2 has no chat format of its own, so the default is a plain transcript
(``User: ...`` / ``Assistant: ...``); DialoGPT-style models expect turns separated by
``<|endoftext|>``. The REPL and the server share these, so a conversation reads the same in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

from gpt2cli.errors import BadInputError

ENDOFTEXT = "<|endoftext|>"
TEMPLATES = ("transcript", "dialogpt")
Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    """How turns are written; ``stop`` lists the texts that end a reply (never shown)."""

    kind: str = "transcript"
    user_name: str = "User"
    bot_name: str = "Assistant"

    def turn(self, message: Message) -> str:
        """The text of one finished turn."""
        content = message["content"]
        if self.kind == "dialogpt":
            return content + ENDOFTEXT if message["role"] != "system" else ""
        if message["role"] == "system":
            return content.strip() + "\n\n"
        name = self.user_name if message["role"] == "user" else self.bot_name
        return f"{name}: {content.strip()}\n"

    def reply_prefix(self) -> str:
        """What precedes the model's reply (the model continues after it)."""
        return "" if self.kind == "dialogpt" else f"{self.bot_name}:"

    def render(self, messages: Sequence[Message], *, add_reply_prefix: bool = True) -> str:
        """The whole conversation as text, ending where the model's reply should begin."""
        text = "".join(self.turn(m) for m in messages)
        return text + (self.reply_prefix() if add_reply_prefix else "")

    @property
    def stop(self) -> tuple[str, ...]:
        """Texts that mean the model has started the user's next turn."""
        if self.kind == "dialogpt":
            return ()  # the reply ends at <|endoftext|>, which the engine treats as EOS
        return (f"\n{self.user_name}:", f"\n{self.bot_name}:")

    def clean_reply(self, text: str) -> str:
        """A reply as shown and stored: without the space after ``Assistant:`` or trailing blanks."""
        return text.strip()


def pick_template(
    model_name: str, kind: str | None = None, user_name: str = "User", bot_name: str = "Assistant"
) -> ChatTemplate:
    """The template for ``model_name``: ``kind`` if given, DialoGPT for DialoGPT models.

    Raises:
        BadInputError: unknown template, empty/multi-line speaker names, or one name for both.
    """
    if kind is None:
        kind = "dialogpt" if "dialogpt" in model_name.lower() else "transcript"
    if kind not in TEMPLATES:
        raise BadInputError(f"unknown chat template {kind!r}", hint=f"use one of: {', '.join(TEMPLATES)}")
    for name in (user_name, bot_name):
        if not name.strip() or "\n" in name or ":" in name:
            raise BadInputError(f"speaker name {name!r} must be one line, non-empty, without ':'")
    if user_name.strip() == bot_name.strip():
        # The reply ends where the user's next turn starts: one name would end it at once.
        raise BadInputError(
            f"the user and the model are both named {user_name.strip()!r}",
            hint="give --user-name and --bot-name different names",
        )
    return ChatTemplate(kind, user_name.strip(), bot_name.strip())
