"""`gpt2 models` against the loopback Hub imitation: pull, faults, concurrency, verify, repair, rm.

huggingface_hub reads HF_ENDPOINT and HF_HOME at import time, so the commands run as
subprocesses (the models commands do not import torch, so each costs about a second).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cliutil import GPT2_BIN, HANG_GUARD, Result, assert_one_line_error, run_inprocess, run_subprocess
from hubsim import HubSim, git_blob_sha1

from gpt2cli.cache import file_digest, safetensors_parameters
from gpt2cli.hub import ALIASES

REPO = "acme/tiny-gpt2"
NEEDED = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "generation_config.json"}


def repo_files(path: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    files["generation_config.json"] = json.dumps({"bos_token_id": 50256, "eos_token_id": 50256}).encode()
    files["tf_model.h5"] = b"tf" * 100  # never fetched
    return files


@pytest.fixture
def hub(ckpt_h: Path):
    sim = HubSim()
    sim.add_repo(REPO, repo_files(ckpt_h))
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def env(hub: HubSim, tmp_path: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint or "", "HF_HOME": str(tmp_path / "hf")}


def gpt2(env: dict[str, str], *args: str) -> Result:
    return run_subprocess(list(args), env=env)


def repo_dir(env: dict[str, str], repo_id: str = REPO) -> Path:
    return Path(env["HF_HOME"]) / "hub" / ("models--" + repo_id.replace("/", "--"))


def weight_blob(env: dict[str, str]) -> Path:
    (link,) = repo_dir(env).glob("snapshots/*/model.safetensors")
    return link.resolve()


def assert_snapshot_intact(env: dict[str, str]) -> None:
    """Every file in snapshots/ has the content its blob name (the Hub's ETag) promises."""
    for link in repo_dir(env).glob("snapshots/*/*"):
        digest = link.resolve().name
        algorithm = "sha256" if len(digest) == 64 else "git-sha1"
        assert file_digest(link, algorithm) == digest, link


def offline_pull(env: dict[str, str]) -> Result:
    """Resolve the model from the cache alone, as `generate --offline` does (without loading torch)."""
    return gpt2(env, "models", "pull", REPO, "--offline")


def test_pull_fetches_needed_files_then_only_checks_the_revision(hub: HubSim, env: dict[str, str]) -> None:
    first = gpt2(env, "models", "pull", REPO, "--format", "json")
    assert first.code == 0, first.err
    report = json.loads(first.out)
    assert set(report["downloaded"]) == NEEDED and report["checked_hub"] is True
    assert report["model"]["commit"] == hub.commit_sha(REPO)
    assert hub.downloaded_files(REPO) == NEEDED
    assert_snapshot_intact(env)

    hub.clear_requests()
    again = gpt2(env, "models", "pull", REPO)
    assert again.code == 0 and "up to date" in again.out, again.err
    assert [m for m, _ in hub.requests] == ["GET"]  # the revision check, nothing else
    assert hub.requests[0][1].startswith(f"/api/models/{REPO}")

    hub.clear_requests()
    offline = gpt2(env, "models", "pull", REPO, "--offline")
    assert offline.code == 0 and "not checked" in offline.out, offline.err
    assert hub.requests == []


def test_pull_offline_of_uncached_model_asks_nothing(hub: HubSim, env: dict[str, str]) -> None:
    result = gpt2(env, "models", "pull", REPO, "--offline")
    assert_one_line_error(result, 1, "not in the local cache")
    assert hub.requests == []


def test_failed_transfer_leaves_nothing_and_next_pull_completes(hub: HubSim, env: dict[str, str]) -> None:
    hub.set_fault("model.safetensors", 200_000)  # connection reset mid-file
    failed = gpt2(env, "models", "pull", REPO)
    assert_one_line_error(failed, 1, "download")
    assert not list(repo_dir(env).glob("snapshots/*/model.safetensors"))
    assert not list(repo_dir(env).glob("blobs/*.incomplete"))
    # refs/main moves to a commit only once its snapshot is complete
    assert_one_line_error(offline_pull(env), 1, "not in the local cache")
    hub.clear_faults()
    done = gpt2(env, "models", "pull", REPO)
    assert done.code == 0, done.err
    assert "downloaded" in done.out
    assert_snapshot_intact(env)
    assert offline_pull(env).code == 0


def _popen_pull(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(GPT2_BIN), "models", "pull", REPO],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


HELD_AT = (1 << 20) + 1  # the client writes 1 MiB at a time (hub.PROGRESS_CHUNK): one lands


def _wait_for_weights_transfer(env: dict[str, str], ckpt: Path, proc: subprocess.Popen[bytes]) -> Path:
    """Wait until the held transfer (``hub.pause_after``) has written its first MiB to the
    temporary download file: an event, however busy the machine (the poll has no deadline but
    the process's own end)."""
    sha = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    blobs = repo_dir(env) / "blobs"
    while not any(p.stat().st_size > 0 for p in blobs.glob(f"{sha}.*.incomplete")):
        assert proc.poll() is None, "the pull ended before its weights transfer started"
        time.sleep(0.05)
    return blobs


def test_killed_pull_leaves_no_loadable_partial_and_next_pull_completes(
    hub: HubSim, env: dict[str, str], ckpt_h: Path
) -> None:
    release = hub.pause_after("model.safetensors", HELD_AT)  # the transfer waits mid-way
    proc = _popen_pull(env)
    blobs = _wait_for_weights_transfer(env, ckpt_h, proc)
    proc.send_signal(signal.SIGKILL)  # no cleanup at all: the worst case
    proc.wait(timeout=HANG_GUARD)
    release.set()
    (partial,) = blobs.glob("*.incomplete")
    assert not list(repo_dir(env).glob("snapshots/*/model.safetensors"))
    assert_snapshot_intact(env)
    assert_one_line_error(offline_pull(env), 1, "not in the local cache")

    hub.clear_faults()
    done = gpt2(env, "models", "pull", REPO)
    assert done.code == 0, done.err
    assert not partial.exists()  # the orphan of the killed pull is cleaned up
    assert_snapshot_intact(env)
    assert offline_pull(env).code == 0


def test_interrupted_pull_exits_130_and_cleans_up(hub: HubSim, env: dict[str, str], ckpt_h: Path) -> None:
    release = hub.pause_after("model.safetensors", HELD_AT)
    proc = _popen_pull(env)
    blobs = _wait_for_weights_transfer(env, ckpt_h, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_GUARD)
    release.set()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert not list(blobs.glob("*.incomplete"))
    assert not list(repo_dir(env).glob("snapshots/*/model.safetensors"))


def test_concurrent_pulls_both_succeed_with_one_copy(hub: HubSim, env: dict[str, str]) -> None:
    hub.slow_bytes_per_second = 4_000_000  # long enough for the two transfers to overlap
    procs = [_popen_pull(env), _popen_pull(env)]
    for proc in procs:
        _, err = proc.communicate(timeout=HANG_GUARD)
        assert proc.returncode == 0, err
    gets = [p for m, p in hub.requests if m == "GET" and p.endswith("/model.safetensors")]
    assert len(gets) == 1  # the second process waited on the lock and found the blob
    blobs = sorted(p.name for p in (repo_dir(env) / "blobs").iterdir())
    assert len(blobs) == len(NEEDED) and not any(b.endswith(".incomplete") for b in blobs)
    assert_snapshot_intact(env)


def test_verify_catches_flipped_byte_and_repair_fixes_it(hub: HubSim, env: dict[str, str]) -> None:
    assert gpt2(env, "models", "pull", REPO).code == 0
    assert gpt2(env, "models", "verify", REPO).code == 0
    blob = weight_blob(env)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))

    bad = gpt2(env, "models", "verify", REPO)
    assert_one_line_error(bad, 1, "model.safetensors", f"gpt2 models verify {REPO} --repair")
    assert "corrupt" in bad.out and "model.safetensors" in bad.out

    hub.clear_requests()
    fixed = gpt2(env, "models", "verify", REPO, "--repair", "--format", "json")
    assert fixed.code == 0, fixed.err
    report = json.loads(fixed.out)
    assert report["ok"] is True
    weights = next(f for f in report["files"] if f["name"] == "model.safetensors")
    assert weights["repaired"] is True and weights["actual"] == weights["expected"] == blob.name
    assert hub.downloaded_files(REPO) == {"model.safetensors"}  # only the bad file again
    assert_snapshot_intact(env)
    assert gpt2(env, "models", "verify", REPO).code == 0


