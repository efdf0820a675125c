"""Odd environments, as real subprocesses: a read-only install and home, a Latin-1 locale, GPT2_*
variables with bad values, piped stdin beside a PROMPT, a terminal's loading status line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cliutil import (
    HANG_GUARD,
    assert_one_line_error,
    needs_namespaces,
    read_only,
    run_inprocess,
    run_subprocess,
    run_with_terminal_stderr,
)

import gpt2cli

PACKAGE_DIR = Path(gpt2cli.__file__).resolve().parent


@needs_namespaces
def test_read_only_install_and_home_compile_kernels_in_memory(ckpt_h: Path, tmp_path: Path) -> None:
    """``docker run --read-only``: the package, HOME and NUMBA_CACHE_DIR cannot be written."""
    home, numba_dir = tmp_path / "home", tmp_path / "numba"
    home.mkdir()
    numba_dir.mkdir()
    args = ["generate", "-m", str(ckpt_h), "Hello", "-n", "8", "-t", "0", "--ignore-eos"]
    normal = run_subprocess(args)
    assert normal.code == 0, normal.err
    env = {"HOME": str(home), "NUMBA_CACHE_DIR": str(numba_dir), "XDG_CACHE_HOME": ""}
    prefix = read_only(PACKAGE_DIR, home, numba_dir)
    locked = run_subprocess(args, env=env, prefix=prefix)
    assert locked.code == 0, locked.err
    assert locked.out == normal.out and "error" not in locked.err
    note = "gpt2: warning: no writable cache directory for the compiled CPU kernels"
    assert note in locked.err and "NUMBA_CACHE_DIR" in locked.err and note not in normal.err
    probe = subprocess.run(
        [
            *prefix,
            str(Path(os.sys.executable)),
            "-c",
            "from gpt2cli import kernels; print(kernels.available(), kernels.writable_cache_dir())",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=HANG_GUARD,
    )
    assert probe.stdout.split() == ["True", "None"], probe.stderr  # the numba kernels still run
    assert list(numba_dir.iterdir()) == [] and list(home.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "hi", "-n", "2", "-t", "0"],
        ["score", "-", "--format", "json"],
        ["bench", "--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1", "--warmup", "0"],
    ],
)
def test_every_model_command_says_when_kernels_compile_in_memory(
    ckpt_h: Path, command: list[str], capsys, monkeypatch
) -> None:
    """The detection itself runs for real above (a read-only home); here each command's wiring."""
    from gpt2cli import kernels

    args = [command[0], "-m", str(ckpt_h), *command[1:]]
    quiet = run_inprocess(args, capsys, monkeypatch, stdin=b"hello " * 20)
    monkeypatch.setattr(kernels, "compiles_in_memory", lambda: True)
    noted = run_inprocess(args, capsys, monkeypatch, stdin=b"hello " * 20)
    assert quiet.code == noted.code == 0, quiet.err + noted.err
    note = "gpt2: warning: no writable cache directory for the compiled CPU kernels"
    assert note not in quiet.err and noted.err.count(note) == 1, noted.err


