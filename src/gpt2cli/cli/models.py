"""`gpt2 models`: list, pull, inspect, verify and remove the models in the local cache."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gpt2cli.cli import options as opt
from gpt2cli.cli.help import HelpCommand, HelpGroup
from gpt2cli.cli.loading import status
from gpt2cli.cli.output import is_terminal, table, warn, write, write_json
from gpt2cli.errors import BadInputError, CorruptWeightsError

if TYPE_CHECKING:
    from gpt2cli.cache import CachedModel, VerifyReport

app = typer.Typer(
    name="models",
    cls=HelpGroup,
    help="Manage the models in the local Hugging Face cache: list, pull, info, verify, rm.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Format(str, Enum):
    text = "text"
    json = "json"


FormatOpt = Annotated[Format, typer.Option("--format", help="text (a table) or json (for scripts).")]
Name = Annotated[str, typer.Argument(help="Alias (gpt2, gpt2-medium, ...), org/name or org/name@revision.")]
NameOrDir = Annotated[
    str,
    typer.Argument(help="Alias (gpt2, ...), org/name[@revision], or a model directory (a finetune output)."),
]
_RIGHT = frozenset({3, 4, 5})  # PARAMS, SIZE, FILES


@app.command("list", cls=HelpCommand)
def list_models(output_format: FormatOpt = Format.text) -> None:
    """List the GPT-2-family models in the Hugging Face cache (alias: ls); partial ones say so."""
    from gpt2cli.cache import cache_dir, list_models

    models = list_models()
    if output_format is Format.json:
        write_json([m.to_dict() for m in models], pretty=True)
        return
    if not models:
        sys.stderr.write(f"no GPT-2 models in {cache_dir()}; try `gpt2 models pull gpt2`\n")
        return
    header = ["NAME", "REPO", "REVISION", "PARAMS", "SIZE", "FILES", "STATUS"]
    rows = [
        [
            m.name,
            m.repo_id,
            _revision(m),
            _params(m.parameters),
            human_size(m.size),
            str(len(m.files)),
            _state(m),
        ]
        for m in models
    ]
    table(header, rows, right=_RIGHT, drop=(1, 5, 2, 3))  # narrow: REPO, FILES, REVISION, PARAMS go
    for m in models:
        if not m.complete:
            missing = ", ".join(m.missing)
            warn(f"{m.name} is incomplete (missing {missing}): `gpt2 models pull {m.name}` completes it")


app.command("ls", hidden=True, cls=HelpCommand)(list_models)


def _state(m: CachedModel) -> str:
    return "ok" if m.complete else "incomplete"


@app.command("pull", cls=HelpCommand)
def pull(
    name: Name,
    offline: opt.Offline = False,
    allow_pickle: opt.AllowPickle = False,
    output_format: FormatOpt = Format.text,
) -> None:
    """Download NAME into the cache (only the files gpt2 needs); a no-op when it is complete."""
    from gpt2cli.cache import pull as pull_model

    result = pull_model(name, offline=offline, allow_pickle=allow_pickle, progress=True)
    if result.hub_error:
        warn(f"{result.hub_error}; the cached copy of {name} may not be the latest")
    if output_format is Format.json:
        write_json(result.to_dict(), pretty=True)
        return
    m = result.model
    if result.downloaded:
        what = f"downloaded {len(result.downloaded)} files, {human_size(result.bytes_downloaded)}"
    else:
        what = "up to date" if result.checked_hub else "cached (not checked against the Hub)"
    write(f"{name}: {m.repo_id}@{m.commit[:12]}, {human_size(m.size)}: {what}\n")


@app.command("info", cls=HelpCommand)
def info(name: NameOrDir, output_format: FormatOpt = Format.text) -> None:
    """Show NAME's architecture, parameter count, files with sha256, and where it lives."""
    from gpt2cli.cache import find_or_local, pick
    from gpt2cli.hub import parse_spec

    model = pick(find_or_local(name), parse_spec(name).revision)
    if output_format is Format.json:
        write_json(model.to_dict(), pretty=True)
        return
    _info_text(model)


