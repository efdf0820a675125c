"""Model specs to local snapshots: aliases, ``org/name@rev``, local directories, the HF cache.

Only the files the engine needs are ever downloaded (never the TF/Flax/ONNX/... weights the
big repos also hold), and ``config.json`` is checked before any weights are fetched. Offline
(``--offline`` or ``HF_HUB_OFFLINE=1``) never touches the network; every Hub request has a
short timeout (``HF_HUB_ETAG_TIMEOUT``, 10 s), after which a cached copy is used; a revision
pinned to a commit that is cached needs no request at all.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2cli.errors import (
    BadInputError,
    CacheWriteError,
    Gpt2Error,
    ModelNotFoundError,
    NetworkError,
    OfflineMissError,
    UnsafeWeightsError,
)

Warn = Callable[[str], None]
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
PROGRESS_CHUNK = 1 << 20  # bytes per progress update while downloading (the client's default: 10 MiB)

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
    warn: Warn | None = None,
) -> ResolvedModel:
    """Find ``spec`` on disk, downloading the needed files into the HF cache if required.

    ``warn`` receives a one-line note when the Hub cannot be reached and the cache answers.

    Raises:
        ModelNotFoundError, OfflineMissError, NetworkError, UnsafeWeightsError, BadInputError,
        NotGPT2Error (config.json names another architecture), CacheWriteError.
    """
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if spec.local_dir is not None:
        return ResolvedModel(spec, spec.local_dir)
    assert spec.repo_id is not None
    if offline_requested(offline) or (spec.revision and _COMMIT.match(spec.revision)):
        try:  # a commit's snapshot never changes: no question to ask the Hub
            return _from_cache(spec, allow_pickle)
        except OfflineMissError:
            if offline_requested(offline):
                raise
    try:
        names, commit = _list_repo(spec)
    except NetworkError as exc:
        try:
            cached = _from_cache(spec, allow_pickle)
        except OfflineMissError as miss:
            raise _not_reachable(spec, exc, miss) from None
        if warn is not None:
            warn(f"{exc.message}; using the cached copy of {spec.text}")
        return cached
    except ModelNotFoundError as exc:
        if _looks_like_path(spec.text):
            raise ModelNotFoundError(
                f"no directory {spec.text}, and no model of that name on the Hub ({exc.message})",
                hint="check the path (a model directory holds config.json)",
            ) from None
        raise
    files = choose_files(names, allow_pickle)
    path = _download(spec, files, progress, commit)
    return ResolvedModel(spec, path, commit)


def _looks_like_path(text: str) -> bool:
    """``models/smal4`` when ``models/`` is a directory here: a mistyped path, not a repo id."""
    path = Path(text).expanduser()
    return "/" in text and path.parent != Path(".") and path.parent.is_dir()


def _not_reachable(spec: ModelSpec, exc: NetworkError, miss: OfflineMissError) -> NetworkError:
    """The Hub did not answer and the cache cannot stand in: say both, and what to do."""
    if _looks_like_path(spec.text):
        return NetworkError(
            f"no directory {spec.text}; as a Hub model name it could not be fetched ({exc.message})",
            hint="check the path (a model directory holds config.json)",
        )
    if "partly" in miss.message:  # a pull that stopped half-way: say what is missing
        return NetworkError(f"{miss.message}, and {exc.message}", hint=miss.hint)
    return NetworkError(f"cannot download {spec.text}: {exc.message}")


def hub_timeout() -> float:
    """Seconds any Hub request may wait for an answer (huggingface_hub's HF_HUB_ETAG_TIMEOUT)."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT)


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

    timeout = hub_timeout()
    try:
        info = HfApi().model_info(spec.repo_id or "", revision=spec.revision, timeout=timeout)
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
        if "timeout" in type(exc).__name__.lower():
            raise NetworkError(f"the Hub did not answer within {timeout:g} s") from exc
        raise NetworkError(f"cannot reach the Hub: {_first_line(exc)}") from exc
    return [s.rfilename for s in info.siblings or []], info.sha


def _download(
    spec: ModelSpec, files: list[str], progress: bool, commit: str | None = None, force: bool = False
) -> Path:
    from huggingface_hub import constants, hf_hub_download

    bar_class, live = _progress_class(progress)
    path: Path | None = None
    # Pinning the commit the listing gave keeps the files of one snapshot consistent, and lets
    # huggingface_hub answer files already in that snapshot without a HEAD request each.
    revision = commit or spec.revision
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, PROGRESS_CHUNK)  # a smooth bar
    # config.json first: a repo of another architecture is refused before any weights are fetched
    ordered = sorted(files, key=lambda name: name != "config.json")
    try:
        with live, warnings.catch_warnings():
            # The client warns (a raw UserWarning) when space looks short; the write error says it.
            warnings.filterwarnings("ignore", message="Not enough free disk space")
            for name in ordered:
                local = hf_hub_download(
                    spec.repo_id or "", name, revision=revision, tqdm_class=bar_class, force_download=force
                )
                path = Path(local).parent
                if name == "config.json":
                    check_config(path / name, spec.text)
        if commit is not None and path is not None:
            _record_ref(path, spec.revision or "main", commit)
    except Gpt2Error:
        raise
    except Exception as exc:  # noqa: BLE001 - network and disk failures mid-download
        disk = _disk_error(exc)
        if disk is not None:
            raise disk from exc
        raise NetworkError(f"download of {spec.text} failed: {_first_line(exc)}") from exc
    assert path is not None
    return path


