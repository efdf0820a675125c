"""The fake Hub in ``tests/hubsim.py`` works with the *real* huggingface_hub client.

Two ways to point the client at the simulator, both exercised here:

* ``HF_ENDPOINT=<sim.endpoint>`` in the environment of a **subprocess**. huggingface_hub reads
  ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` once, at import time (``constants.py``), so
  setting them in an already-running process has no effect; this is the way to test the CLI.
* ``endpoint=sim.endpoint`` passed **in-process** to ``snapshot_download`` / ``hf_hub_download`` /
  ``HfApi(endpoint=...)`` (plus ``cache_dir=``): works too (huggingface_hub 2.4) and is much faster.
  ``HF_HUB_OFFLINE`` cannot be toggled that way (use a subprocess or ``local_files_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    from hubsim import HubSim, git_blob_sha1
except ImportError:  # tests/ turned into a package
    from tests.hubsim import HubSim, git_blob_sha1

HUBSIM_PY = Path(__file__).with_name("hubsim.py")
REPO = "org/tiny"


def _safetensors(n_floats: int) -> bytes:
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    body = hashlib.sha256(b"seed").digest() * (4 * n_floats // 32 + 1)
    return struct.pack("<Q", len(header)) + header + body[: 4 * n_floats]


def _repo_files(tag: str = "main") -> dict[str, bytes]:
    return {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": f"# tiny ({tag})\n".encode(),
        "config.json": json.dumps({"model_type": "gpt2", "tag": tag}).encode(),
        "vocab.json": b'{"a": 0, "b": 1}',
        "merges.txt": b"#version: 0.2\na b\n",
        "model.safetensors": _safetensors(50_000),  # ~200 kB, LFS
        "pytorch_model.bin": os.urandom(1000),  # LFS, never allowed below
        "onnx/decoder.onnx": b"onnx" * 10,
    }


@pytest.fixture()
def files() -> dict[str, bytes]:
    return _repo_files()


@pytest.fixture()
def hub(files: dict[str, bytes]):
    sim = HubSim()
    sim.add_repo(REPO, files)
    with sim:
        yield sim


def _client_env(endpoint: str, hf_home: Path, *, offline: bool = False) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


_PRELUDE = """\
import json, os, sys
from pathlib import Path
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub import errors

def emit(**kw):
    print("RESULT " + json.dumps(kw), flush=True)

