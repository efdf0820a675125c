"""The local model cache: which GPT-2-family models it holds, pull, verify, and remove them.

Builds on the standard Hugging Face cache (``scan_cache_dir``) and on ``hub`` for names and
downloads. The cache names each blob by the digest the Hub gave as its ETag: the sha256 of the
content for LFS files (the weights), the git blob sha1 for small files. ``verify`` recomputes
those digests. Parameter counts come from safetensors headers; no tensor is ever loaded (this
module does not import torch).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpt2cli.errors import BadInputError, CorruptWeightsError, NetworkError, OfflineMissError
from gpt2cli.hub import (
    ALIASES,
    ModelSpec,
    choose_files,
    download,
    list_remote,
    missing_files,
    offline_requested,
    parse_spec,
)
from gpt2cli.safetensors_header import HeaderError, header_length, read_header, tensor_entries

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
# Stored buffers (the causal mask) are not parameters; the same rule as weights.IGNORED_BUFFER,
# repeated here because weights.py imports torch.
_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CachedFile:
    """One file of a cached snapshot and the digest its blob is named by."""

    name: str
    size: int
    digest: str | None  # sha256 (LFS files) or git blob sha1 (small files); None if unknown
    algorithm: str | None  # "sha256", "git-sha1" or None
    path: Path  # in snapshots/<commit>/
    blob: Path | None  # in blobs/, None when the snapshot entry is a plain file

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "algorithm": self.algorithm,
            "digest": self.digest,
            "path": str(self.path),
        }


@dataclass(frozen=True)
class CachedModel:
    """One cached revision of a GPT-2-family repo."""

    repo_id: str
    commit: str
    refs: tuple[str, ...]
    aliases: tuple[str, ...]
    snapshot: Path
    files: tuple[CachedFile, ...]
    size: int  # bytes on disk of this revision's blobs
    parameters: int | None
    dtype: str | None
    config: dict[str, Any] = field(default_factory=dict)
    missing: tuple[str, ...] = ()  # files the model needs that the snapshot lacks (a partial pull)
    local: bool = False  # a model directory outside the cache (repo_id is its path)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def name(self) -> str:
        """The shortest name that loads this revision: alias or repo id, plus @ref if not main."""
        if self.local:
            return self.repo_id
        base = self.aliases[0] if self.aliases else self.repo_id
        if "main" in self.refs:
            return base
        return f"{self.repo_id}@{self.refs[0] if self.refs else self.commit}"

    @property
    def weight_files(self) -> tuple[CachedFile, ...]:
        return tuple(f for f in self.files if f.name.endswith((".safetensors", ".bin")))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "repo_id": self.repo_id,
            "aliases": list(self.aliases),
            "commit": self.commit,
            "refs": list(self.refs),
            "size": self.size,
            "parameters": self.parameters,
            "dtype": self.dtype,
            "config": self.config,
            "path": str(self.snapshot),
            "files": [f.to_dict() for f in self.files],
            "complete": self.complete,
            "missing": list(self.missing),
        }


@dataclass(frozen=True)
class PullResult:
    """What ``pull`` did: the model now cached, and the files it had to fetch."""

    model: CachedModel
    downloaded: tuple[str, ...]
    bytes_downloaded: int
    checked_hub: bool  # False when offline (nothing was asked) or the Hub was unreachable
    hub_error: str | None = None  # why the Hub could not answer, when the cache did instead

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "downloaded": list(self.downloaded),
            "bytes_downloaded": self.bytes_downloaded,
            "checked_hub": self.checked_hub,
            "hub_error": self.hub_error,
        }


@dataclass(frozen=True)
class FileCheck:
    """The verdict on one cached file: ok, corrupt, truncated, missing or unverified."""

    model: str
    name: str
    status: str
    size: int
    expected: str | None
    actual: str | None
    repaired: bool = False

    @property
    def bad(self) -> bool:
        return self.status in ("corrupt", "truncated", "missing") and not self.repaired

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyReport:
    checks: tuple[FileCheck, ...]

    @property
    def ok(self) -> bool:
        return not any(c.bad for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "files": [c.to_dict() for c in self.checks]}


@dataclass
class RemovalPlan:
    """Cache entries to delete and the space that frees; nothing happens until ``execute``."""

    models: list[CachedModel]
    freed: int
    _strategy: Any = None

    def execute(self) -> int:
        """Delete the entries; return the bytes freed."""
        if self._strategy is not None:
            self._strategy.execute()
        return self.freed


# ---------------------------------------------------------------------------- listing
def cache_dir() -> Path:
    """The Hugging Face hub cache in use (HF_HUB_CACHE, or HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def list_models(directory: Path | None = None, *, gpt2_only: bool = True) -> list[CachedModel]:
    """Every cached revision of a model repo (GPT-2 family only, by default), sorted by name."""
    models = [m for _, m in _scan(directory, gpt2_only)]
    return sorted(models, key=lambda m: (m.repo_id.lower(), m.name, m.commit))


def find(
    text: str, directory: Path | None = None, *, gpt2_only: bool = False, hint: str | None = None
) -> list[CachedModel]:
    """The cached revisions ``text`` (alias, ``org/name`` or ``org/name@rev``) names.

    Without a revision every cached revision of the repo is returned.

    Raises:
        BadInputError: a malformed name, or a local directory (not part of the cache).
        OfflineMissError: nothing by that name in the cache.
    """
    spec = _hub_spec(text)
    found = [
        m
        for m in list_models(directory, gpt2_only=gpt2_only)
        if m.repo_id.lower() == (spec.repo_id or "").lower() and _matches(m, spec.revision)
    ]
    if not found:
        raise OfflineMissError(
            f"{text} is not in the local cache", hint=hint or f"run `gpt2 models pull {text}`"
        )
    return found


def find_or_local(text: str, directory: Path | None = None) -> list[CachedModel]:
    """``find``, or the model directory ``text`` names (a finetune output, say).

    Raises:
        BadInputError, OfflineMissError: as ``find``.
    """
    spec = parse_spec(text)
    if spec.local_dir is not None:
        return [describe_local(spec.local_dir, text)]
    return find(text, directory)


def describe_local(path: Path, name: str | None = None) -> CachedModel:
    """A model directory outside the cache described as a ``CachedModel`` (no digests, no refs)."""
    files = tuple(
        CachedFile(p.name, p.stat().st_size, None, None, p, None)
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.startswith(".")
    )
    weights = [f.path for f in files if f.name.endswith(".safetensors")]
    parameters, dtype = safetensors_parameters(weights) if weights else (None, None)
    return CachedModel(
        repo_id=name or str(path),
        commit="",
        refs=(),
        aliases=(),
        snapshot=path,
        files=files,
        size=sum(f.size for f in files),
        parameters=parameters,
        dtype=dtype,
        config=_config_summary(_read_config(path / "config.json")),
        missing=tuple(missing_files(path)),
        local=True,
    )


def pick(models: list[CachedModel], revision: str | None = None) -> CachedModel:
    """The revision ``info`` shows: the one ``main`` points to, else the most recent one."""
    main = [m for m in models if "main" in m.refs]
    if revision is None and main:
        return main[0]
    return max(models, key=lambda m: max((f.path.lstat().st_mtime for f in m.files), default=0.0))


def _matches(model: CachedModel, revision: str | None) -> bool:
    if revision is None:
        return True
    return revision in model.refs or (len(revision) >= 7 and model.commit.startswith(revision.lower()))


def _hub_spec(text: str) -> ModelSpec:
    spec = parse_spec(text)
    if spec.local_dir is not None:
        raise BadInputError(
            f"{text} is a local directory, not a cached model",
            hint="name a Hub model (gpt2, org/name[@revision]); `gpt2 models list` shows the cache",
        )
    return spec


def _scan(directory: Path | None, gpt2_only: bool) -> Iterable[tuple[Any, CachedModel]]:
    from huggingface_hub import scan_cache_dir

    root = directory or cache_dir()
    if not root.is_dir():
        return
    info = scan_cache_dir(root)
    revisions: list[tuple[str, Any]] = [
        (repo.repo_id, rev) for repo in info.repos if repo.repo_type == "model" for rev in repo.revisions
    ]
    # scan_cache_dir skips a repo whole when one of its blobs is gone (a dangling snapshot link):
    # walk those ourselves, so that verify can report the missing file and repair it.
    scanned = {repo.repo_path.name for repo in info.repos}
    for folder in sorted(root.glob("models--*")):
        if folder.name not in scanned and (folder / "snapshots").is_dir():
            revisions += [(_repo_id(folder), rev) for rev in _walk_revisions(folder)]
    for repo_id, revision in revisions:
        config = _read_config(revision.snapshot_path / "config.json")
        if gpt2_only and config.get("model_type") != "gpt2":
            continue
        yield info, describe(repo_id, revision, config)


@dataclass(frozen=True)
class _File:
    """The fields of huggingface_hub's ``CachedFileInfo`` that ``describe`` reads."""

    file_name: str
    file_path: Path
    blob_path: Path
    size_on_disk: int


@dataclass(frozen=True)
class _Revision:
    """The fields of huggingface_hub's ``CachedRevisionInfo`` that ``describe`` reads."""

    commit_hash: str
    refs: frozenset[str]
    snapshot_path: Path
    files: tuple[_File, ...]
    size_on_disk: int


def _repo_id(folder: Path) -> str:
    return "/".join(folder.name.split("--")[1:])


def _walk_revisions(folder: Path) -> list[_Revision]:
    """The revisions of a repo folder scan_cache_dir refused (missing blobs count 0 bytes)."""
    import os

    refs: dict[str, set[str]] = {}
    for ref in (folder / "refs").rglob("*"):
        if ref.is_file():
            name = ref.relative_to(folder / "refs").as_posix()
            refs.setdefault(ref.read_text(encoding="utf-8").strip(), set()).add(name)
    out = []
    for snapshot in sorted(p for p in (folder / "snapshots").iterdir() if p.is_dir()):
        files = []
        for path in sorted(snapshot.rglob("*")):
            if path.is_dir():
                continue
            blob = Path(os.path.abspath(path.parent / os.readlink(path))) if path.is_symlink() else path
            files.append(_File(path.name, path, blob, blob.stat().st_size if blob.exists() else 0))
        size = sum({f.blob_path: f.size_on_disk for f in files}.values())
        out.append(
            _Revision(snapshot.name, frozenset(refs.get(snapshot.name, ())), snapshot, tuple(files), size)
        )
    return out


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def describe(repo_id: str, revision: Any, config: dict[str, Any]) -> CachedModel:
    """A ``CachedModel`` from one of ``scan_cache_dir``'s revisions and its parsed config."""
    files = tuple(sorted((_cached_file(f) for f in revision.files), key=lambda f: f.name))
    weights = [f.path for f in files if f.name.endswith(".safetensors")]
    parameters, dtype = safetensors_parameters(weights) if weights else (None, None)
    aliases = tuple(a for a, r in ALIASES.items() if r.lower() == repo_id.lower())
    return CachedModel(
        repo_id=repo_id,
        commit=revision.commit_hash,
        refs=tuple(sorted(revision.refs)),
        aliases=aliases,
        snapshot=revision.snapshot_path,
        files=files,
        size=revision.size_on_disk,
        parameters=parameters,
        dtype=dtype,
        config=_config_summary(config),
        missing=tuple(missing_files(revision.snapshot_path)),
    )


def _cached_file(info: Any) -> CachedFile:
    path: Path = info.file_path
    blob = info.blob_path if path.is_symlink() else None
    digest = blob.name if blob is not None else None
    algorithm = None
    if digest is not None and _SHA256.match(digest):
        algorithm = "sha256"
    elif digest is not None and _SHA1.match(digest):
        algorithm = "git-sha1"
    else:
        digest = None
    return CachedFile(info.file_name, info.size_on_disk, digest, algorithm, path, blob)


def _config_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture numbers users ask about, under their config.json names."""
    keys = ("model_type", "n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
    out = {k: config.get(k) for k in keys if k in config}
    if "n_positions" not in out and "n_ctx" in config:
        out["n_positions"] = config["n_ctx"]
    return out


def safetensors_parameters(paths: Iterable[Path]) -> tuple[int | None, str | None]:
    """Parameter count and dtype(s) from safetensors headers, without reading any tensor.

    The tied ``lm_head.weight`` (when stored next to ``wte``) and the causal-mask buffers are
    not counted, so the figure matches the model's own ``numel`` sum. Returns (None, None) if a
    header cannot be read.
    """
    numel: dict[str, int] = {}
    dtype: dict[str, str] = {}
    for path in paths:
        header = read_safetensors_header(path)
        if header is None:
            return None, None
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict) or _BUFFER.match(name):
                continue
            n = 1
            for dim in info.get("shape", []):
                n *= int(dim)
            numel[name], dtype[name] = n, str(info.get("dtype"))
    if "lm_head.weight" in numel and ({"wte.weight", "transformer.wte.weight"} & numel.keys()):
        del numel["lm_head.weight"]
    dtypes = sorted({dtype[name] for name in numel})
    return sum(numel.values()), "+".join(dtypes) or None


def read_safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, or None when it cannot be read."""
    try:
        return read_header(path)[1]
    except (OSError, HeaderError):
        return None


# ---------------------------------------------------------------------------- pull
def pull(
    text: str, *, offline: bool = False, allow_pickle: bool = False, progress: bool = True
) -> PullResult:
    """Make sure ``text`` is complete in the cache, downloading only the files it lacks.

    Pulling what is cached asks the Hub one question (which commit the revision is at);
    offline, nothing at all. Downloads go to a temporary file renamed into place when complete
    (huggingface_hub), so an interrupted pull leaves nothing a later run could load.

    Raises:
        BadInputError, ModelNotFoundError, OfflineMissError, NetworkError, UnsafeWeightsError.
    """
    spec = _hub_spec(text)
    if offline_requested(offline):
        return PullResult(_cached_complete(text, spec, allow_pickle), (), 0, checked_hub=False)
    try:
        names, commit = list_remote(spec)
    except NetworkError as exc:
        try:
            model = _cached_complete(text, spec, allow_pickle)
            return PullResult(model, (), 0, checked_hub=False, hub_error=exc.message)
        except OfflineMissError:
            raise NetworkError(f"cannot reach the Hub to download {text}") from None
    files = choose_files(names, allow_pickle)
    snapshot = _repo_path(spec.repo_id or "") / "snapshots" / (commit or "")
    missing = [name for name in files if not (commit and (snapshot / name).exists())]
    remove_orphaned_partials(spec.repo_id or "")
    path = download(spec, files, commit=commit, progress=progress)
    fetched = sum((path / name).stat().st_size for name in missing)
    return PullResult(_describe_snapshot(spec, path), tuple(missing), fetched, checked_hub=True)


def _cached_complete(text: str, spec: ModelSpec, allow_pickle: bool) -> CachedModel:
    from gpt2cli.hub import resolve

    resolved = resolve(spec, offline=True, allow_pickle=allow_pickle, progress=False)
    return _describe_snapshot(spec, resolved.path)


def _describe_snapshot(spec: ModelSpec, snapshot: Path) -> CachedModel:
    for model in find(spec.repo_id or "", snapshot.parent.parent.parent, gpt2_only=False):
        if model.commit == snapshot.name:
            return model
    raise OfflineMissError(f"{spec.text} is not in the local cache")  # pragma: no cover - just pulled


def _repo_path(repo_id: str, directory: Path | None = None) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return (directory or cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model")


def remove_orphaned_partials(repo_id: str, directory: Path | None = None) -> int:
    """Delete ``blobs/*.incomplete`` left by killed downloads; return the bytes freed.

    A partial file whose download lock is held belongs to a live download (another process
    pulling the same file) and is left alone.
    """
    from filelock import Timeout
    from huggingface_hub.utils import WeakFileLock

    root = directory or cache_dir()
    folder = _repo_path(repo_id, root)
    freed = 0
    for partial in sorted((folder / "blobs").glob("*.incomplete")):
        etag = partial.name.split(".", 1)[0]
        lock = root / ".locks" / folder.name / f"{etag}.lock"
        try:
            with WeakFileLock(lock, timeout=0.05):
                size = partial.stat().st_size
                partial.unlink()
                freed += size
        except (Timeout, OSError):
            continue
    return freed


# ---------------------------------------------------------------------------- verify
def verify(
    text: str | None,
    *,
    repair: bool = False,
    progress: bool = True,
    on_file: Callable[[str, str], None] | None = None,
    directory: Path | None = None,
) -> VerifyReport:
    """Check that every file ``text`` needs is present and has the digest its blob is named by.

    ``text`` None verifies every cached GPT-2 model; a directory is checked for completeness
    and truncated weights (it has no digests). With ``repair``, corrupt, truncated and missing
    files of a cached model are downloaded again (replacing their blobs) and checked once more.

    Raises:
        BadInputError, OfflineMissError; with ``repair``, NetworkError.
    """
    if text is None:
        models = list_models(directory)
        if not models:
            raise OfflineMissError(
                "the local cache holds no GPT-2 models", hint="run `gpt2 models pull gpt2`"
            )
    else:
        models = find_or_local(text, directory)
    revision = parse_spec(text).revision if text is not None else None
    checks: list[FileCheck] = []
    for model in models:
        model_checks = _check_model(model, on_file)
        bad = [c.name for c in model_checks if c.bad]
        if repair and bad and not model.local:
            _repair(model, bad, revision, progress)
            repaired = describe_again(model, directory)
            redone = {c.name: c for c in _check_model(repaired, on_file) if c.name in bad}
            model_checks = [_repaired(c, redone[c.name]) if c.name in redone else c for c in model_checks]
        checks.extend(model_checks)
    return VerifyReport(tuple(checks))


def _check_model(model: CachedModel, on_file: Callable[[str, str], None] | None) -> list[FileCheck]:
    """Every file's check, then one "missing" check per needed file the snapshot lacks."""
    present = {f.name for f in model.files}
    checks = [check_file(model, f, on_file) for f in model.files]
    checks += [FileCheck(model.name, n, "missing", 0, None, None) for n in model.missing if n not in present]
    return checks


def _repair(model: CachedModel, bad: list[str], revision: str | None, progress: bool) -> None:
    """Fetch ``bad`` files again; when needed files are absent, ask the Hub which they are."""
    spec = ModelSpec(text=model.name, repo_id=model.repo_id, revision=revision)
    present = {f.name for f in model.files}
    files = [name for name in bad if name in present]
    if len(files) < len(bad):  # never downloaded (a partial pull): the listing says what to get
        names, _ = list_remote(ModelSpec(text=model.name, repo_id=model.repo_id, revision=model.commit))
        wanted = choose_files(names, allow_pickle=any(n.endswith(".bin") for n in present))
        files += [name for name in wanted if name not in present]
    download(spec, files, commit=model.commit, progress=progress, force=True)


def describe_again(model: CachedModel, directory: Path | None = None) -> CachedModel:
    """``model`` as the cache holds it now (after a repair)."""
    for again in find(model.repo_id, directory):
        if again.commit == model.commit:
            return again
    return model  # pragma: no cover - the snapshot was just written


def _repaired(before: FileCheck, after: FileCheck) -> FileCheck:
    if after.status == "ok":
        return FileCheck(
            before.model, before.name, before.status, after.size, after.expected, after.actual, repaired=True
        )
    return after


def check_file(
    model: CachedModel, f: CachedFile, on_file: Callable[[str, str], None] | None = None
) -> FileCheck:
    """Hash one cached file and compare the result with the digest its blob is named by."""
    if on_file is not None:
        on_file(model.name, f.name)
    if not f.path.exists():
        return FileCheck(model.name, f.name, "missing", 0, f.digest, None)
    size = f.path.stat().st_size
    if f.algorithm is None:  # no digest to compare (a plain directory): check what can be checked
        if _is_truncated(f.path, size):
            return FileCheck(model.name, f.name, "truncated", size, None, None)
        if f.name == "config.json" and not _read_config(f.path):
            return FileCheck(model.name, f.name, "corrupt", size, None, None)
        if f.path.suffix == ".safetensors" and read_safetensors_header(f.path) is None:
            return FileCheck(model.name, f.name, "corrupt", size, None, None)  # a header that does not parse
        return FileCheck(model.name, f.name, "unverified", size, None, None)
    actual = file_digest(f.path, f.algorithm)
    if actual == f.digest:
        return FileCheck(model.name, f.name, "ok", size, f.digest, actual)
    status = "truncated" if _is_truncated(f.path, size) else "corrupt"
    return FileCheck(model.name, f.name, status, size, f.digest, actual)


def _is_truncated(path: Path, size: int) -> bool:
    """A safetensors file shorter than its own header says (the header itself included)."""
    if path.suffix != ".safetensors":
        return False
    try:
        n = header_length(path)
    except (OSError, HeaderError):
        return True  # not even the 8-byte header length
    if size < 8 + n:
        return True
    header = read_safetensors_header(path)
    if header is None:
        return False  # a complete header that does not parse: corrupt, not short
    ends = [
        int(t.get("data_offsets", [0, 0])[1]) for t in tensor_entries(header).values() if isinstance(t, dict)
    ]
    return size < 8 + n + max(ends, default=0)


def file_digest(path: Path, algorithm: str) -> str:
    """sha256 of the content, or git's blob sha1 (``blob <size>\\0`` + content)."""
    if algorithm == "sha256":
        h = hashlib.sha256()
    else:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- remove
def plan_removal(text: str, directory: Path | None = None) -> RemovalPlan:
    """What ``rm text`` would delete (every revision without @rev) and the space it frees.

    Raises:
        BadInputError, OfflineMissError.
    """
    from huggingface_hub import scan_cache_dir

    models = find(text, directory, hint="`gpt2 models list` shows the cached models")
    whole_repo = _hub_spec(text).revision is None
    folder = _repo_path(models[0].repo_id, directory)
    partial = sum(p.stat().st_size for p in (folder / "blobs").glob("*.incomplete")) if whole_repo else 0
    info = scan_cache_dir(directory or cache_dir())
    if any(repo.repo_path == folder for repo in info.repos):
        strategy = info.delete_revisions(*(m.commit for m in models))
        return RemovalPlan(models, strategy.expected_freed_size + partial, strategy)
    # a repo scan_cache_dir refused (a blob is missing): only removing it whole is safe
    if not whole_repo:
        raise CorruptWeightsError(
            f"the cache entry of {models[0].repo_id} is damaged (a file is missing)",
            hint=f"repair it with `gpt2 models verify {text} --repair`, or remove every revision",
        )
    blobs = sum(b.stat().st_size for b in (folder / "blobs").iterdir() if b.is_file())
    return RemovalPlan(models, blobs, _RemoveTree(folder))


@dataclass(frozen=True)
class _RemoveTree:
    path: Path

    def execute(self) -> None:
        import shutil

        shutil.rmtree(self.path)
