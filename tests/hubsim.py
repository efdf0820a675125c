"""A small imitation of the Hugging Face Hub HTTP API, served on 127.0.0.1, for tests.

Standard library only. The real ``huggingface_hub`` client (``snapshot_download``,
``hf_hub_download``, ``HfApi.model_info`` / ``repo_info`` / ``list_repo_files`` /
``list_repo_tree`` / ``list_repo_refs`` / ``get_paths_info`` / ``file_exists``) works against it,
either with ``HF_ENDPOINT=<sim.endpoint>`` set *before* ``huggingface_hub`` is imported (the
client reads it at import time, so use a subprocess) or, in-process, by passing
``endpoint=sim.endpoint`` to those functions / to ``HfApi(endpoint=...)``.

Only model repos are served. Routes::

    GET  /api/models/{repo_id}                        model info at the default branch
    GET  /api/models/{repo_id}/revision/{revision}    model info (sha, siblings; ?blobs=true
                                                      adds size/blobId/lfs, ?expand=... filters)
    GET  /api/models/{repo_id}/tree/{revision}[/path] tree listing (?recursive=true)
    POST /api/models/{repo_id}/paths-info/{revision}  info for the given paths
    GET  /api/models/{repo_id}/refs                   branches
    HEAD /{repo_id}/resolve/{revision}/{filename}     file metadata (X-Repo-Commit, ETag,
    GET  /{repo_id}/resolve/{revision}/{filename}     X-Linked-Etag/X-Linked-Size for LFS files),
                                                      body with Range support (206 / 416)

Errors imitate the Hub: 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` /
``EntryNotFound`` (the latter with ``X-Repo-Commit``). No Xet headers are ever sent, so the client
always falls back to a plain HTTP download of the resolve URL. ``repo_id`` may be ``org/name`` or
a canonical single name such as ``gpt2``; :meth:`HubSim.add_alias` makes a name redirect (307) to
another repo, as the real Hub does for ``gpt2`` -> ``openai-community/gpt2``.

Script use (serves until killed; the endpoint is the first line on stdout)::

    python tests/hubsim.py --port 0 --repo org/name=/path/to/dir [--repo org/name@v2=/dir2]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["DEFAULT_LFS_SUFFIXES", "HubSim", "RequestRecord"]

DEFAULT_LFS_SUFFIXES: tuple[str, ...] = (
    ".safetensors",
    ".bin",
    ".h5",
    ".msgpack",
    ".onnx",
    ".ot",
    ".tflite",
)

_FIXED_DATE = "2024-01-01T00:00:00.000Z"
_SKIP_DIRS = {".git", ".cache"}
_TRUE = {"1", "true", "yes"}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data`` stored as a blob (what the Hub calls ``blobId``/``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _Blob:
    path: str
    data: bytes
    blob_id: str  # git sha1 of what git stores (the pointer file for LFS files)
    sha256: str | None  # content sha256, LFS files only
    pointer_size: int | None  # LFS files only

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id

    def tree_entry(self) -> dict:
        entry: dict = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.sha256 is not None:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry


@dataclass
class _Commit:
    sha: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    repo_id: str
    refs: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)

    @property
    def default_branch(self) -> str:
        return "main" if "main" in self.refs else next(iter(self.refs))

    def resolve(self, revision: str) -> _Commit | None:
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


@dataclass
class RequestRecord:
    """One request received: method, raw path (with query), headers, response status."""

    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None


@dataclass
class _FaultOpts:
    reset: bool = True
    times: int | None = None


def _make_blob(path: str, data: bytes, lfs_suffixes: Iterable[str]) -> _Blob:
    if path.endswith(tuple(lfs_suffixes)):
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = lfs_pointer(sha256, len(data))
        return _Blob(path, data, git_blob_sha1(pointer), sha256, len(pointer))
    return _Blob(path, data, git_blob_sha1(data), None, None)


def _safetensors_params(data: bytes) -> dict[str, int] | None:
    """Parameter count per dtype from a safetensors header (what the Hub reports), or None."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
    except (struct.error, ValueError):
        return None
    counts: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        numel = 1
        for dim in info.get("shape", []):
            numel *= int(dim)
        counts[info.get("dtype", "?")] = counts.get(info.get("dtype", "?"), 0) + numel
    return counts


