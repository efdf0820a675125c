"""Model specs to local snapshots: aliases, ``org/name@rev``, local directories, the HF cache.

Only the files the engine needs are ever downloaded (never the TF/Flax/ONNX/... weights the
big repos also hold). Offline (``--offline`` or ``HF_HUB_OFFLINE=1``) never touches the network.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2cli.errors import (
    BadInputError,
    Gpt2Error,
    ModelNotFoundError,
    NetworkError,
    OfflineMissError,
    UnsafeWeightsError,
)

ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
CONFIG_FILES = ("config.json", "vocab.json", "merges.txt")
OPTIONAL_FILES = ("generation_config.json",)
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_SHARD = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSpec:
    """What the user named: a Hub repo (with revision) or a local directory."""

    text: str
    repo_id: str | None = None
    revision: str | None = None
    local_dir: Path | None = None

    @property
    def alias(self) -> str | None:
        return self.text if self.text in ALIASES else None


@dataclass(frozen=True)
class ResolvedModel:
    """A model on local disk, ready to load."""

    spec: ModelSpec
    path: Path
    commit: str | None = None

    @property
    def name(self) -> str:
        """The id shown to users: the spec as typed (alias, repo id or directory)."""
        return self.spec.text


def parse_spec(text: str) -> ModelSpec:
    """Parse ``alias``, ``org/name``, ``org/name@revision`` or a local directory.

    Raises:
        BadInputError: empty or malformed.
        ModelNotFoundError: a path-like spec that does not exist.
    """
    text = text.strip()
    if not text:
        raise BadInputError("the model name is empty", hint="e.g. --model gpt2")
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSpec(text=text, local_dir=path.resolve())
    looks_like_path = (
        text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)
    )
    if looks_like_path:
        if path.exists():
            raise BadInputError(f"{text} is a file, not a model directory")
        raise ModelNotFoundError(f"no such model directory: {text}")
    name, _, revision = text.partition("@")
    repo_id = ALIASES.get(name, name)
    if not _REPO_ID.match(repo_id) or (_ and not revision):
        raise BadInputError(
            f"{text!r} is not a model name", hint="use an alias (gpt2), org/name[@revision] or a directory"
        )
    return ModelSpec(text=text, repo_id=repo_id, revision=revision or None)


def offline_requested(offline: bool = False) -> bool:
    """--offline, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set to a true value."""
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").lower()
    return offline or env in ("1", "true", "yes", "on")


def choose_files(names: list[str], allow_pickle: bool) -> list[str]:
    """The files to fetch from a repo listing: configs, tokenizer, and one weight format.

    Raises:
        UnsafeWeightsError: only pickle weights and no opt-in.
        ModelNotFoundError: no config or no weights at all.
    """
    available = set(names)
    if "config.json" not in available:
        raise ModelNotFoundError("the repo has no config.json: not a transformers model")
    chosen = [n for n in CONFIG_FILES + OPTIONAL_FILES if n in available]
    if SAFETENSORS in available:
        return chosen + [SAFETENSORS]
    if SAFETENSORS_INDEX in available:
        shards = [n for n in names if _SHARD.match(n) and n.endswith(".safetensors")]
        return chosen + [SAFETENSORS_INDEX] + sorted(shards)
    if PICKLE in available or PICKLE_INDEX in available:
        if not allow_pickle:
            raise UnsafeWeightsError("the repo ships only pickle weights (pytorch_model.bin)")
        if PICKLE in available:
            return chosen + [PICKLE]
        shards = [n for n in names if _SHARD.match(n) and n.endswith(".bin")]
        return chosen + [PICKLE_INDEX] + sorted(shards)
    raise ModelNotFoundError("the repo has no PyTorch weights (model.safetensors)")


def resolve(
    spec: str | ModelSpec,
    *,
    offline: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> ResolvedModel:
    """Find ``spec`` on disk, downloading the needed files into the HF cache if required.

    Raises:
        ModelNotFoundError, OfflineMissError, NetworkError, UnsafeWeightsError, BadInputError.
    """
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if spec.local_dir is not None:
        return ResolvedModel(spec, spec.local_dir)
    assert spec.repo_id is not None
    if offline_requested(offline):
        return _from_cache(spec, allow_pickle)
    try:
        names, commit = _list_repo(spec)
    except NetworkError:
        try:
            return _from_cache(spec, allow_pickle)
        except OfflineMissError:
            raise NetworkError(f"cannot reach the Hub to download {spec.text}") from None
    files = choose_files(names, allow_pickle)
    path = _download(spec, files, progress, commit)
    return ResolvedModel(spec, path, commit)


def list_remote(spec: ModelSpec) -> tuple[list[str], str | None]:
    """The file names of ``spec`` on the Hub and the commit its revision points to (one request).

    Raises:
        ModelNotFoundError, NetworkError.
    """
    return _list_repo(spec)


def download(
    spec: ModelSpec, files: list[str], *, commit: str | None, progress: bool = True, force: bool = False
) -> Path:
    """Download ``files`` of ``spec`` at ``commit`` into the HF cache; return the snapshot directory.

    Files already in the commit's snapshot are not fetched again (no request at all), unless
    ``force``: then they are re-downloaded and replace their cached blobs.

    Raises:
        NetworkError: the transfer failed (nothing partial is left where a later run would look).
    """
    return _download(spec, files, progress, commit, force)


def _list_repo(spec: ModelSpec) -> tuple[list[str], str | None]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(spec.repo_id or "", revision=spec.revision)
    except GatedRepoError as exc:
        raise ModelNotFoundError(
            f"{spec.text} is gated on the Hub",
            hint="accept its terms on huggingface.co and run `hf auth login`",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"no model named {spec.text!r} on the Hub") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"{spec.repo_id} has no revision {spec.revision!r}") from exc
    except Exception as exc:  # noqa: BLE001 - httpx/OSError/timeouts: all mean "Hub unreachable"
        raise NetworkError(f"cannot reach the Hub: {_first_line(exc)}") from exc
    return [s.rfilename for s in info.siblings or []], info.sha


def _download(
    spec: ModelSpec, files: list[str], progress: bool, commit: str | None = None, force: bool = False
) -> Path:
    from huggingface_hub import hf_hub_download

    bar_class, live = _progress_class(progress)
    path: Path | None = None
    # Pinning the commit the listing gave keeps the files of one snapshot consistent, and lets
    # huggingface_hub answer files already in that snapshot without a HEAD request each.
    revision = commit or spec.revision
    try:
        with live:
            for name in files:
                local = hf_hub_download(
                    spec.repo_id or "", name, revision=revision, tqdm_class=bar_class, force_download=force
                )
                path = Path(local).parent
        if commit is not None and path is not None:
            _record_ref(path, spec.revision or "main", commit)
    except Gpt2Error:
        raise
    except Exception as exc:  # noqa: BLE001 - network and disk failures mid-download
        raise NetworkError(f"download of {spec.text} failed: {_first_line(exc)}") from exc
    assert path is not None
    return path


def _record_ref(snapshot: Path, revision: str, commit: str) -> None:
    """Point ``refs/<revision>`` at ``commit``, as huggingface_hub does when given a branch name."""
    if revision == commit:
        return
    ref = snapshot.parent.parent / "refs" / revision
    try:
        if not ref.is_file() or ref.read_text(encoding="utf-8").strip() != commit:
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit, encoding="utf-8")
    except OSError:
        pass  # best effort: a read-only cache still serves the snapshot by its commit


def _from_cache(spec: ModelSpec, allow_pickle: bool) -> ResolvedModel:
    """The cached snapshot of ``spec`` (branch via refs/, or a commit sha), without the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.repo_id or "", "config.json", revision=spec.revision)
    if not isinstance(found, str):
        raise OfflineMissError(f"{spec.text} is not in the local cache")
    snapshot = Path(found).parent
    names = [p.name for p in snapshot.iterdir()]
    try:
        choose_files(names, allow_pickle)
    except ModelNotFoundError as exc:
        raise OfflineMissError(f"{spec.text} is only partly in the local cache") from exc
    return ResolvedModel(spec, snapshot, snapshot.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _progress_class(enabled: bool) -> tuple[Any, Any]:
    """A tqdm subclass that draws into one Rich progress display on stderr (TTY only)."""
    from contextlib import nullcontext

    from huggingface_hub.utils import tqdm as hf_tqdm

    if not enabled or not sys.stderr.isatty():

        class Silent(hf_tqdm):  # type: ignore[misc,valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

        return Silent, nullcontext()

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    display = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )

    class RichBar(hf_tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # the client names bars by URL tail (…/resolve/<commit>/name): show just the file name
            desc = str(kwargs.get("desc") or "download").rsplit("/", 1)[-1]
            total, initial = kwargs.get("total"), kwargs.get("initial") or 0
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._task = display.add_task(desc, total=total, completed=initial)

        def update(self, n: float | None = 1) -> bool | None:
            display.advance(self._task, n or 0)
            return None

        def close(self) -> None:
            pass

    return RichBar, display