def test_truncated_weights_are_a_clear_error_when_loading(hub: HubSim, env: dict[str, str]) -> None:
    assert gpt2(env, "models", "pull", REPO).code == 0
    blob = weight_blob(env)
    with open(blob, "r+b") as fh:
        fh.truncate(blob.stat().st_size // 3)

    result = gpt2(env, "generate", "-m", REPO, "Hi", "-n", "2")
    assert_one_line_error(result, 1, "truncated", f"gpt2 models verify {REPO} --repair")
    check = gpt2(env, "models", "verify", REPO, "--format", "json")
    assert check.code == 1
    statuses = {f["name"]: f["status"] for f in json.loads(check.out)["files"]}
    assert statuses["model.safetensors"] == "truncated"
    assert gpt2(env, "models", "verify", REPO, "--repair").code == 0
    assert_snapshot_intact(env)


def test_list_and_info_text_and_json(hub: HubSim, env: dict[str, str], ckpt_h: Path, lm_h) -> None:  # type: ignore[no-untyped-def]
    hub.add_repo(ALIASES["gpt2"], repo_files(ckpt_h))
    empty = gpt2(env, "models", "list", "--format", "json")
    assert empty.code == 0 and json.loads(empty.out) == []
    assert gpt2(env, "models", "pull", REPO).code == 0
    assert gpt2(env, "models", "pull", "gpt2").code == 0
    n_params = sum(p.numel() for p in lm_h.model.parameters())

    listing = json.loads(gpt2(env, "models", "list", "--format", "json").out)
    assert [m["name"] for m in listing] == [REPO, "gpt2"]
    alias = listing[1]
    assert alias["repo_id"] == ALIASES["gpt2"] and alias["aliases"] == ["gpt2"]
    assert alias["refs"] == ["main"] and alias["commit"] == hub.commit_sha(ALIASES["gpt2"])
    assert alias["parameters"] == n_params  # mask buffers in the file are not parameters
    assert alias["size"] == sum(len(repo_files(ckpt_h)[f]) for f in NEEDED)
    assert {f["name"] for f in alias["files"]} == NEEDED

    text = gpt2(env, "models", "list")
    lines = text.out.splitlines()
    assert lines[0].split() == ["NAME", "REPO", "REVISION", "PARAMS", "SIZE", "FILES", "STATUS"]
    assert lines[2].split()[:3] == ["gpt2", ALIASES["gpt2"], "main"] and lines[2].split()[-1] == "ok"
    assert "\x1b" not in text.out

    info = json.loads(gpt2(env, "models", "info", "gpt2", "--format", "json").out)
    assert info["config"] == {
        "model_type": "gpt2",
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "n_positions": 128,
        "vocab_size": 50257,
    }
    assert info["dtype"] == "F32"
    weights = next(f for f in info["files"] if f["name"] == "model.safetensors")
    assert weights["digest"] == hashlib.sha256((ckpt_h / "model.safetensors").read_bytes()).hexdigest()
    assert Path(info["path"]).is_dir()
    info_text = gpt2(env, "models", "info", "gpt2").out
    assert f"parameters  {n_params:,}" in info_text and weights["digest"] in info_text


def test_rm_asks_first_and_reports_space_freed(hub: HubSim, env: dict[str, str]) -> None:
    assert gpt2(env, "models", "pull", REPO).code == 0
    size = json.loads(gpt2(env, "models", "info", REPO, "--format", "json").out)["size"]
    refused = gpt2(env, "models", "rm", REPO)  # stdin is not a terminal, no --yes
    assert_one_line_error(refused, 2, "--yes")
    assert repo_dir(env).exists()
    done = gpt2(env, "models", "rm", REPO, "--yes", "--format", "json")
    assert done.code == 0, done.err
    assert json.loads(done.out)["freed"] == size
    assert not repo_dir(env).exists()
    assert json.loads(gpt2(env, "models", "list", "--format", "json").out) == []
    assert_one_line_error(gpt2(env, "models", "rm", REPO, "--yes"), 1, "not in the local cache")


def test_rm_one_revision(hub: HubSim, env: dict[str, str], ckpt_t: Path) -> None:
    hub.add_repo(REPO, repo_files(ckpt_t), revision="v2")
    assert gpt2(env, "models", "pull", REPO).code == 0
    assert gpt2(env, "models", "pull", f"{REPO}@v2").code == 0
    names = [m["name"] for m in json.loads(gpt2(env, "models", "list", "--format", "json").out)]
    assert sorted(names) == sorted([REPO, f"{REPO}@v2"])
    done = gpt2(env, "models", "rm", f"{REPO}@v2", "-y")
    assert done.code == 0 and "freed" in done.out, done.err
    names = [m["name"] for m in json.loads(gpt2(env, "models", "list", "--format", "json").out)]
    assert names == [REPO]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["models", "info", "bad name!"], 2, "not a model name"),
        (["models", "info", "acme/absent"], 1, "not in the local cache"),
        (["models", "verify", "acme/absent"], 1, "gpt2 models pull"),
        (["models", "pull", "."], 2, "local directory"),
        (["models", "list", "--format", "yaml"], 2, "--format"),
    ],
)
def test_bad_input(
    args: list[str],
    code: int,
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert_one_line_error(run_inprocess(args, capsys, monkeypatch), code, needle)


def test_pull_unknown_repo(hub: HubSim, env: dict[str, str]) -> None:
    assert_one_line_error(gpt2(env, "models", "pull", "acme/nothing"), 1, "no model named")


def test_digests_match_the_hubs(ckpt_h: Path) -> None:
    config = ckpt_h / "config.json"
    assert file_digest(config, "git-sha1") == git_blob_sha1(config.read_bytes())
    weights = ckpt_h / "model.safetensors"
    assert file_digest(weights, "sha256") == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_parameter_count_from_headers(ckpt_h: Path, ckpt_t: Path, lm_h) -> None:  # type: ignore[no-untyped-def]
    n_params = sum(p.numel() for p in lm_h.model.parameters())
    assert safetensors_parameters([ckpt_h / "model.safetensors"]) == (n_params, "F32")
    assert safetensors_parameters([ckpt_t / "model.safetensors"]) == (n_params, "F32")


def test_pull_with_hub_down_uses_the_cache_and_says_so(hub: HubSim, env: dict[str, str]) -> None:
    assert gpt2(env, "models", "pull", REPO).code == 0
    hub.stop()
    result = gpt2(env, "models", "pull", REPO)
    assert result.code == 0, result.err
    assert "gpt2: warning:" in result.err and "cannot reach the hub" in result.err.lower()
    assert "not checked" in result.out


@pytest.mark.parametrize(("answer", "code"), [("n\n", 0), ("y\n", 0)])
def test_rm_confirms_on_a_terminal(
    answer: str,
    code: int,
    hub: HubSim,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gpt2cli.cache
    import gpt2cli.cli.models

    assert gpt2(env, "models", "pull", REPO).code == 0
    # huggingface_hub fixed its cache path when this process imported it: point ours at env's
    monkeypatch.setattr(gpt2cli.cache, "cache_dir", lambda: Path(env["HF_HOME"]) / "hub")
    monkeypatch.setattr(gpt2cli.cli.models, "is_terminal", lambda stream: True)
    result = run_inprocess(["models", "rm", REPO], capsys, monkeypatch, stdin=answer.encode())
    assert result.code == code, result.err
    assert f"Delete {REPO}@" in result.err  # the question goes to stderr
    assert repo_dir(env).exists() == (answer == "n\n")
    if answer == "n\n":  # declining is an answer, not an error
        assert "gpt2: error:" not in result.err and "nothing deleted" in result.err
        assert result.out == ""
    else:
        assert result.out.startswith(f"removed {REPO}@") and "freed" in result.out


def test_models_commands_import_nothing_heavy(hub: HubSim, env: dict[str, str]) -> None:
    code = (
        "import sys\n"
        "from gpt2cli.cli.app import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'tiktoken', 'prompt_toolkit') if m in sys.modules]\n"
        "heavy += ['huggingface_hub'] if '--help' in sys.argv and 'huggingface_hub' in sys.modules else []\n"
        "assert not heavy, heavy\n"
    )
    for args in (["models", "--help"], ["models", "pull", "--help"], ["models", "pull", REPO]):
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            env={**os.environ, **env},
            timeout=HANG_GUARD,
        )
        assert proc.returncode == 0, (args, proc.stderr.decode())


def test_missing_blob_is_reported_repaired_and_removable(hub: HubSim, env: dict[str, str]) -> None:
    assert gpt2(env, "models", "pull", REPO).code == 0
    weight_blob(env).unlink()  # scan_cache_dir now refuses the whole repo
    bad = gpt2(env, "models", "verify", REPO, "--format", "json")
    assert_one_line_error(bad, 1, "failed verification", "--repair")
    statuses = {f["name"]: f["status"] for f in json.loads(bad.out)["files"]}
    assert statuses["model.safetensors"] == "missing"
    assert gpt2(env, "models", "verify", REPO, "--repair").code == 0
    assert_snapshot_intact(env)
    weight_blob(env).unlink()
    assert gpt2(env, "models", "rm", REPO, "--yes").code == 0
    assert not repo_dir(env).exists()


# --- issue 14: partial snapshots, local directories, several names, aliases -------------------


def interrupted_pull(env: dict[str, str]) -> None:
    """The state a pull killed (or stopped by a full disk) before the weights leaves: no weights."""
    (link,) = repo_dir(env).glob("snapshots/*/model.safetensors")
    blob = link.resolve()
    link.unlink()
    blob.unlink()


def test_partial_snapshot_is_marked_verified_and_repaired(hub: HubSim, env: dict[str, str]) -> None:
    assert gpt2(env, "models", "pull", REPO).code == 0
    interrupted_pull(env)
    listing = gpt2(env, "models", "list")
    assert listing.code == 0
    row = next(line for line in listing.out.splitlines() if line.startswith(REPO))
    assert row.split()[-1] == "incomplete"
    assert "missing model.safetensors" in listing.err and f"gpt2 models pull {REPO}" in listing.err
    (entry,) = json.loads(gpt2(env, "models", "list", "--format", "json").out)
    assert entry["complete"] is False and entry["missing"] == ["model.safetensors"]
    bad = gpt2(env, "models", "verify", REPO, "--format", "json")
    assert_one_line_error(bad, 1, "model.safetensors", "--repair")
    assert {f["name"]: f["status"] for f in json.loads(bad.out)["files"]}["model.safetensors"] == "missing"
    offline = gpt2(env, "generate", "-m", REPO, "hi", "-n", "2", "--offline")
    assert_one_line_error(offline, 1, "only partly in the local cache", "missing model.safetensors")
    down = gpt2({**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, "generate", "-m", REPO, "hi", "-n", "2")
    assert_one_line_error(down, 1, "only partly in the local cache", "cannot reach the hub")
    fixed = gpt2(env, "models", "verify", REPO, "--repair", "--format", "json")
    assert fixed.code == 0, fixed.err
    weights = next(f for f in json.loads(fixed.out)["files"] if f["name"] == "model.safetensors")
    assert weights["repaired"] is True
    assert_snapshot_intact(env)
    (entry,) = json.loads(gpt2(env, "models", "list", "--format", "json").out)
    assert entry["complete"] is True


def test_verify_without_a_name_checks_every_model(hub: HubSim, env: dict[str, str], ckpt_h: Path) -> None:
    hub.add_repo(ALIASES["gpt2"], repo_files(ckpt_h))
    assert gpt2(env, "models", "pull", REPO).code == 0
    assert gpt2(env, "models", "pull", "gpt2").code == 0
    report = gpt2(env, "models", "verify", "--format", "json")
    assert report.code == 0, report.err
    models = {f["model"] for f in json.loads(report.out)["files"]}
    assert models == {REPO, "gpt2"}
    weight_blob(env).write_bytes(b"\0" * 16)  # REPO's weights
    bad = gpt2(env, "models", "verify")
    assert_one_line_error(bad, 1, "the cache", "gpt2 models verify --repair")


def test_info_and_verify_take_a_model_directory(tmp_path: Path, ckpt_h: Path) -> None:
    import shutil

    local = tmp_path / "my-finetune"
    shutil.copytree(ckpt_h, local)
    info = gpt2({}, "models", "info", str(local), "--format", "json")
    assert info.code == 0, info.err
    obj = json.loads(info.out)
    assert obj["config"]["n_layer"] == 2 and obj["complete"] is True and obj["parameters"] > 0
    assert gpt2({}, "models", "info", str(local)).code == 0
    ok = gpt2({}, "models", "verify", str(local), "--format", "json")
    assert ok.code == 0, ok.err
    assert {f["status"] for f in json.loads(ok.out)["files"]} == {"unverified"}
    weights = local / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (local / "merges.txt").unlink()
    bad = gpt2({}, "models", "verify", str(local), "--format", "json")
    assert_one_line_error(bad, 1, "failed verification")
    statuses = {f["name"]: f["status"] for f in json.loads(bad.out)["files"]}
    assert statuses["model.safetensors"] == "truncated" and statuses["merges.txt"] == "missing"
    assert "cannot be repaired" in bad.err and "--repair" not in bad.err  # no Hub to repair it from
    shutil.copytree(ckpt_h, local, dirs_exist_ok=True)
    data = bytearray(weights.read_bytes())
    data[8:12] = b"{xxx"  # the header's JSON no longer parses; the length and the size still agree
    weights.write_bytes(bytes(data))
    corrupt = gpt2({}, "models", "verify", str(local), "--format", "json")
    assert_one_line_error(corrupt, 1, "failed verification: model.safetensors")
    assert {f["name"]: f["status"] for f in json.loads(corrupt.out)["files"]}[
        "model.safetensors"
    ] == "corrupt"


def test_rm_takes_several_names_and_checks_them_all_first(
    hub: HubSim, env: dict[str, str], ckpt_h: Path
) -> None:
    hub.add_repo(ALIASES["gpt2"], repo_files(ckpt_h))
    assert gpt2(env, "models", "pull", REPO).code == 0
    assert gpt2(env, "models", "pull", "gpt2").code == 0
    refused = gpt2(env, "models", "rm", REPO, "nothere/at-all", "--yes")
    assert_one_line_error(refused, 1, "nothere/at-all", "gpt2 models list")
    assert "models pull" not in refused.err
    assert len(json.loads(gpt2(env, "models", "list", "--format", "json").out)) == 2  # nothing deleted
    done = gpt2(env, "models", "rm", REPO, "gpt2", "--yes")
    assert done.code == 0 and "freed" in done.out, done.err
    assert json.loads(gpt2(env, "models", "ls", "--format", "json").out) == []


def test_ls_is_list(hub: HubSim, env: dict[str, str]) -> None:
    assert gpt2(env, "models", "pull", REPO).code == 0
    assert gpt2(env, "models", "ls").out == gpt2(env, "models", "list").out != ""


def test_list_fits_a_narrow_terminal(
    hub: HubSim, env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpt2cli.cache
    import gpt2cli.cli.output as output

    assert gpt2(env, "models", "pull", REPO).code == 0
    monkeypatch.setattr(gpt2cli.cache, "cache_dir", lambda: Path(env["HF_HOME"]) / "hub")
    monkeypatch.setattr(output, "is_terminal", lambda stream: stream is not None and stream is sys.stdout)
    monkeypatch.setenv("COLUMNS", "40")
    result = run_inprocess(["models", "list"], capsys, monkeypatch)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) >= 3 and max(len(line) for line in lines) <= 40, result.out
    assert "…" not in result.out  # columns left out, none cut
    row = next(line for line in lines if "acme/" in line)
    assert row.split()[0] == REPO and row.split()[-1] == "ok"
