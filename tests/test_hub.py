"""Model resolution and download against the loopback Hub imitation, through the real CLI.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import time, so these run ``gpt2``
as a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoints import make_checkpoint
from cliutil import (
    HANG_GUARD,
    assert_one_line_error,
    in_namespace,
    needs_namespaces,
    read_only,
    run_subprocess,
    run_with_terminal_stderr,
)
from hubsim import HubSim

from gpt2cli.errors import BadInputError, ModelNotFoundError, UnsafeWeightsError
from gpt2cli.hub import ALIASES, choose_files, parse_spec

NEEDED = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "generation_config.json"}
JUNK = {
    "tf_model.h5": b"tf" * 100,
    "flax_model.msgpack": b"flax" * 100,
    "rust_model.ot": b"rust" * 100,
    "onnx/decoder_model.onnx": b"onnx" * 100,
    "64-8bits.tflite": b"tflite" * 100,
    "pytorch_model.bin": b"pickle" * 100,
    "README.md": b"# a model\n",
}


def repo_files(path: Path, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    files["generation_config.json"] = json.dumps({"bos_token_id": 50256, "eos_token_id": 50256}).encode()
    return files | (extra or {})


@pytest.fixture
def hub(tmp_path: Path):
    sim = HubSim()
    sim.start()
    yield sim
    sim.stop()


def hub_env(hub: HubSim, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint or "", "HF_HOME": str(tmp_path / "hf"), **extra}


def greedy(model: str, env: dict[str, str], *more: str):
    return run_subprocess(
        ["generate", "-m", model, "Hi", "-n", "5", "-t", "0", "--ignore-eos", *more], env=env
    )


def test_download_fetches_only_needed_files_then_works_offline(hub: HubSim, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck", seed=5)
    hub.add_repo("acme/tiny-gpt2", repo_files(ckpt, JUNK))
    env = hub_env(hub, tmp_path)
    first = greedy("acme/tiny-gpt2", env)
    assert first.code == 0, first.err
    assert hub.downloaded_files("acme/tiny-gpt2") == NEEDED
    hub.stop()
    again = greedy("acme/tiny-gpt2", env)  # no network, no flag: the cache answers
    assert again.code == 0, again.err
    assert again.out == first.out
    offline = greedy("acme/tiny-gpt2", {**env, "HF_HUB_OFFLINE": "1"})
    assert offline.code == 0 and offline.out == first.out
    flag = greedy("acme/tiny-gpt2", env, "--offline")
    assert flag.code == 0 and flag.out == first.out


def test_offline_never_touches_network(hub: HubSim, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck")
    hub.add_repo("acme/tiny-gpt2", repo_files(ckpt))
    env = hub_env(hub, tmp_path)
    result = greedy("acme/tiny-gpt2", env, "--offline")
    assert_one_line_error(result, 1, "not in the local cache")
    result = greedy("acme/tiny-gpt2", {**env, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, 1, "not in the local cache")
    assert hub.requests == []


def test_alias_and_revision(hub: HubSim, tmp_path: Path) -> None:
    main = make_checkpoint(tmp_path / "main", seed=1)
    v2 = make_checkpoint(tmp_path / "v2", seed=2)
    hub.add_repo(ALIASES["gpt2"], repo_files(main))
    sha = hub.add_repo(ALIASES["gpt2"], repo_files(v2), revision="v2")
    env = hub_env(hub, tmp_path)
    by_alias = greedy("gpt2", env)
    by_rev = greedy(f"{ALIASES['gpt2']}@v2", env)
    by_sha = greedy(f"{ALIASES['gpt2']}@{sha}", env)
    assert by_alias.code == by_rev.code == by_sha.code == 0, by_alias.err + by_rev.err + by_sha.err
    assert by_rev.out == by_sha.out != by_alias.out
    hub.stop()
    assert greedy(f"{ALIASES['gpt2']}@v2", env, "--offline").out == by_rev.out


def test_unknown_repo_and_revision(hub: HubSim, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck")
    hub.add_repo("acme/tiny-gpt2", repo_files(ckpt))
    env = hub_env(hub, tmp_path)
    assert_one_line_error(greedy("acme/nothing-here", env), 1, "no model named")
    assert_one_line_error(greedy("acme/tiny-gpt2@nope", env), 1, "no revision")


def test_unreachable_hub_without_cache(tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    assert_one_line_error(greedy("acme/tiny-gpt2", env), 1, "cannot reach the hub")


def test_pickle_only_repo(hub: HubSim, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck", weights="bin")
    hub.add_repo("acme/pickled", repo_files(ckpt))
    env = hub_env(hub, tmp_path)
    assert_one_line_error(greedy("acme/pickled", env), 1, "pickle", "--allow-pickle")
    assert "pytorch_model.bin" not in hub.downloaded_files("acme/pickled")
    ok = greedy("acme/pickled", env, "--allow-pickle")
    assert ok.code == 0, ok.err
    assert "pytorch_model.bin" in hub.downloaded_files("acme/pickled")


def test_sharded_safetensors(hub: HubSim, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    ckpt = make_checkpoint(tmp_path / "ck", seed=7)
    single = greedy(str(ckpt), {})
    state = load_file(str(ckpt / "model.safetensors"))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(shard_dir / shard))
        weight_map |= dict.fromkeys(keys, shard)
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name in ("config.json", "vocab.json", "merges.txt"):
        (shard_dir / name).write_bytes((ckpt / name).read_bytes())
    local = greedy(str(shard_dir), {})
    assert local.code == 0 and local.out == single.out
    hub.add_repo("acme/sharded", repo_files(shard_dir))
    remote = greedy("acme/sharded", hub_env(hub, tmp_path))
    assert remote.code == 0 and remote.out == single.out, remote.err
    assert hub.downloaded_files("acme/sharded") == {
        "config.json",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
        "model.safetensors.index.json",
        *halves,
    }


def test_parse_spec() -> None:
    assert parse_spec("gpt2").repo_id == "openai-community/gpt2"
    spec = parse_spec("org/name@abc")
    assert (spec.repo_id, spec.revision) == ("org/name", "abc")
    with pytest.raises(BadInputError):
        parse_spec("bad name!")
    with pytest.raises(BadInputError):
        parse_spec("org/name@")
    with pytest.raises(ModelNotFoundError):
        parse_spec("./not/here")


def test_choose_files() -> None:
    listing = [
        "config.json",
        "vocab.json",
        "merges.txt",
        "model.safetensors",
        "pytorch_model.bin",
        "tf_model.h5",
    ]
    assert choose_files(listing, allow_pickle=False) == [
        "config.json",
        "vocab.json",
        "merges.txt",
        "model.safetensors",
    ]
    with pytest.raises(UnsafeWeightsError):
        choose_files(["config.json", "pytorch_model.bin"], allow_pickle=False)
    assert choose_files(["config.json", "pytorch_model.bin"], allow_pickle=True)[-1] == "pytorch_model.bin"


def test_download_progress_on_a_terminal(hub: HubSim, tmp_path: Path) -> None:
    """With stderr on a terminal, a Rich progress display names each file; stdout stays clean."""
    import os

    ckpt = make_checkpoint(tmp_path / "ck")
    hub.add_repo("acme/tiny-gpt2", repo_files(ckpt))
    env = {**os.environ, **hub_env(hub, tmp_path), "TERM": "xterm", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    code, terminal, out = run_with_terminal_stderr(["generate", "-m", "acme/tiny-gpt2", "Hi", "-n", "2"], env)
    assert code == 0
    assert "model.safetensors" in terminal and "config.json" in terminal
    assert "\x1b" not in out.decode()


# --- issue 14: a stalled Hub, disk errors, mistyped paths, other architectures ----------------


class StalledListener:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers them."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.accepted: list = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read, never answered

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def stalled():
    listener = StalledListener()
    yield listener
    listener.close()


def test_stalled_hub_does_not_hang_a_cached_model(
    hub: HubSim, stalled: StalledListener, tmp_path: Path
) -> None:
    """A listener that accepts and never answers: the cached model starts after the short timeout
    (one note on stderr), a commit-pinned spec asks nothing at all, and an uncached one fails."""
    ckpt = make_checkpoint(tmp_path / "ck", seed=5)
    sha = hub.add_repo("acme/tiny-gpt2", repo_files(ckpt))
    first = greedy("acme/tiny-gpt2", hub_env(hub, tmp_path))
    assert first.code == 0, first.err
    env = {**hub_env(hub, tmp_path), "HF_ENDPOINT": stalled.endpoint, "HF_HUB_ETAG_TIMEOUT": "1"}
    # the subprocess timeout is a guard against the hang itself; nothing waits for it to pass
    again = greedy("acme/tiny-gpt2", env)
    assert again.code == 0, again.err
    assert again.out == first.out
    notes = [line for line in again.err.splitlines() if line.startswith("gpt2: warning:")]
    assert len(notes) == 1 and "did not answer within 1 s" in notes[0] and "cached copy" in notes[0], (
        again.err
    )
    asked = len(stalled.accepted)
    assert asked >= 1
    pinned = greedy(f"acme/tiny-gpt2@{sha}", env)
    assert pinned.code == 0 and pinned.out == first.out, pinned.err
    assert pinned.err == "" and len(stalled.accepted) == asked  # no round trip for a cached commit
    missing = greedy("acme/other", env)
    assert_one_line_error(missing, 1, "did not answer within 1 s", "acme/other")


def test_other_architecture_is_refused_before_the_weights(hub: HubSim, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck", config_extra={"model_type": "llama"})
    hub.add_repo("acme/llama", repo_files(ckpt))
    env = hub_env(hub, tmp_path)
    for args in (["models", "pull", "acme/llama"], ["generate", "-m", "acme/llama", "hi"]):
        result = run_subprocess(args, env=env)
        assert_one_line_error(result, 1, "'llama' model, not gpt-2")
        assert hub.downloaded_files("acme/llama") == {"config.json"}


def test_mistyped_local_path_says_no_such_directory(hub: HubSim, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    make_checkpoint(tmp_path / "models" / "small")
    down = run_subprocess(
        ["generate", "-m", "models/smal4", "hi"],
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")},
        cwd=tmp_path,
    )
    assert_one_line_error(down, 1, "no directory models/smal4", "check the path")
    up = run_subprocess(["generate", "-m", "models/smal4", "hi"], env=hub_env(hub, tmp_path), cwd=tmp_path)
    assert_one_line_error(up, 1, "no directory models/smal4", "no model of that name on the hub")


@needs_namespaces
def test_read_only_cache_gets_a_cache_hint_not_a_connection_one(hub: HubSim, tmp_path: Path) -> None:
    hub.add_repo("acme/tiny-gpt2", repo_files(make_checkpoint(tmp_path / "ck")))
    env = hub_env(hub, tmp_path)
    Path(env["HF_HOME"]).mkdir()
    result = run_subprocess(
        ["generate", "-m", "acme/tiny-gpt2", "hi", "-n", "2"], env=env, prefix=read_only(env["HF_HOME"])
    )
    assert_one_line_error(result, 1, "cannot be written", "read-only file system", "HF_HOME")
    assert "connection" not in result.err


@needs_namespaces
def test_full_disk_gets_a_space_hint_and_no_raw_warning(hub: HubSim, tmp_path: Path) -> None:
    hub.add_repo("acme/tiny-gpt2", repo_files(make_checkpoint(tmp_path / "ck")))  # 6.4 MB of weights
    env = hub_env(hub, tmp_path)
    Path(env["HF_HOME"]).mkdir()
    result = run_subprocess(
        ["generate", "-m", "acme/tiny-gpt2", "hi", "-n", "2"],
        env=env,
        prefix=in_namespace(f"mount -t tmpfs -o size=2m tmpfs {env['HF_HOME']}"),
    )
    assert_one_line_error(result, 1, "is full", "free some space")
    assert "UserWarning" not in result.err and "connection" not in result.err


def test_download_progress_updates_in_small_steps(hub: HubSim, tmp_path: Path) -> None:
    """The bar advances at least every MiB (the client's default is 10 MiB a step), so its speed is real."""
    ckpt = make_checkpoint(tmp_path / "ck")
    hub.add_repo("acme/tiny-gpt2", repo_files(ckpt))
    script = (
        "import json, sys\n"
        "from gpt2cli import hub\n"
        "steps = []\n"
        "real = hub._progress_class\n"
        "def spy(enabled):\n"
        "    bar, live = real(enabled)\n"
        "    class Spy(bar):\n"
        "        def update(self, n=1):\n"
        "            steps.append(n)\n"
        "            return super().update(n)\n"
        "    return Spy, live\n"
        "hub._progress_class = spy\n"
        "hub.resolve('acme/tiny-gpt2')\n"
        "print(json.dumps(steps))\n"
    )
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        env={**os.environ, **hub_env(hub, tmp_path)},
        timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    steps = json.loads(proc.stdout)
    weights = (ckpt / "model.safetensors").stat().st_size
    assert sum(steps) >= weights and max(steps) <= 1 << 20
    assert len(steps) >= weights // (1 << 20)