def check_config(path: Path, name: str) -> None:
    """Refuse a downloaded ``config.json`` that is not a GPT-2's (before the weights come).

    Raises:
        NotGPT2Error: another ``model_type`` or an unsupported activation.
        CorruptWeightsError: not JSON, or inconsistent numbers.
    """
    from gpt2cli.config import GPT2Config
    from gpt2cli.errors import CorruptWeightsError

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptWeightsError(f"the config.json of {name} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CorruptWeightsError(f"the config.json of {name} is not a JSON object")
    GPT2Config.from_dict(raw, source=f"{name} (config.json)")


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _disk_error(exc: BaseException) -> CacheWriteError | None:
    """A CacheWriteError when ``exc`` (or what caused it) is a write failure of the cache."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRNOS:
            return cache_write_error(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def cache_write_error(exc: OSError) -> CacheWriteError:
    """The one-line error for a cache that cannot be written, with the way out."""
    from huggingface_hub import constants

    where = constants.HF_HUB_CACHE
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheWriteError(
            f"the disk holding the model cache ({where}) is full: {reason}",
            hint="free some space, or point HF_HOME (or HF_HUB_CACHE) at a disk with room",
        )
    return CacheWriteError(
        f"the model cache ({where}) cannot be written: {reason}",
        hint="point HF_HOME (or HF_HUB_CACHE) at a writable directory, or use --offline with a cached model",
    )


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
    missing = missing_files(snapshot)
    if missing:
        raise OfflineMissError(
            f"{spec.text} is only partly in the local cache (missing {', '.join(missing)})",
            hint=f"complete it with network access: gpt2 models pull {spec.text}",
        )
    choose_files([p.name for p in snapshot.iterdir()], allow_pickle)  # refuses pickle-only weights
    return ResolvedModel(spec, snapshot, snapshot.name)


def required_files(snapshot: Path) -> list[str]:
    """The files a model directory needs: configs, tokenizer, and its weights (shards included).

    The weight format is the one the directory holds (a safetensors index names its shards);
    with no weights at all, ``model.safetensors`` is what is missing.
    """

    def present(name: str) -> bool:
        return (snapshot / name).exists() or (snapshot / name).is_symlink()  # a dangling link counts

    needed = list(CONFIG_FILES)
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS), (PICKLE_INDEX, PICKLE)):
        if present(index):
            return needed + [index] + _index_shards(snapshot / index)
        if present(single):
            return needed + [single]
    return needed + [SAFETENSORS]


def missing_files(snapshot: Path) -> list[str]:
    """``required_files`` that are absent, or links to a blob that is gone."""
    return [name for name in required_files(snapshot) if not (snapshot / name).exists()]


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return []  # an unreadable index: verify reports the index itself
    return sorted({str(v) for v in weight_map.values()}) if isinstance(weight_map, dict) else []


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
