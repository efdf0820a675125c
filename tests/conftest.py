"""Shared fixtures: tiny checkpoints, an isolated HF cache, and no network."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import make_checkpoint  # noqa: E402

# Started as a background job of a non-interactive shell (`bash .ci/run &`), the suite inherits
# SIGINT ignored, and so would every gpt2 it starts (an ignored signal stays ignored across exec,
# and Python then installs no KeyboardInterrupt): the Ctrl-C tests would find a gpt2 that cannot
# be interrupted. A caught signal is reset to the default by exec, so the children get Ctrl-C back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own empty HF cache and user dirs, and an unreachable Hub endpoint."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("GPT2_MODEL", raising=False)
    monkeypatch.delenv("GPT2_DEVICE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture(scope="session")
def ckpt_h(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoint in openai-community/gpt2's key layout (``h.0...``), with mask buffers."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_h"), layout="h", mask_buffers=True, seed=1)


@pytest.fixture(scope="session")
def ckpt_t(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoint in the fine-tunes' key layout (``transformer.h.0...``)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_t"), layout="transformer", seed=2)


@pytest.fixture(params=["h", "transformer"])
def ckpt(request: pytest.FixtureRequest, ckpt_h: Path, ckpt_t: Path) -> Path:
    """Each test using this runs once per key layout."""
    return ckpt_h if request.param == "h" else ckpt_t


@pytest.fixture(scope="session")
def lm_h(ckpt_h: Path):
    from gpt2cli import load

    return load(str(ckpt_h), device="cpu")
