"""How ``--help`` pages look: options grouped under headings, plain metavars, examples verbatim.

Typer's plain (non-Rich) help lists every option under one "Options" heading with metavars
such as ``<list[str]>`` or ``<int range>``. ``HelpCommand`` groups options by their
``rich_help_panel`` (Model, Sampling, Output, Performance...), names values as a person would
(``TEXT``, ``INTEGER``, ``NUMBER``, ``PATH``, ``text|json``) and prints the epilog as written.
"""

from __future__ import annotations

import re
from typing import Any

from typer._click import Context, HelpFormatter
from typer.core import TyperCommand, TyperGroup

_TYPE_WORDS = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "path": "PATH", "Path": "PATH"}
_TYPE = re.compile(r"^<(?:list\[)?(?P<inner>[^\]>]+?)(?: range)?\]?>$")


def plain_metavar(display: str) -> str:
    """``<list[str]>`` -> ``TEXT``, ``<int range>`` -> ``INTEGER``, ``<a|b>`` -> ``a|b``."""
    match = _TYPE.match(display)
    if match is None:
        return display
    inner = match.group("inner")
    return _TYPE_WORDS.get(inner, inner if "|" in inner else inner.upper())


def _set_metavars(command: Any, ctx: Context) -> None:
    for param in command.get_params(ctx):
        if param.metavar is not None or getattr(param, "is_flag", False):
            continue
        if param.param_type_name == "argument":
            param.metavar = param.name.upper()
        elif hasattr(param, "display_type"):
            param.metavar = plain_metavar(param.display_type(ctx))


class HelpCommand(TyperCommand):
    """A command whose help groups options under their panel names and keeps the epilog as written."""

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        _set_metavars(self, ctx)
        super().format_help(ctx, formatter)

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        args: list[tuple[str, str]] = []
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":  # its name says what it is: no <type> after it
                name = param.metavar or (param.name or "").upper()
                args.append((name + ("..." if param.nargs != 1 else ""), record[1]))
            else:
                groups.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        # "Options" (the unpanelled ones, --help among them) comes last
        for name in sorted(groups, key=lambda n: n == "Options"):
            with formatter.section(name if name == "Options" else f"{name} options"):
                formatter.write_dl(groups[name])

    def format_epilog(self, ctx: Context, formatter: HelpFormatter) -> None:
        if self.epilog:
            formatter.write("\n")
            for line in self.epilog.strip("\n").splitlines():
                formatter.write(f"{' ' * formatter.current_indent}{line}\n" if line else "\n")


class HelpGroup(TyperGroup):
    """A command group whose summaries of subcommands are never cut short."""

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            rows.append((name, first_sentence(command.help or "")))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def first_sentence(text: str) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join(text.strip().split("\n\n", 1)[0].split())