def _info_text(m: CachedModel) -> None:
    c = m.config
    pairs = [
        ("name", m.name),
        ("repo", "(a local directory)" if m.local else m.repo_id),
        ("aliases", ", ".join(m.aliases) or "-"),
        ("revision", "-" if m.local else f"{_revision(m)} ({m.commit})"),
        ("path", str(m.snapshot)),
        ("layers", str(c.get("n_layer", "?"))),
        ("heads", str(c.get("n_head", "?"))),
        ("width", str(c.get("n_embd", "?"))),
        ("context", str(c.get("n_positions", "?"))),
        ("vocab", str(c.get("vocab_size", "?"))),
        ("parameters", f"{m.parameters:,}" if m.parameters is not None else "?"),
        ("dtype", m.dtype or "?"),
        ("size", human_size(m.size)),
        ("status", "complete" if m.complete else f"incomplete (missing {', '.join(m.missing)})"),
    ]
    table(None, [list(pair) for pair in pairs])
    files = [[f.name, human_size(f.size), f.algorithm or "-", f.digest or "-"] for f in m.files]
    write("files\n")
    table(None, files, right=frozenset({1}), indent="  ")


@app.command("verify", cls=HelpCommand)
def verify(
    name: Annotated[
        str | None,
        typer.Argument(help="A cached model or a model directory; none verifies every cached model."),
    ] = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Download corrupt, truncated or missing files again.")
    ] = False,
    output_format: FormatOpt = Format.text,
) -> None:
    """Check that every file a model needs is there and has the digest the Hub gave.

    Exits 1 when a file is missing, corrupt or truncated (and, with --repair, could not be
    repaired). A model directory has no digests: it is checked for missing and truncated files.
    """
    from gpt2cli.cache import verify as verify_model

    with status("verifying") as spinner:

        def on_file(model: str, file: str) -> None:
            if spinner is not None:
                spinner.update(f"verifying {model}: {file}")

        report = verify_model(name, repair=repair, on_file=on_file)
    if output_format is Format.json:
        write_json(report.to_dict(), pretty=True)
    else:
        _verify_text(report)
    if not report.ok:
        bad = [c.name for c in report.checks if c.bad]
        what = name or "the cache"
        again = f"gpt2 models verify {name} --repair" if name else "gpt2 models verify --repair"
        if name is not None and Path(name).expanduser().is_dir():  # no Hub source to repair from
            hint = "a model directory cannot be repaired: write or copy the model there again"
        else:
            hint = f"run `{again}`" if not repair else "check the disk and the connection, then retry"
        failed = f"{len(bad)} file(s) of {what} failed verification: {', '.join(bad)}"
        raise CorruptWeightsError(failed, hint=hint)


def _verify_text(report: VerifyReport) -> None:
    rows = []
    for c in report.checks:
        state = f"{c.status}, repaired" if c.repaired else c.status
        rows.append([state, c.model, c.name, human_size(c.size), c.expected or "-"])
    table(None, rows, right=frozenset({3}))


@app.command("rm", cls=HelpCommand)
def rm(
    names: Annotated[
        list[str], typer.Argument(help="Models to delete: alias, org/name (every revision) or org/name@rev.")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    output_format: FormatOpt = Format.text,
) -> None:
    """Delete NAMES from the cache (every cached revision, or only NAME@revision).

    Nothing is deleted unless every name is in the cache. Declining the question exits 0.
    """
    from gpt2cli.cache import plan_removal

    plans = [plan_removal(name) for name in names]  # every name checked before anything goes
    models = [m for plan in plans for m in plan.models]
    listing = ", ".join(f"{m.repo_id}@{m.commit[:12]}" for m in models)
    freeing = sum(plan.freed for plan in plans)
    if not yes:
        if not is_terminal(sys.stdin):
            raise BadInputError(
                f"refusing to delete {' '.join(names)} without confirmation (stdin is not a terminal)",
                hint=f"pass --yes: gpt2 models rm {' '.join(names)} --yes",
            )
        if not _confirm(f"Delete {listing} ({human_size(freeing)})?"):
            sys.stderr.write("nothing deleted\n")
            return
    freed = sum(plan.execute() for plan in plans)
    if output_format is Format.json:
        write_json({"removed": [m.to_dict() for m in models], "freed": freed}, pretty=True)
    else:
        write(f"removed {listing}: freed {human_size(freed)}\n")


def _confirm(question: str) -> bool:
    """Ask on stderr, read the answer from stdin; only y/yes agrees (EOF is no).

    Not ``typer.confirm(err=True)``: Click prints the prompt's last character (a space) through
    ``input()``, i.e. on stdout, which must carry only the product.
    """
    sys.stderr.write(f"{question} [y/N]: ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


# ---------------------------------------------------------------------------- rendering helpers
def human_size(n: int) -> str:
    """Bytes in decimal units, as the Hub shows them (548.1 MB)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover


def _params(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K"


def _revision(m: CachedModel) -> str:
    return ",".join(m.refs) if m.refs else m.commit[:12]