@pytest.mark.parametrize(
    ("options", "gemv_types", "int8_kernels"),
    [
        ({}, ["float32"], 0),
        ({"dtype": "bfloat16"}, ["float32", "uint16"], 0),
        ({"quantize": "int8"}, ["float32"], 1),
    ],
)
def test_loading_compiles_only_the_kernels_its_weights_take(
    ckpt_h: Path, options: dict[str, str], gemv_types: list[str], int8_kernels: int
) -> None:
    """Compiled in memory (no writable cache) every kernel costs seconds: a model warms up the
    GEMVs of its own weight types, not all of them (the rest compile if ever called)."""
    code = (
        "import sys, json; from gpt2cli.api import load; from gpt2cli import numba_kernels as nk; "
        "load(sys.argv[1], progress=False, **json.loads(sys.argv[2])); "
        "print(json.dumps([sorted({str(s[1].dtype) for s in nk.gemv.signatures}), len(nk.gemv_i8.signatures)]))"
    )
    out = subprocess.run(
        [os.sys.executable, "-c", code, str(ckpt_h), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [gemv_types, int8_kernels]


def test_a_writable_numba_cache_dir_is_used(tmp_path: Path) -> None:
    code = "from gpt2cli import kernels; print(kernels.writable_cache_dir())"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "nb"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run(
        [os.sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_GUARD
    )
    assert out.stdout.strip() == str(tmp_path / "nb")
    env.pop("NUMBA_CACHE_DIR")
    out = subprocess.run(
        [os.sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_GUARD
    )
    assert out.stdout.strip() == str(tmp_path / "xdg" / "gpt2cli" / "numba")


@pytest.fixture(scope="module")
def latin1_locale(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables selecting an en_US.ISO-8859-1 locale built here with localedef."""
    if shutil.which("localedef") is None:
        pytest.skip("localedef is not installed: cannot build a Latin-1 locale")
    where = tmp_path_factory.mktemp("locales")
    built = subprocess.run(
        ["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(where / "en_US.ISO-8859-1")],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    if built.returncode not in (0, 1) or not (where / "en_US.ISO-8859-1").exists():
        pytest.skip(f"localedef could not build en_US.ISO-8859-1: {built.stderr.strip()[:200]}")
    env = {"LOCPATH": str(where), "LC_ALL": "en_US.ISO-8859-1", "PYTHONIOENCODING": "", "PYTHONUTF8": "0"}
    check = subprocess.run(
        [os.sys.executable, "-c", "import sys; print(sys.stdout.encoding)"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=HANG_GUARD,
    )
    if "8859" not in check.stdout:
        pytest.skip(f"the built locale is not used by Python here (stdout encoding {check.stdout.strip()})")
    return env


def test_latin1_locale_replaces_what_it_cannot_show(ckpt_h: Path, latin1_locale, tmp_path: Path) -> None:
    result = run_subprocess(
        ["generate", "-m", str(ckpt_h), "--echo", "-n", "30", "--seed", "7"],
        input="東京 café".encode(),
        env=latin1_locale,
        encoding="latin-1",
    )
    assert result.code == 0, result.err
    assert "UnicodeEncodeError" not in result.err
    assert result.out.startswith("?? café")  # Latin-1 shows é; the rest is replaced, nothing lost
    text = tmp_path / "tokyo.txt"
    text.write_text("東京は日本の首都です。 Tokyo is the capital.\n", encoding="utf-8")
    for extra in (["--top", "3"], ["--per-token"]):
        scored = run_subprocess(
            ["score", "-m", str(ckpt_h), str(text), *extra], env=latin1_locale, encoding="latin-1"
        )
        assert scored.code == 0, scored.err
        assert "Unicode" not in scored.err and "?" in scored.out


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"GPT2_THREADS": "abc"}, ["GPT2_THREADS='abc'", "positive integer"]),
        ({"GPT2_THREADS": "0"}, ["GPT2_THREADS='0'"]),
        ({"GPT2_KERNELS": "bogus"}, ["GPT2_KERNELS='bogus'", "torch", "unfused"]),
        ({"GPT2_GEMM": "mkl"}, ["GPT2_GEMM='mkl'", "onednn", "blas"]),
        ({"GPT2_GEMV": "tiles"}, ["GPT2_GEMV='tiles'", "rows", "blocks"]),
        ({"GPT2_INT8_GEMM": "vnni"}, ["GPT2_INT8_GEMM='vnni'", "int-mm", "numba"]),
        ({"GPT2_DEVICE": "tpu"}, ["GPT2_DEVICE='tpu' in the environment", "unset GPT2_DEVICE"]),
    ],
)
def test_bad_environment_values_are_refused(
    ckpt_h: Path, env: dict[str, str], needles: list[str], capsys, monkeypatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = run_inprocess(["generate", "-m", str(ckpt_h), "hi", "-n", "2"], capsys, monkeypatch)
    assert_one_line_error(result, 2, *needles)


def test_every_kernel_choice_is_accepted(ckpt_h: Path, capsys, monkeypatch) -> None:
    from gpt2cli.cli.options import KERNEL_CHOICES

    assert "unfused" in KERNEL_CHOICES
    for choice in KERNEL_CHOICES:
        monkeypatch.setenv("GPT2_KERNELS", choice.upper())
        result = run_inprocess(
            ["generate", "-m", str(ckpt_h), "hi", "-n", "2", "-t", "0"], capsys, monkeypatch
        )
        assert result.code == 0, result.err


def test_the_library_reads_a_known_value_and_takes_auto_for_the_rest() -> None:
    """The CLI refuses unknown GPT2_* values first (the tests above); the library, called from
    Python, reads them as auto."""
    from gpt2cli import switches

    env = {"GPT2_GEMM": " OneDNN ", "GPT2_GEMV": "sideways", "GPT2_THREADS": " 3 "}
    assert switches.choice(switches.GEMM_ENV, switches.GEMM_CHOICES, env) == "onednn"
    assert switches.choice(switches.GEMV_ENV, switches.GEMV_CHOICES, env) == "auto"
    assert switches.choice(switches.KERNELS_ENV, switches.KERNEL_CHOICES, env) == "auto"
    assert switches.threads(env) == 3
    assert [switches.threads({"GPT2_THREADS": v}) for v in ("0", "-1", "two", "")] == [None] * 4


def test_every_gemm_choice_is_accepted(ckpt_h: Path, capsys, monkeypatch) -> None:
    from gpt2cli.cli.options import GEMM_CHOICES

    for choice in GEMM_CHOICES:
        monkeypatch.setenv("GPT2_GEMM", f" {choice.upper()} ")
        result = run_inprocess(
            ["score", "-m", str(ckpt_h), "-", "--format", "json"], capsys, monkeypatch, stdin=b"hello " * 30
        )
        assert result.code == 0, result.err


def test_every_int8_gemm_choice_is_accepted(ckpt_h: Path, capsys, monkeypatch) -> None:
    from gpt2cli.cli.options import INT8_GEMM_CHOICES

    for choice in INT8_GEMM_CHOICES:
        monkeypatch.setenv("GPT2_INT8_GEMM", f" {choice.upper()} ")
        result = run_inprocess(
            ["score", "-m", str(ckpt_h), "-", "--format", "json", "--quantize", "int8"],
            capsys,
            monkeypatch,
            stdin=b"hello " * 30,
        )
        assert result.code == 0, result.err


def test_every_gemv_choice_is_accepted(ckpt_h: Path, capsys, monkeypatch) -> None:
    from gpt2cli.cli.options import GEMV_CHOICES

    for choice in GEMV_CHOICES:
        monkeypatch.setenv("GPT2_GEMV", f" {choice.upper()} ")
        result = run_inprocess(
            ["generate", "-m", str(ckpt_h), "hi", "-n", "2", "-t", "0", "--quantize", "int8"],
            capsys,
            monkeypatch,
        )
        assert result.code == 0, result.err


def test_device_option_names_itself(ckpt_h: Path, capsys, monkeypatch) -> None:
    result = run_inprocess(["generate", "-m", str(ckpt_h), "hi", "--device", "tpu"], capsys, monkeypatch)
    assert_one_line_error(result, 2, "--device 'tpu'")
    assert "environment" not in result.err


def test_unavailable_device_from_the_environment_says_so(ckpt_h: Path, capsys, monkeypatch) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("GPT2_DEVICE", "cuda")
    result = run_inprocess(["generate", "-m", str(ckpt_h), "hi", "-n", "2"], capsys, monkeypatch)
    assert_one_line_error(result, 2, "no CUDA GPU", "GPT2_DEVICE='cuda'")


def test_piped_stdin_beside_a_prompt_is_noted(ckpt_h: Path) -> None:
    args = ["generate", "-m", str(ckpt_h), "bar", "-n", "3"]
    noted = run_subprocess(args, input=b"foo\n")
    assert noted.code == 0, noted.err
    assert "stdin was ignored" in noted.err
    quiet = run_subprocess(args, input=b"")
    assert quiet.code == 0 and "stdin" not in quiet.err


def test_piped_text_ends_with_one_newline_never_two(ckpt_h: Path, capsys, monkeypatch) -> None:
    from gpt2cli import load

    lm = load(str(ckpt_h), device="cpu")
    full = lm.complete("Hi\n", max_new_tokens=3, temperature=0, ignore_eos=True).samples[0].text
    base = ["generate", "-m", str(ckpt_h), "Hi\n", "-n", "3", "-t", "0", "--ignore-eos"]
    plain = run_inprocess(base, capsys, monkeypatch)
    assert plain.out == full + "\n"  # the model's text has no newline: one is added
    echoed_empty = run_inprocess([*base, "--echo", "--stop", full[:2]], capsys, monkeypatch)
    assert echoed_empty.out == "Hi\n"  # ends with a newline already: none added
    as_json = json.loads(run_inprocess([*base, "--format", "json"], capsys, monkeypatch).out)
    assert as_json["samples"][0]["text"] == full  # never inside json


def test_loading_shows_a_status_line_on_a_terminal(ckpt_h: Path) -> None:
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    code, terminal, _ = run_with_terminal_stderr(["generate", "-m", str(ckpt_h), "Hi", "-n", "2"], env)
    assert code == 0
    assert f"loading {ckpt_h}" in terminal
    piped = run_subprocess(["generate", "-m", str(ckpt_h), "Hi", "-n", "2"])
    assert "loading" not in piped.err