"""


def run_client(code: str, endpoint: str, hf_home: Path, *, offline: bool = False) -> dict:
    """Run ``code`` in a fresh interpreter configured by env vars; return what it ``emit``-ed."""
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        env=_client_env(endpoint, hf_home, offline=offline),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("RESULT ") :])


def _in_process_hf():
    hf = pytest.importorskip("huggingface_hub")
    constants = pytest.importorskip("huggingface_hub.constants")  # lazy attribute on hf
    if constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is set for the test process")
    return hf


# --------------------------------------------------------------------------- subprocess / env


def test_snapshot_download_allow_patterns_then_offline(hub: HubSim, files, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    allow = ["*.json", "*.safetensors", "merges.txt"]
    code = f"""
        assert constants.ENDPOINT == {hub.endpoint!r}, constants.ENDPOINT
        path = snapshot_download({REPO!r}, revision="main", allow_patterns={allow!r})
        emit(path=path)
    """
    path = Path(run_client(code, hub.endpoint, hf_home)["path"])
    expected = {"config.json", "vocab.json", "model.safetensors", "merges.txt"}

    assert hub.downloaded_files(REPO) == expected
    assert hub.head_files(REPO) == expected  # one HEAD (metadata) + one GET per file
    sha = hub.commit_sha(REPO)
    assert path.name == sha and path.parent.name == "snapshots"
    assert ("GET", f"/api/models/{REPO}/revision/main") in hub.requests
    assert any(p.startswith(f"/api/models/{REPO}/tree/{sha}") for _, p in hub.requests)
    got = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert got == expected
    for name in expected:
        assert (path / name).read_bytes() == files[name], name
    assert not any(hf_home.rglob("*.incomplete"))

    endpoint = hub.endpoint
    hub.stop()
    code = f"""
        path = snapshot_download({REPO!r}, revision="main", allow_patterns={allow!r})
        try:
            snapshot_download({REPO!r}, revision="main")  # wants files never downloaded
            incomplete = None
        except Exception as e:
            incomplete = type(e).__name__
        emit(path=path, offline=constants.HF_HUB_OFFLINE, incomplete=incomplete)
    """
    # Server gone and HF_HUB_OFFLINE=1: served from the cache, no network at all.
    res = run_client(code, endpoint, hf_home, offline=True)
    assert res["offline"] is True
    assert Path(res["path"]) == path
    assert res["incomplete"] == "IncompleteSnapshotError"
    # Server gone but not flagged offline: connection refused -> same cached snapshot.
    res = run_client(code, endpoint, hf_home, offline=False)
    assert Path(res["path"]) == path
    assert res["incomplete"] == "IncompleteSnapshotError"


def test_hf_hub_download_single_file_and_canonical_ids(hub: HubSim, files, tmp_path: Path) -> None:
    hub.add_repo("openai-community/gpt2", {"config.json": b'{"n_layer": 12}'})
    hub.add_alias("gpt2", "openai-community/gpt2")  # redirects, like the real Hub
    hub.add_repo("distilgpt2", {"config.json": b'{"n_layer": 6}'})  # a real single-name repo
    code = f"""
        out = {{}}
        for repo in ({REPO!r}, "gpt2", "openai-community/gpt2", "distilgpt2"):
            out[repo] = hf_hub_download(repo, "config.json")
        out["info_id"] = HfApi().model_info("gpt2").id
        try:
            hf_hub_download("nobody/nothing", "config.json")
        except errors.RepositoryNotFoundError:
            out["missing"] = "RepositoryNotFoundError"
        emit(**out)
    """
    res = run_client(code, hub.endpoint, tmp_path / "hf")
    assert Path(res[REPO]).read_bytes() == files["config.json"]
    assert Path(res["gpt2"]).read_bytes() == b'{"n_layer": 12}'
    assert Path(res["openai-community/gpt2"]).read_bytes() == b'{"n_layer": 12}'
    assert Path(res["distilgpt2"]).read_bytes() == b'{"n_layer": 6}'
    assert res["info_id"] == "openai-community/gpt2"
    assert res["missing"] == "RepositoryNotFoundError"
    assert hub.downloaded_files(REPO) == {"config.json"}
    assert hub.downloaded_files("distilgpt2") == {"config.json"}


# --------------------------------------------------------------------------- in-process, endpoint=


def test_in_process_endpoint_and_commit_sha_revision(hub: HubSim, files, tmp_path: Path) -> None:
    hf = _in_process_hf()
    files_v2 = _repo_files("v2")
    sha_main = hub.commit_sha(REPO)
    sha_v2 = hub.add_repo(REPO, files_v2, revision="v2")
    assert sha_v2 != sha_main and len(sha_v2) == 40
    kw = {"endpoint": hub.endpoint, "cache_dir": tmp_path, "token": False}

    path = Path(hf.snapshot_download(REPO, revision=sha_v2, allow_patterns=["*.md", "*.json"], **kw))
    assert path.name == sha_v2
    assert (path / "config.json").read_bytes() == files_v2["config.json"]
    assert (path / "README.md").read_bytes() == b"# tiny (v2)\n"
    # A commit sha needs no revision lookup: only the tree listing + HEAD/GET per file.
    assert not any("/revision/" in p for _, p in hub.requests)
    assert hub.downloaded_files(REPO, revision=sha_v2) == {"README.md", "config.json", "vocab.json"}

    hub.clear_requests()
    by_branch = hf.snapshot_download(REPO, revision="v2", allow_patterns=["*.md", "*.json"], **kw)
    assert Path(by_branch) == path
    assert hub.requests == [("GET", f"/api/models/{REPO}/revision/v2")]  # all cached

    main_cfg = hf.hf_hub_download(REPO, "config.json", revision="main", **kw)
    assert Path(main_cfg).read_bytes() == files["config.json"]
    assert sha_main in main_cfg


def test_not_found_errors(hub: HubSim, tmp_path: Path) -> None:
    hf = _in_process_hf()
    from huggingface_hub import errors

    kw = {"endpoint": hub.endpoint, "cache_dir": tmp_path, "token": False}
    with pytest.raises(errors.RepositoryNotFoundError):
        hf.snapshot_download("nobody/nothing", **kw)
    with pytest.raises(errors.RepositoryNotFoundError):
        hf.hf_hub_download("nobody/nothing", "config.json", **kw)
    with pytest.raises(errors.RepositoryNotFoundError):
        hf.HfApi(endpoint=hub.endpoint, token=False).model_info("nobody/nothing")
    with pytest.raises(errors.RevisionNotFoundError):
        hf.snapshot_download(REPO, revision="no-such-branch", **kw)
    with pytest.raises(errors.RevisionNotFoundError):
        hf.hf_hub_download(REPO, "config.json", revision="f" * 40, **kw)
    with pytest.raises(errors.EntryNotFoundError):
        hf.hf_hub_download(REPO, "missing.txt", **kw)


def test_hfapi_metadata(hub: HubSim, files, tmp_path: Path) -> None:
    hf = _in_process_hf()
    api = hf.HfApi(endpoint=hub.endpoint, token=False)
    sha = hub.commit_sha(REPO)

    info = api.model_info(REPO)
    assert info.id == REPO and info.sha == sha
    assert sorted(s.rfilename for s in info.siblings) == sorted(files)
    assert all(s.size is None for s in info.siblings)  # like the Hub: sizes need files_metadata
    assert info.safetensors is not None and info.safetensors.total == 50_000

    info = api.model_info(REPO, revision=sha, files_metadata=True)
    sib = {s.rfilename: s for s in info.siblings}
    st = sib["model.safetensors"]
    assert st.size == len(files["model.safetensors"])
    assert st.lfs is not None
    assert st.lfs.sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert sib["config.json"].lfs is None
    assert sib["config.json"].blob_id == git_blob_sha1(files["config.json"])

    assert api.repo_info(REPO).sha == sha
    assert sorted(api.list_repo_files(REPO)) == sorted(files)
    top = {e.path for e in api.list_repo_tree(REPO)}
    assert "onnx" in top and "onnx/decoder.onnx" not in top
    assert [b.target_commit for b in api.list_repo_refs(REPO).branches] == [sha]
    assert api.file_exists(REPO, "merges.txt") and not api.file_exists(REPO, "nope.txt")
    assert api.revision_exists(REPO, "main") and not api.revision_exists(REPO, "v9")
    paths = {p.path for p in api.get_paths_info(REPO, ["onnx", "config.json", "absent"])}
    assert paths == {"onnx", "config.json"}
    assert hub.downloaded_files(REPO) == set()


def test_fault_kills_transfer_then_retry_succeeds(hub: HubSim, files, tmp_path: Path) -> None:
    hf = _in_process_hf()
    httpx2 = pytest.importorskip("httpx2")
    kw = {"endpoint": hub.endpoint, "cache_dir": tmp_path, "token": False}
    name = "model.safetensors"
    hub.set_fault(name, 100_000)  # RST after 100 kB of ~200 kB

    with pytest.raises(httpx2.TransportError):  # httpx2.ReadError: connection reset by peer
        hf.hf_hub_download(REPO, name, **kw)
    assert not list(tmp_path.rglob("*.incomplete"))  # 2.x deletes partial files
    assert not [p for p in tmp_path.rglob("blobs/*") if p.is_file()]

    hub.clear_faults()
    path = hf.hf_hub_download(REPO, name, **kw)
    assert Path(path).read_bytes() == files[name]
    gets = [r for r in hub.request_log if r.method == "GET" and r.path.endswith(name)]
    assert len(gets) == 2 and all("range" not in r.headers for r in gets)


def test_client_resumes_with_range_after_clean_close(
    hub: HubSim, files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = _in_process_hf()
    # The client reads 10 MiB chunks and can only resume from what it has yielded.
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 4096)
    name = "model.safetensors"
    hub.set_fault(name, 100_000, reset=False, times=1)
    path = hf.hf_hub_download(REPO, name, endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
    assert Path(path).read_bytes() == files[name]
    gets = [r for r in hub.request_log if r.method == "GET" and r.path.endswith(name)]
    assert [r.status for r in gets] == [200, 206]
    start = int(gets[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 100_000 and start % 4096 == 0


def test_slow_bytes_per_second(hub: HubSim, files, tmp_path: Path) -> None:
    hf = _in_process_hf()
    hub.slow_bytes_per_second = 1_000_000
    t0 = time.monotonic()
    path = hf.hf_hub_download(
        REPO, "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path, token=False
    )
    assert time.monotonic() - t0 >= 0.18  # ~200 kB at 1 MB/s
    assert Path(path).read_bytes() == files["model.safetensors"]


# --------------------------------------------------------------------------- raw HTTP


def _http(url: str, method: str = "GET", headers: dict[str, str] | None = None):
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_raw_http_protocol(hub: HubSim, files) -> None:
    sha = hub.commit_sha(REPO)
    base = f"{hub.endpoint}/{REPO}/resolve/main"
    data = files["model.safetensors"]

    status, h, body = _http(f"{base}/model.safetensors", "HEAD")
    assert status == 200 and body == b""
    assert h["X-Repo-Commit"] == sha
    assert h["X-Linked-Etag"].strip('"') == hashlib.sha256(data).hexdigest()
    assert int(h["X-Linked-Size"]) == int(h["Content-Length"]) == len(data)
    assert not [k for k in h if k.lower().startswith("x-xet")]

    status, h, _ = _http(f"{base}/config.json", "HEAD")
    assert h["ETag"].strip('"') == git_blob_sha1(files["config.json"])
    assert "X-Linked-Etag" not in h

    status, h, body = _http(f"{base}/model.safetensors", headers={"Range": "bytes=100-"})
    assert status == 206 and body == data[100:]
    assert h["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    status, _, body = _http(f"{base}/model.safetensors", headers={"Range": "bytes=-10"})
    assert status == 206 and body == data[-10:]
    status, _, _ = _http(f"{base}/model.safetensors", headers={"Range": f"bytes={len(data)}-"})
    assert status == 416

    status, h, _ = _http(f"{hub.endpoint}/{REPO}/resolve/{sha}/missing.txt")
    assert (status, h["X-Error-Code"], h["X-Repo-Commit"]) == (404, "EntryNotFound", sha)
    status, h, _ = _http(f"{hub.endpoint}/{REPO}/resolve/nope/config.json")
    assert (status, h["X-Error-Code"]) == (404, "RevisionNotFound")
    status, h, _ = _http(f"{hub.endpoint}/api/models/a/b/revision/main")
    assert (status, h["X-Error-Code"]) == (404, "RepoNotFound")
    status, _, body = _http(f"{hub.endpoint}/api/models/{REPO}/revision/{sha}")
    assert status == 200 and json.loads(body)["sha"] == sha


def test_script_mode(files, tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    for name, data in files.items():
        (repo_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / name).write_bytes(data)
    cmd = [sys.executable, str(HUBSIM_PY), "--port", "0", "--repo", f"org/x={repo_dir}"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            endpoint = proc.stdout.readline().strip()
            assert endpoint.startswith("http://127.0.0.1:")
            sim = HubSim()
            expected_sha = sim.add_repo_dir("org/x", repo_dir)
            status, _, body = _http(f"{endpoint}/api/models/org/x")
            assert status == 200 and json.loads(body)["sha"] == expected_sha
            status, _, body = _http(f"{endpoint}/org/x/resolve/main/onnx/decoder.onnx")
            assert status == 200 and body == files["onnx/decoder.onnx"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert proc.returncode == 0