class HubSim:
    """Fake Hugging Face Hub. Add repos, ``start()``, point the client at ``.endpoint``.

    Attributes:
        endpoint: ``"http://127.0.0.1:PORT"`` once started, else ``None``.
        requests: ``(method, raw_path)`` of every request received, in order.
        request_log: the same requests as :class:`RequestRecord` (headers, response status).
        fail_after_bytes: ``{filename: n}`` -- GETs of that file (path inside the repo, any repo,
            any revision) never deliver bytes at or past absolute offset ``n``: the server sends
            the full headers (``Content-Length`` of the whole range), the body up to offset ``n``
            and then kills the connection. A resumed request (``Range: bytes=k-``) with
            ``k >= n`` is answered ``503``. See :meth:`set_fault` for the options.
        slow_bytes_per_second: when set, throttles every file body written by GET on resolve.
        pauses: ``{filename: (n, event)}`` -- see :meth:`pause_after`.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._aliases: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.request_log: list[RequestRecord] = []
        self.fail_after_bytes: dict[str, int] = {}
        self._fault_opts: dict[str, _FaultOpts] = {}
        self.slow_bytes_per_second: float | None = None
        self.pauses: dict[str, tuple[int, threading.Event]] = {}
        self.endpoint: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ content
    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        revision: str = "main",
        lfs_suffixes: Iterable[str] = DEFAULT_LFS_SUFFIXES,
    ) -> str:
        """Create (or update) ``repo_id`` so that branch ``revision`` holds exactly ``files``.

        Returns the commit sha (40 hex, deterministic). Adding again with another ``revision``
        adds a branch; both revisions and their commit shas stay resolvable.
        """
        if not repo_id or repo_id.startswith("/") or repo_id.count("/") > 1:
            raise ValueError(f"bad repo_id {repo_id!r}")
        lfs_suffixes = tuple(lfs_suffixes)
        blobs: dict[str, _Blob] = {}
        for path, data in files.items():
            path = path.replace(os.sep, "/").strip("/")
            if not isinstance(data, bytes | bytearray):
                raise TypeError(f"content of {path!r} must be bytes")
            blobs[path] = _make_blob(path, bytes(data), lfs_suffixes)
        listing = "".join(f"{p} {b.blob_id}\n" for p, b in sorted(blobs.items()))
        sha = hashlib.sha1(f"{repo_id}\n{revision}\n{listing}".encode()).hexdigest()
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id))
            repo.commits[sha] = _Commit(sha, blobs)
            repo.refs[revision] = sha
        return sha

    def add_repo_dir(self, repo_id: str, path: str | os.PathLike[str], revision: str = "main") -> str:
        """Like :meth:`add_repo` with every file under directory ``path`` (``.git`` skipped)."""
        root = Path(path)
        if not root.is_dir():
            raise NotADirectoryError(str(root))
        files: dict[str, bytes] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in sorted(filenames):
                full = Path(dirpath) / name
                files[full.relative_to(root).as_posix()] = full.read_bytes()
        return self.add_repo(repo_id, files, revision=revision)

    def add_alias(self, alias: str, repo_id: str) -> None:
        """Make ``alias`` (e.g. ``gpt2``) redirect (307) to ``repo_id``, like the real Hub."""
        with self._lock:
            self._aliases[alias] = repo_id

    def commit_sha(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            return self._repos[repo_id].refs[revision]

    # ------------------------------------------------------------------ faults
    def set_fault(self, filename: str, n_bytes: int, *, reset: bool = True, times: int | None = None) -> None:
        """Make GETs of ``filename`` die after absolute byte offset ``n_bytes``.

        ``reset=True`` (default) aborts with a TCP RST: huggingface_hub 2.x sees
        ``httpx2.ReadError`` ("connection reset by peer"), which it does *not* retry, so
        ``hf_hub_download`` / ``snapshot_download`` raise at once. ``reset=False`` closes
        cleanly (FIN) short of the announced ``Content-Length``: the client sees
        ``RemoteProtocolError``, sleeps 1 s and retries (up to 5 times without progress),
        sending ``Range: bytes=k-`` where ``k`` is what it has *yielded* so far -- it reads in
        10 MiB chunks (``constants.DOWNLOAD_CHUNK_SIZE``), so below that it restarts from 0. A
        ranged retry with ``k >= n_bytes`` gets ``503`` while the fault holds (the client does
        not retry that). ``times`` limits the fault to that many GETs (``None``: until
        :meth:`clear_faults`); ``times=1, reset=False`` thus exercises the client's own resume.
        """
        with self._lock:
            self.fail_after_bytes[filename] = int(n_bytes)
            self._fault_opts[filename] = _FaultOpts(reset=reset, times=times)

    def pause_after(self, filename: str, n_bytes: int) -> threading.Event:
        """Make GETs of ``filename`` stop after ``n_bytes`` of the body until the returned event is
        set: a transfer held mid-way, so a test can act on it without racing the clock."""
        release = threading.Event()
        with self._lock:
            self.pauses[filename] = (int(n_bytes), release)
        return release

    def clear_faults(self) -> None:
        with self._lock:
            self.fail_after_bytes.clear()
            self._fault_opts.clear()
            self.slow_bytes_per_second = None
            for _, release in self.pauses.values():
                release.set()
            self.pauses.clear()

    def _take_fault(self, filename: str) -> tuple[int, bool] | None:
        with self._lock:
            if filename not in self.fail_after_bytes:
                return None
            limit = self.fail_after_bytes[filename]
            opts = self._fault_opts.get(filename, _FaultOpts())
            if opts.times is not None:
                opts.times -= 1
                if opts.times <= 0:
                    self.fail_after_bytes.pop(filename, None)
                    self._fault_opts.pop(filename, None)
            return limit, opts.reset

    # ------------------------------------------------------------------ inspection
    def downloaded_files(self, repo_id: str, revision: str | None = None) -> set[str]:
        """Filenames requested with GET on ``/{repo_id}/resolve/...`` (any revision by default)."""
        return self._resolve_requests("GET", repo_id, revision)

    def head_files(self, repo_id: str, revision: str | None = None) -> set[str]:
        """Filenames requested with HEAD on ``/{repo_id}/resolve/...``."""
        return self._resolve_requests("HEAD", repo_id, revision)

    def _resolve_requests(self, method: str, repo_id: str, revision: str | None) -> set[str]:
        n = repo_id.count("/") + 1
        out: set[str] = set()
        with self._lock:
            reqs = list(self.requests)
        for m, raw in reqs:
            if m != method:
                continue
            segs = urlsplit(raw).path.split("/")[1:]
            if len(segs) < n + 3 or segs[n] != "resolve":
                continue
            if "/".join(unquote(s) for s in segs[:n]) != repo_id:
                continue
            if revision is not None and unquote(segs[n + 1]) != revision:
                continue
            out.add(unquote("/".join(segs[n + 2 :])))
        return out

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.request_log.clear()

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append((rec.method, rec.path))
            self.request_log.append(rec)

    # ------------------------------------------------------------------ lifecycle
    def start(self, port: int = 0) -> str:
        """Serve on 127.0.0.1 (``port=0``: a free port) in a daemon thread; return the endpoint."""
        if self._server is not None:
            assert self.endpoint is not None
            return self.endpoint
        server = _Server(("127.0.0.1", port), self)
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop serving and drop every open (keep-alive) connection. Idempotent."""
        for _, release in list(self.pauses.values()):
            release.set()  # a held transfer must not keep a handler thread alive
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_all_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> HubSim:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ lookup helpers
    def _lookup(self, repo_id: str) -> tuple[str, _Repo | None]:
        """('repo'|'alias'|'missing', repo) for a repo id."""
        with self._lock:
            if repo_id in self._repos:
                return "repo", self._repos[repo_id]
            if repo_id in self._aliases:
                return "alias", None
            return "missing", None

    def _alias_target(self, repo_id: str) -> str:
        with self._lock:
            return self._aliases[repo_id]

    def _known(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos or repo_id in self._aliases


def _split_repo(hub: HubSim, segs: list[str], keywords: set[str]) -> tuple[int, str, list[str]] | None:
    """Split path segments into (n_segments, repo_id, rest); rest starts with a keyword."""
    candidates = [n for n in (2, 1) if len(segs) >= n and (len(segs) == n or segs[n] in keywords)]
    for n in candidates:
        repo_id = "/".join(segs[:n])
        if hub._known(repo_id):
            return n, repo_id, segs[n:]
    if candidates:
        n = candidates[0]
        return n, "/".join(segs[:n]), segs[n:]
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubSim) -> None:
        self.hub = hub
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # type: ignore[no-untyped-def]
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        if isinstance(sys.exc_info()[1], OSError):
            return  # client went away / connection killed on purpose: not worth a traceback
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubsim/1.0"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    # ------------------------------------------------------------------ plumbing
    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def send_response(self, code: int, message: str | None = None) -> None:
        record = getattr(self, "_record", None)
        if record is not None:
            record.status = code
        super().send_response(code, message)

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        self._record = RequestRecord(method, self.path, {k.lower(): v for k, v in self.headers.items()})
        hub._record(self._record)
        body = b""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length)
        try:
            self._route(method, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: object, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        extra = dict(headers or {})
        if code is not None:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._json({"error": message}, status, extra)

    def _repo_not_found(self) -> None:
        self._error(
            404,
            "RepoNotFound",
            "Repository not found",
        )

    def _redirect(self, location: str) -> None:
        self._send(307, b"", {"Location": location}, content_type="text/plain")

    # ------------------------------------------------------------------ routing
    def _route(self, method: str, body: bytes) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        raw_segs = split.path.split("/")[1:]
        segs = [unquote(s) for s in raw_segs]
        query = parse_qs(split.query, keep_blank_values=True)
        if segs[:2] == ["api", "models"]:
            parsed = _split_repo(hub, segs[2:], {"revision", "tree", "refs", "paths-info"})
            if parsed is None:
                return self._error(404, None, "Not found")
            n, repo_id, rest = parsed
            kind, repo = hub._lookup(repo_id)
            if kind == "alias":
                target = "/".join(quote(p, safe="") for p in hub._alias_target(repo_id).split("/"))
                location = "/".join(["", "api", "models", target, *raw_segs[2 + n :]])
                return self._redirect(location + (f"?{split.query}" if split.query else ""))
            if repo is None:
                return self._repo_not_found()
            return self._api(method, repo, rest, query, body)
        if segs and segs[0] in ("api", "datasets", "spaces", "kernels"):
            # Only model repos exist here (whoami, datasets, spaces, ... are not imitated).
            return self._repo_not_found() if segs[0] != "api" else self._error(404, None, "Not found")
        parsed = _split_repo(hub, segs, {"resolve"})
        if parsed is None or len(parsed[2]) < 3 or method not in ("GET", "HEAD"):
            return self._error(404, None, "Not found")
        n, repo_id, rest = parsed
        kind, repo = hub._lookup(repo_id)
        if kind == "alias":
            target = "/".join(quote(p, safe="") for p in hub._alias_target(repo_id).split("/"))
            location = "/".join(["", target, *raw_segs[n:]])
            return self._redirect(location + (f"?{split.query}" if split.query else ""))
        if repo is None:
            return self._repo_not_found()
        return self._resolve(method, repo, rest[1], "/".join(rest[2:]))

    def _commit_or_404(self, repo: _Repo, revision: str) -> _Commit | None:
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _api(
        self, method: str, repo: _Repo, rest: list[str], query: dict[str, list[str]], body: bytes
    ) -> None:
        if not rest or rest[0] == "revision":
            if method not in ("GET", "HEAD"):
                return self._error(405, None, "Method not allowed")
            revision = "/".join(rest[1:]) if rest else repo.default_branch
            commit = self._commit_or_404(repo, revision)
            if commit is not None:
                self._json(self._model_info(repo, commit, query))
            return None
        if rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit_or_404(repo, rest[1])
            if commit is None:
                return None
            recursive = query.get("recursive", ["false"])[0].lower() in _TRUE
            return self._tree(commit, "/".join(rest[2:]), recursive)
        if rest[0] == "refs" and len(rest) == 1:
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                for name, sha in repo.refs.items()
            ]
            data: dict = {"branches": branches, "converts": [], "tags": []}
            if query.get("include_prs", ["0"])[0].lower() in _TRUE:
                data["pullRequests"] = []
            return self._json(data)
        if rest[0] == "paths-info" and len(rest) >= 2 and method == "POST":
            commit = self._commit_or_404(repo, "/".join(rest[1:]))
            if commit is None:
                return None
            return self._paths_info(commit, body)
        return self._error(404, None, "Not found")

    # ------------------------------------------------------------------ api payloads
    def _model_info(self, repo: _Repo, commit: _Commit, query: dict[str, list[str]]) -> dict:
        blobs = query.get("blobs", ["false"])[0].lower() in _TRUE
        siblings = []
        for path in sorted(commit.files):
            blob = commit.files[path]
            sibling: dict = {"rfilename": path}
            if blobs:  # like the Hub: sizes and LFS info only with ?blobs=true
                sibling["size"] = blob.size
                sibling["blobId"] = blob.blob_id
                if blob.sha256 is not None:
                    sibling["lfs"] = {
                        "size": blob.size,
                        "sha256": blob.sha256,
                        "pointerSize": blob.pointer_size,
                    }
            siblings.append(sibling)
        data: dict = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": _FIXED_DATE,
            "createdAt": _FIXED_DATE,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
        }
        config = commit.files.get("config.json")
        if config is not None:
            try:
                cfg = json.loads(config.data)
            except ValueError:
                cfg = None
            if isinstance(cfg, dict):
                data["config"] = {k: cfg[k] for k in ("architectures", "model_type") if k in cfg}
                data["library_name"] = "transformers"
        params: dict[str, int] = {}
        for path, blob in commit.files.items():
            if path.endswith(".safetensors"):
                for dtype, count in (_safetensors_params(blob.data) or {}).items():
                    params[dtype] = params.get(dtype, 0) + count
        if params:
            data["safetensors"] = {"parameters": params, "total": sum(params.values())}
        expand = query.get("expand", []) + query.get("expand[]", [])
        if expand:
            data["usedStorage"] = sum(b.size for b in commit.files.values())
            data = {k: v for k, v in data.items() if k in {"_id", "id", *expand}}
        return data

    @staticmethod
    def _dir_entry(commit: _Commit, path: str) -> dict:
        listing = "".join(
            f"{p} {b.blob_id}\n" for p, b in sorted(commit.files.items()) if p.startswith(path + "/")
        )
        return {
            "type": "directory",
            "oid": hashlib.sha1(listing.encode()).hexdigest(),
            "size": 0,
            "path": path,
        }

    def _tree(self, commit: _Commit, path: str, recursive: bool) -> None:
        prefix = path.strip("/")
        dirs: set[str] = set()
        files: list[dict] = []
        for p in sorted(commit.files):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rel = p[len(prefix) + 1 :] if prefix else p
            parts = rel.split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                d = "/".join(parts[:i])
                dirs.add(f"{prefix}/{d}" if prefix else d)
            if recursive or len(parts) == 1:
                files.append(commit.files[p].tree_entry())
        if prefix and not dirs and not files:
            return self._error(
                404,
                "EntryNotFound",
                f"{prefix} does not exist",
                {"X-Repo-Commit": commit.sha},
            )
        entries = [self._dir_entry(commit, d) for d in sorted(dirs)] + files
        return self._json(entries)

    def _paths_info(self, commit: _Commit, body: bytes) -> None:
        ctype = self.headers.get("Content-Type", "")
        paths: list[str]
        if "json" in ctype:
            try:
                raw = json.loads(body or b"{}").get("paths", [])
            except (ValueError, AttributeError):
                raw = []
            paths = [raw] if isinstance(raw, str) else list(raw)
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths = form.get("paths", []) + form.get("paths[]", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(commit.files[p].tree_entry())
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append(self._dir_entry(commit, p))
        return self._json(out)

    # ------------------------------------------------------------------ file download
    def _resolve(self, method: str, repo: _Repo, revision: str, filename: str) -> None:
        commit = self._commit_or_404(repo, revision)
        if commit is None:
            return
        blob = commit.files.get(filename)
        if blob is None:
            return self._error(
                404,
                "EntryNotFound",
                "Entry not found",
                {"X-Repo-Commit": commit.sha},
            )
        size = blob.size
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": (
                f"inline; filename*=UTF-8''{quote(filename.rsplit('/', 1)[-1])}; "
                f'filename="{filename.rsplit("/", 1)[-1]}"'
            ),
        }
        if blob.sha256 is not None:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(size)
        start, end = 0, size  # [start, end)
        status = 200
        rng = self.headers.get("Range")
        if rng:
            parsed = _parse_range(rng, size)
            if parsed is None:
                headers["Content-Range"] = f"bytes */{size}"
                return self._error(416, None, "Range Not Satisfiable", headers)
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"

        fault = self.server.hub._take_fault(filename) if method == "GET" else None
        if fault is not None and start >= fault[0] and start > 0:
            return self._error(503, None, "hubsim: simulated outage (fault injected)")

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method == "HEAD":
            return None
        limit = end if fault is None else max(start, min(end, fault[0]))
        body = memoryview(blob.data)[start:limit]
        pause = self.server.hub.pauses.get(filename) if method == "GET" else None
        if pause is not None and pause[0] < len(body):
            self._write_body(body[: pause[0]])
            self.wfile.flush()
            pause[1].wait()  # held until the test releases it
            body = body[pause[0] :]
        self._write_body(body)
        if fault is not None:
            self._kill_connection(reset=fault[1])
        return None

    def _write_body(self, data: memoryview) -> None:
        bps = self.server.hub.slow_bytes_per_second
        if not bps:
            self.wfile.write(data)
            return
        chunk = max(1, int(bps / 20))
        for i in range(0, len(data), chunk):
            piece = data[i : i + chunk]
            self.wfile.write(piece)
            time.sleep(len(piece) / bps)

    def _kill_connection(self, *, reset: bool) -> None:
        self.close_connection = True
        sock = self.connection
        try:
            if reset:
                # SO_LINGER with timeout 0: close() sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()  # drop makefile's reference so close() really closes
                sock.close()
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single ``bytes=`` range into [start, end); None if unsatisfiable/invalid."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if not first:  # suffix range: last N bytes
            n = int(last)
            if n <= 0 or size == 0:
                return None
            return max(0, size - n), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        return None
    return start, min(end, size)


