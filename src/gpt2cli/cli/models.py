"""`gpt2 models`: list, pull, inspect, verify and remove the models in the local cache."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpt2cli.cli import options as opt
from gpt2cli.cli.output import is_terminal, stderr_console, warn, write, write_json
from gpt2cli.errors import BadInputError, CorruptWeightsError, Gpt2Error

if TYPE_CHECKING:
    from gpt2cli.cache import CachedModel, VerifyReport

app = typer.Typer(
    name="models",
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


@app.command("list")
def list_models(output_format: FormatOpt = Format.text) -> None:
    """List the GPT-2-family models in the Hugging Face cache."""
    from gpt2cli.cache import cache_dir, list_models

    models = list_models()
    if output_format is Format.json:
        write_json([m.to_dict() for m in models], pretty=True)
        return
    if not models:
        sys.stderr.write(f"no GPT-2 models in {cache_dir()}; try `gpt2 models pull gpt2`\n")
        return
    rows = [["NAME", "REPO", "REVISION", "PARAMS", "SIZE", "FILES"]]
    rows += [
        [m.name, m.repo_id, _revision(m), _params(m.parameters), human_size(m.size), str(len(m.files))]
        for m in models
    ]
    write(table(rows))


@app.command("pull")
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


@app.command("info")
def info(name: Name, output_format: FormatOpt = Format.text) -> None:
    """Show NAME's architecture, parameter count, files with sha256, and where it lives."""
    from gpt2cli.cache import find, pick
    from gpt2cli.hub import parse_spec

    model = pick(find(name), parse_spec(name).revision)
    if output_format is Format.json:
        write_json(model.to_dict(), pretty=True)
        return
    write(_info_text(model))


def _info_text(m: CachedModel) -> str:
    c = m.config
    pairs = [
        ("name", m.name),
        ("repo", m.repo_id),
        ("aliases", ", ".join(m.aliases) or "-"),
        ("revision", f"{_revision(m)} ({m.commit})"),
        ("path", str(m.snapshot)),
        ("layers", str(c.get("n_layer", "?"))),
        ("heads", str(c.get("n_head", "?"))),
        ("width", str(c.get("n_embd", "?"))),
        ("context", str(c.get("n_positions", "?"))),
        ("vocab", str(c.get("vocab_size", "?"))),
        ("parameters", f"{m.parameters:,}" if m.parameters is not None else "?"),
        ("dtype", m.dtype or "?"),
        ("size", human_size(m.size)),
    ]
    width = max(len(k) for k, _ in pairs)
    text = "".join(f"{k.ljust(width)}  {v}\n" for k, v in pairs)
    files = [[f.name, human_size(f.size), f.algorithm or "-", f.digest or "-"] for f in m.files]
    return text + "files\n" + table(files, indent="  ")


@app.command("verify")
def verify(
    name: Name,
    repair: Annotated[
        bool, typer.Option("--repair", help="Download corrupt or truncated files again.")
    ] = False,
    output_format: FormatOpt = Format.text,
) -> None:
    """Recompute each cached file's digest and compare it with the one the Hub gave.

    Exits 1 when a file is corrupt or truncated (and, with --repair, could not be repaired).
    """
    from gpt2cli.cache import verify as verify_model

    with _status("verifying") as status:

        def on_file(model: str, file: str) -> None:
            if status is not None:
                status.update(f"verifying {model}: {file}")

        report = verify_model(name, repair=repair, on_file=on_file)
    if output_format is Format.json:
        write_json(report.to_dict(), pretty=True)
    else:
        write(_verify_text(report))
    if not report.ok:
        bad = [c.name for c in report.checks if c.bad]
        raise CorruptWeightsError(
            f"{len(bad)} cached file(s) of {name} failed verification: {', '.join(bad)}",
            hint=f"run `gpt2 models verify {name} --repair`" if not repair else "check the disk, then retry",
        )


def _verify_text(report: VerifyReport) -> str:
    rows = []
    for c in report.checks:
        status = f"{c.status}, repaired" if c.repaired else c.status
        rows.append([status, c.model, c.name, human_size(c.size), c.expected or "-"])
    return table(rows)


@app.command("rm")
def rm(
    name: Name,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    output_format: FormatOpt = Format.text,
) -> None:
    """Delete NAME from the cache (every cached revision, or only NAME@revision)."""
    from gpt2cli.cache import plan_removal

    plan = plan_removal(name)
    listing = ", ".join(f"{m.repo_id}@{m.commit[:12]}" for m in plan.models)
    if not yes:
        if not is_terminal(sys.stdin):
            raise BadInputError(
                f"refusing to delete {name} without confirmation (stdin is not a terminal)",
                hint=f"pass --yes: gpt2 models rm {name} --yes",
            )
        if not _confirm(f"Delete {listing} ({human_size(plan.freed)})?"):
            raise Gpt2Error(f"kept {name}: nothing deleted")
    freed = plan.execute()
    if output_format is Format.json:
        write_json({"removed": [m.to_dict() for m in plan.models], "freed": freed}, pretty=True)
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
def table(rows: list[list[str]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces (plain text: it reads the same piped)."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "".join(f"{indent}{line}\n" for line in lines)


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


def _status(text: str) -> AbstractContextManager[Any]:
    """A spinner on stderr while hashing, on a terminal only."""
    if not is_terminal(sys.stderr):
        return nullcontext(None)
    return stderr_console().status(text)
