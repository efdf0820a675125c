"""The output directory: a Hugging Face-layout checkpoint written atomically, plus our training state.

A checkpoint is written into a hidden sibling temp directory and renamed into place, so the
output path never holds a half-written model. ``training_state.pt`` (read back with
``weights_only=True``) marks the directory as ours and holds what ``--resume`` needs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from gpt2cli.config import GPT2Config
from gpt2cli.errors import BadInputError, CorruptWeightsError
from gpt2cli.tensorfile import umask
from gpt2cli.weights import to_hub_layout

STATE_FILE = "training_state.pt"
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def is_ours(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def check_output_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an output path we must not write to.

    Raises:
        BadInputError: it is a file; it holds something else and --overwrite is not given;
            --resume without a checkpoint of ours there.
    """
    if path.exists() and not path.is_dir():
        raise BadInputError(f"output {path} exists and is not a directory")
    if resume:
        if not is_ours(path):
            raise BadInputError(
                f"nothing to resume: {path} holds no gpt2 finetune checkpoint",
                hint="drop --resume to start a new run",
            )
        return
    if path.is_dir() and any(path.iterdir()) and not is_ours(path) and not overwrite:
        raise BadInputError(
            f"output directory {path} exists and is not a gpt2 finetune checkpoint",
            hint="choose another --output, or pass --overwrite to replace it",
        )
    _check_writable(path.absolute().parent, path)


def _check_writable(parent: Path, path: Path) -> None:
    """Make ``parent`` (as ``save`` will) and write a probe there, before any step is trained:
    a run must not find out at its end that its output cannot be written.

    Raises:
        BadInputError: ``parent`` cannot be made, or a directory cannot be made in it.
    """
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=parent))
    except OSError as exc:
        raise BadInputError(
            f"cannot write --output {path}: {exc.strerror or exc} ({exc.filename or parent})",
            hint="choose an --output in a folder you can write",
        ) from exc


def save(
    path: Path,
    *,
    state: dict[str, torch.Tensor],
    config: GPT2Config,
    tokenizer_dir: Path,
    readme: str,
    training_state: dict[str, Any],
) -> None:
    """Write the checkpoint to ``path`` atomically (replacing what is there).

    ``state`` is in our layout (``weights.expected_shapes`` names); it is saved in the Hub's.
    """
    from safetensors.torch import save_file

    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700; the output gets the usual mode
    try:
        hub = {k: v.float().cpu().contiguous() for k, v in to_hub_layout(state).items()}
        save_file(hub, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask())  # safetensors makes it 0600
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, tmp / name)
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        torch.save(training_state, tmp / STATE_FILE)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is moved aside first, then removed."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rmdir(old)
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(path: Path) -> dict[str, Any]:
    """Read ``training_state.pt`` safely (``weights_only=True``: tensors and plain values only).

    Raises:
        CorruptWeightsError: the file cannot be read.
    """
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds; all mean "unreadable"
        raise CorruptWeightsError(f"cannot read {path / STATE_FILE}: {exc}") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CorruptWeightsError(f"{path / STATE_FILE} is not a training state")
    return state


def readme_text(
    *, settings: dict[str, Any], config: GPT2Config, step: int, total_steps: int, val: dict[str, float]
) -> str:
    """The model card: how it was trained and how well it does on the held-out data."""
    finished = step >= total_steps
    lines = [
        "---",
        "library_name: gpt2cli",
        "tags: [gpt2, text-generation]",
        "---",
        "",
        f"# {Path(settings['output']).name}",
        "",
        f"A GPT-2 ({config.n_layer} layers, {config.n_head} heads, {config.n_embd} dims, "
        f"{config.n_positions} positions) trained with `gpt2 finetune`.",
        "",
        f"- Status: {'finished' if finished else 'checkpoint'} at step {step} of {total_steps}",
    ]
    if val:
        lines.append(
            f"- Final held-out loss: {val['loss']:.4f}, perplexity: {val['perplexity']:.3f}"
            if finished
            else f"- Held-out loss at the last evaluation: {val['loss']:.4f}, "
            f"perplexity: {val['perplexity']:.3f}"
        )
    lines += ["", "## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in settings.items()]
    lines += [
        "",
        "Load it with `gpt2 generate -m DIR` or transformers' `GPT2LMHeadModel.from_pretrained(DIR)`.",
        "",
    ]
    return "\n".join(lines)