# ---------------------------------------------------------------------- script entry point
def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--repo",
        action="append",
        default=[],
        metavar="REPO_ID[@REVISION]=DIR",
        help="serve the files under DIR as REPO_ID at REVISION (default main); repeatable",
    )
    parser.add_argument("--alias", action="append", default=[], metavar="ALIAS=REPO_ID")
    parser.add_argument("--fail-after", action="append", default=[], metavar="FILENAME=N")
    parser.add_argument("--slow", type=float, default=None, metavar="BYTES_PER_SECOND")
    args = parser.parse_args(argv)

    hub = HubSim()
    for spec in args.repo:
        repo_spec, sep, directory = spec.partition("=")
        if not sep:
            parser.error(f"--repo expects REPO_ID=DIR, got {spec!r}")
        repo_id, _, revision = repo_spec.partition("@")
        sha = hub.add_repo_dir(repo_id, directory, revision=revision or "main")
        print(f"hubsim: {repo_id}@{revision or 'main'} = {sha}", file=sys.stderr)
    for spec in args.alias:
        alias, _, target = spec.partition("=")
        hub.add_alias(alias, target)
    for spec in args.fail_after:
        name, _, n = spec.rpartition("=")
        hub.set_fault(name, int(n))
    hub.slow_bytes_per_second = args.slow

    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    endpoint = hub.start(args.port)
    print(endpoint, flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
