"""`gpt2 generate` as users drive it: in-process for speed, subprocesses for pipes and signals."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoints import make_checkpoint
from cliutil import GPT2_BIN, HANG_GUARD, assert_one_line_error, run_inprocess, run_subprocess

from gpt2cli import load


@pytest.fixture
def gen(capsys, monkeypatch):
    def call(args, stdin=None):
        return run_inprocess(["generate", *args], capsys, monkeypatch, stdin=stdin)

    return call


def test_greedy_text_matches_library(ckpt: Path, gen) -> None:
    result = gen(["-m", str(ckpt), "Once upon a time", "-n", "15", "-t", "0", "--ignore-eos"])
    assert result.code == 0, result.err
    expected = load(str(ckpt), device="cpu").complete(
        "Once upon a time", max_new_tokens=15, temperature=0, ignore_eos=True
    )
    assert result.out == expected.samples[0].text + "\n"
    assert "\x1b" not in result.out


def test_seed_reproducible(ckpt_h: Path, gen) -> None:
    args = ["-m", str(ckpt_h), "Hello", "-n", "20", "--ignore-eos"]
    first = gen([*args, "--seed", "3"])
    second = gen([*args, "--seed", "3"])
    other = gen([*args, "--seed", "4"])
    assert first.code == second.code == other.code == 0
    assert first.out == second.out
    assert first.out != other.out


def test_json_schema(ckpt_h: Path, gen) -> None:
    result = gen(
        ["-m", str(ckpt_h), "Hi", "-n", "6", "--format", "json", "--num-samples", "2", "--seed", "1"]
    )
    assert result.code == 0, result.err
    obj = json.loads(result.out)
    assert set(obj) >= {"model", "prompt_tokens", "samples", "seconds", "tokens_per_second"}
    assert obj["model"] == str(ckpt_h) and obj["prompt_tokens"] == 1
    assert len(obj["samples"]) == 2
    for sample in obj["samples"]:
        assert set(sample) == {"text", "tokens", "finish_reason"}
        assert sample["finish_reason"] in ("length", "stop", "eos")
        assert isinstance(sample["text"], str) and 0 < sample["tokens"] <= 6


def test_jsonl_pieces_add_up_to_summary(ckpt_h: Path, gen) -> None:
    result = gen(["-m", str(ckpt_h), "Hi", "-n", "8", "--format", "jsonl", "-t", "0", "--ignore-eos"])
    lines = [json.loads(line) for line in result.out.splitlines()]
    assert lines[-1]["type"] == "summary"
    text = "".join(line["text"] for line in lines[:-1])
    assert len(lines) > 2 and text == lines[-1]["samples"][0]["text"]


def test_stop_string_not_printed(ckpt_h: Path, gen) -> None:
    base = gen(["-m", str(ckpt_h), "Hi", "-n", "30", "-t", "0", "--ignore-eos", "--format", "json"])
    full = json.loads(base.out)["samples"][0]["text"]
    stop = full[10:14]
    result = gen(
        ["-m", str(ckpt_h), "Hi", "-n", "30", "-t", "0", "--ignore-eos", "--stop", stop, "--format", "json"]
    )
    sample = json.loads(result.out)["samples"][0]
    assert sample["finish_reason"] == "stop"
    assert sample["text"] == full[: full.index(stop)]


def test_echo_prints_prompt_first(ckpt_h: Path, gen) -> None:
    result = gen(["-m", str(ckpt_h), "Echo me", "-n", "3", "--echo"])
    assert result.code == 0 and result.out.startswith("Echo me")


def test_prompt_from_stdin_and_dash(ckpt_h: Path, gen) -> None:
    args = ["-m", str(ckpt_h), "-n", "5", "-t", "0", "--ignore-eos"]
    piped = gen(args, stdin=b"From stdin")
    dashed = gen([*args, "-"], stdin=b"From stdin")
    direct = gen([*args, "From stdin"])
    assert piped.code == dashed.code == 0
    assert piped.out == dashed.out == direct.out


def test_invalid_utf8_stdin_is_replaced_with_warning(ckpt_h: Path, gen) -> None:
    result = gen(["-m", str(ckpt_h), "-n", "3"], stdin=b"caf\xe9 \xff ok")
    assert result.code == 0
    assert "not valid UTF-8" in result.err and "offset 3" in result.err


def test_endoftext_literal_in_prompt(ckpt_h: Path, gen) -> None:
    result = gen(["-m", str(ckpt_h), "a<|endoftext|>b", "-n", "3", "--format", "json"])
    assert result.code == 0, result.err
    assert json.loads(result.out)["prompt_tokens"] == 3  # a, <|endoftext|>, b


def test_long_prompt_keeps_recent_tokens_with_warning(ckpt_h: Path, gen) -> None:
    prompt = "word " * 300  # the fixture's window is 128 tokens
    result = gen(["-m", str(ckpt_h), prompt, "-n", "3", "--format", "json"])
    assert result.code == 0
    assert json.loads(result.out)["prompt_tokens"] == 128
    assert result.err.count("gpt2: warning:") == 1 and "window" in result.err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-t", "-1"], "temperature"),
        (["-t", "nan"], "temperature"),
        (["-t", "inf"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--top-p", "1.5"], "top-p"),
        (["-n", "0"], "max-new-tokens"),
        (["--num-samples", "0"], "num-samples"),
        (["--top-k", "-2"], "top-k"),
        (["--repetition-penalty", "0"], "repetition-penalty"),
        (["-t", "abc"], "temperature"),
        (["--format", "xml"], "format"),
        (["--device", "quantum"], "device"),
        (["--dtype", "int3"], "dtype"),
        (["--stop", ""], "stop"),
    ],
)
def test_bad_options_exit_2(ckpt_h: Path, gen, args: list[str], needle: str) -> None:
    result = gen(["-m", str(ckpt_h), "Hello", *args])
    assert_one_line_error(result, 2, needle)


def test_missing_cuda_is_a_clear_error(ckpt_h: Path, gen) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(gen(["-m", str(ckpt_h), "Hi", "--device", "cuda"]), 2, "CUDA")


def test_empty_prompt_and_empty_stdin(ckpt_h: Path, gen) -> None:
    assert_one_line_error(gen(["-m", str(ckpt_h)], stdin=b""), 2, "empty")
    assert_one_line_error(gen(["-m", str(ckpt_h), ""]), 2, "empty")


def test_unknown_model_directory(gen, tmp_path: Path) -> None:
    assert_one_line_error(gen(["-m", str(tmp_path / "nope"), "Hi"]), 1, "no such model directory")


def test_directory_that_is_not_gpt2(gen, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(gen(["-m", str(empty), "Hi"]), 1, "config.json")
    bert = make_checkpoint(tmp_path / "bert", config_extra={"model_type": "bert"})
    assert_one_line_error(gen(["-m", str(bert), "Hi"]), 1, "'bert'")


def test_truncated_and_corrupt_safetensors(gen, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "trunc")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(gen(["-m", str(path), "Hi"]), 1, "truncated", "write or copy the model")
    weights.write_bytes(struct.pack("<Q", 40) + b"{not json" + b"\0" * 100)
    assert_one_line_error(gen(["-m", str(path), "Hi"]), 1, "corrupt")
    weights.write_bytes(b"\x01")
    assert_one_line_error(gen(["-m", str(path), "Hi"]), 1, "safetensors")


def test_wrong_shapes_are_reported(gen, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "shape", n_embd=32)
    config = json.loads((path / "config.json").read_text())
    config["n_embd"] = 64
    (path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(gen(["-m", str(path), "Hi"]), 1, "shape")


def test_pickle_only_needs_opt_in(gen, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "pickled", weights="bin")
    assert_one_line_error(gen(["-m", str(path), "Hi"]), 1, "pickle", "--allow-pickle")
    result = gen(["-m", str(path), "Hi", "-n", "3", "--allow-pickle"])
    assert result.code == 0, result.err


def test_multiple_samples_text(ckpt_h: Path, gen) -> None:
    result = gen(["-m", str(ckpt_h), "Hi", "-n", "4", "--num-samples", "3", "-t", "0", "--ignore-eos"])
    assert result.code == 0
    blocks = result.out.strip("\n").split("\n\n")
    assert len(blocks) == 3 and len(set(blocks)) == 1


def test_stats_on_stderr(ckpt_h: Path, gen) -> None:
    result = gen(["-m", str(ckpt_h), "Hi", "-n", "4", "--stats"])
    assert "tok/s" in result.err and "first token" in result.err
    assert "tok/s" not in result.out


# --- real subprocesses: pipes, closed stdin, signals, imports -------------------------------


def test_subprocess_plain_output_no_escape_codes(ckpt_h: Path) -> None:
    result = run_subprocess(["generate", "-m", str(ckpt_h), "Hi", "-n", "5", "--echo"], env={"NO_COLOR": ""})
    assert result.code == 0, result.err
    assert result.out.startswith("Hi") and "\x1b" not in result.out + result.err


def test_closed_stdin_with_prompt(ckpt_h: Path) -> None:
    proc = subprocess.run(
        [str(GPT2_BIN), "generate", "-m", str(ckpt_h), "Hi", "-n", "3"],
        capture_output=True,
        preexec_fn=lambda: os.close(0),
        timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout


def test_closed_stdin_without_prompt(ckpt_h: Path) -> None:
    proc = subprocess.run(
        [str(GPT2_BIN), "generate", "-m", str(ckpt_h)],
        capture_output=True,
        preexec_fn=lambda: os.close(0),
        timeout=HANG_GUARD,
    )
    assert proc.returncode == 2
    assert b"gpt2: error:" in proc.stderr and b"Traceback" not in proc.stderr


def test_broken_pipe_exits_quietly(ckpt_h: Path) -> None:
    proc = subprocess.Popen(
        [str(GPT2_BIN), "generate", "-m", str(ckpt_h), "Hi", "-n", "100000", "--ignore-eos"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(20)  # like `| head -c 20`
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=HANG_GUARD) == 0
    assert len(head) == 20 and err == b""


def test_ctrl_c_keeps_output_and_exits_130(ckpt_h: Path) -> None:
    proc = subprocess.Popen(
        [str(GPT2_BIN), "generate", "-m", str(ckpt_h), "Hi", "-n", "100000", "--ignore-eos"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    first = proc.stdout.read(30)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 130, err
    assert len(first) == 30 and b"Traceback" not in err
    assert (first + rest).endswith(b"\n")  # the line is finished, nothing cut off


@pytest.mark.parametrize("fmt", ["json", "jsonl", "text"])
def test_ctrl_c_mid_stream_keeps_partial_output(ckpt_h: Path, gen, monkeypatch, fmt: str) -> None:
    """Ctrl-C arrives after a few pieces (injected at a fixed point into the real stream)."""
    from gpt2cli.api import LM, TextPiece

    full = load(str(ckpt_h), device="cpu").complete("Hi", max_new_tokens=50, temperature=0, ignore_eos=True)
    real_stream = LM.stream

    def interrupted_stream(self, *args, **kwargs):
        pieces = 0
        for event in real_stream(self, *args, **kwargs):
            yield event
            pieces += isinstance(event, TextPiece)
            if pieces == 5:
                raise KeyboardInterrupt

    monkeypatch.setattr(LM, "stream", interrupted_stream)
    result = gen(["-m", str(ckpt_h), "Hi", "-n", "50", "--ignore-eos", "-t", "0", "--format", fmt])
    assert result.code == 130 and "Traceback" not in result.err
    if fmt == "json":
        obj = json.loads(result.out)
        partial = obj["samples"][0]["text"]
        assert obj["interrupted"] is True
    elif fmt == "jsonl":
        lines = [json.loads(line) for line in result.out.splitlines()]
        assert lines[-1]["type"] == "summary" and lines[-1]["interrupted"] is True
        assert isinstance(lines[-1]["seed"], int)
        partial = "".join(line["text"] for line in lines[:-1])
    else:
        partial = result.out.removesuffix("\n")
    assert partial and full.samples[0].text.startswith(partial)


def test_stats_still_print_after_ctrl_c(ckpt_h: Path, gen, monkeypatch) -> None:
    """Ctrl-C inside the engine (its 6th step): --stats reports what was generated until then."""
    from gpt2cli.engine import Engine

    real_step = Engine.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "step", step)
    args = ["-m", str(ckpt_h), "Hi", "-n", "50", "--ignore-eos", "-t", "0", "--seed", "11", "--stats"]
    result = gen([*args, "--format", "json"])
    assert result.code == 130, result.err
    obj = json.loads(result.out)
    assert obj["interrupted"] is True and obj["seed"] == 11
    sample = obj["samples"][0]
    assert 1 <= sample["tokens"] < 50 and sample["finish_reason"] == "interrupted"
    full = load(str(ckpt_h), device="cpu").complete("Hi", max_new_tokens=50, temperature=0, ignore_eos=True)
    assert full.samples[0].token_ids[: sample["tokens"]] and full.samples[0].text.startswith(sample["text"])
    stats = [line for line in result.err.splitlines() if line.startswith("interrupted |")]
    assert len(stats) == 1, result.err
    assert f"generation: {sample['tokens']} tokens" in stats[0] and "seed: 11" in stats[0]


def test_seed_minus_one_draws_a_seed_that_replays(ckpt_h: Path, gen) -> None:
    args = ["-m", str(ckpt_h), "Hello", "-n", "12", "--ignore-eos", "--format", "json"]
    first = gen([*args, "--seed", "-1"])
    assert first.code == 0, first.err
    obj = json.loads(first.out)
    seed = obj["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    replay = json.loads(gen([*args, "--seed", str(seed)]).out)
    assert replay["samples"] == obj["samples"] and replay["seed"] == seed
    drawn = gen(["-m", str(ckpt_h), "Hello", "-n", "3", "--stats"])  # no --seed: drawn and shown too
    (line,) = [ln for ln in drawn.err.splitlines() if "seed:" in ln]
    assert int(line.rsplit("seed: ", 1)[1]) >= 0


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-t", "1e-45"], ["--temperature must be 0 (greedy) or at least 0.001"]),
        (["--seed", "99999999999999999999"], ["--seed must be -1 (random) or an integer from 0 to"]),
        (["--seed", "-2"], ["--seed must be -1 (random)"]),
        (["--num-samples", "100000"], ["--num-samples must be from 1 to 64"]),
        (["--repetition-penalty", "1e-300"], ["--repetition-penalty must be between 0.01 and 100"]),
        (["--top-p", "0"], ["--top-p must be in (0, 1]"]),
        (["--min-p", "2"], ["--min-p must be in [0, 1]"]),
        (["--top-k", "-1"], ["--top-k must be at least 0"]),
        (["-n", "0"], ["--max-new-tokens must be at least 1"]),
        (["--format", "xml"], ["'xml' is not one of"]),
    ],
)
def test_odd_values_are_refused_at_the_edge_with_the_range(ckpt_h: Path, gen, args, needles) -> None:
    result = gen(["-m", str(ckpt_h), "Hi", *args])
    assert_one_line_error(result, 2, *needles)
    assert "Value error" not in result.err and "unexpected" not in result.err


def test_stop_reads_backslash_escapes(ckpt_h: Path, gen, tmp_path: Path) -> None:
    """--stop "\\n\\n" means newlines (as the README's example needs in a shell); --stop-raw is
    literal. The tiny model's greedy text has spaces, so the escape tested end to end is \\x20."""
    base = ["-m", str(ckpt_h), "Hi", "-n", "30", "-t", "0", "--ignore-eos", "--format", "json"]
    full = json.loads(gen(base).out)["samples"][0]["text"]
    word = full.split()[-1]  # a later word: the stop text "\\x20<word>" is " <word>"
    cut = json.loads(gen([*base, "--stop", "\\x20" + word]).out)["samples"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.index(" " + word)]
    raw = json.loads(gen([*base, "--stop-raw", "\\x20" + word]).out)["samples"][0]
    assert raw["text"] == full and raw["finish_reason"] == "length"  # the 4 characters never occur
    from gpt2cli.cli.options import unescape

    assert unescape("\\n\\t\\\\n\\x41\\u00e9\\q") == "\n\t\\nA\u00e9\\q"


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["generate", "hi", "--format"], "gpt2 generate"),
        (["score", "--context"], "gpt2 score"),
        (["bench", "--prompt-tokens", "4", "-n"], "gpt2 bench"),
        (["models", "verify", "--nope"], "gpt2 models verify"),
        (["--nope"], "gpt2"),
    ],
)
def test_an_option_error_points_at_its_commands_help(capsys, monkeypatch, args, command) -> None:
    result = run_inprocess(args, capsys, monkeypatch)
    assert_one_line_error(result, 2)
    assert f"hint: see '{command} --help'" in result.err


def test_debug_works_after_the_subcommand(ckpt_h: Path, gen) -> None:
    result = gen(["-m", str(ckpt_h), "Hi", "-t", "1e-45", "--debug"])
    assert result.code == 2
    assert "No such option" not in result.err
    assert "Traceback" in result.err and "gpt2: error: --temperature" in result.err
    literal = gen(["-m", str(ckpt_h), "-n", "2", "--", "--debug"])  # after --, a prompt like any other
    assert literal.code == 0, literal.err


def test_help_groups_options_and_reads_plainly() -> None:
    result = run_subprocess(["generate", "--help"], env={"COLUMNS": "100"})
    assert result.code == 0
    out = result.out
    for heading in (
        "Model options:",
        "Sampling options:",
        "Output options:",
        "Performance options:",
        "Batch (--jsonl) options:",
        "Examples:",
    ):
        assert heading in out, out
    assert out.index("--temperature") > out.index("Sampling options:") > out.index("--model")
    assert out.index("--ray-address") > out.index("--prompt-field") > out.index("Batch (--jsonl) options:")
    for ugly in ("<list[str]>", "<int range>", "<str>", "<int>", "<float>"):
        assert ugly not in out
    top = run_subprocess(["--help"], env={"COLUMNS": "100"}).out
    commands = top.split("Commands:", 1)[1]
    assert "..." not in commands, commands
    assert "Continue PROMPT with a GPT-2 model and stream the text to stdout." in " ".join(commands.split())


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_nothing_heavy(flag: str) -> None:
    code = (
        "import sys\n"
        "from gpt2cli.cli.app import main\n"
        f"try:\n    main([{flag!r}])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'tiktoken', 'huggingface_hub', 'prompt_toolkit', 'safetensors')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr.decode()


def test_python_dash_m(ckpt_h: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2cli", "--version"], capture_output=True, text=True, timeout=HANG_GUARD
    )
    assert proc.returncode == 0 and proc.stdout.startswith("gpt2cli ")


def test_hints_for_broken_local_directories(ckpt_h: Path, gen, tmp_path: Path) -> None:
    import shutil

    no_merges = tmp_path / "no-merges"
    shutil.copytree(ckpt_h, no_merges)
    (no_merges / "merges.txt").unlink()
    result = gen(["-m", str(no_merges), "hi"])
    assert_one_line_error(result, 1, "merges.txt", "copy vocab.json and merges.txt")
    assert "architecture" not in result.err
    bad_config = tmp_path / "bad-config"
    shutil.copytree(ckpt_h, bad_config)
    (bad_config / "config.json").write_text("{not json")
    result = gen(["-m", str(bad_config), "hi"])
    assert_one_line_error(result, 1, "config.json", f"fix {bad_config / 'config.json'}")
    assert "models verify" not in result.err


def test_a_cached_config_gets_the_repair_hint(tmp_path: Path) -> None:
    from gpt2cli.config import GPT2Config
    from gpt2cli.errors import CorruptWeightsError

    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{not json")
    with pytest.raises(CorruptWeightsError) as caught:
        GPT2Config.from_json(snapshot / "config.json")
    assert caught.value.hint == "re-download it: `gpt2 models verify acme/tiny --repair`"


def _variant(src: Path, dest: Path, *, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of checkpoint ``src`` with config.json keys and weight tensors replaced."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    if config:
        path = dest / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        state = load_file(str(src / "model.safetensors"))
        save_file({**state, **{k: f(state) for k, f in tensors.items()}}, str(dest / "model.safetensors"))
    return dest


def test_odd_checkpoints_are_refused_in_one_line_not_run_wrong(ckpt_h: Path, gen, tmp_path: Path) -> None:
    import torch

    untied = _variant(
        ckpt_h,
        tmp_path / "untied",
        config={"tie_word_embeddings": False},
        tensors={"lm_head.weight": lambda s: torch.randn_like(s["wte.weight"])},
    )
    result = gen(["-m", str(untied), "hi", "-n", "2"])  # its own lm_head would be dropped: wrong output
    assert_one_line_error(result, 1, "tie_word_embeddings: false", "not supported")
    tied = _variant(ckpt_h, tmp_path / "tied", tensors={"lm_head.weight": lambda s: s["wte.weight"].clone()})
    assert gen(["-m", str(tied), "hi", "-n", "2"]).code == 0  # a stored copy of the tied head is fine
    ints = _variant(ckpt_h, tmp_path / "ints", tensors={"ln_f.weight": lambda s: s["ln_f.weight"].int()})
    result = gen(["-m", str(ints), "hi", "-n", "2"])
    assert_one_line_error(
        result, 1, "ln_f.weight is stored as torch.int32", f"write or copy the model to {ints}"
    )
    assert "unexpected" not in result.err
    for field, value in [("layer_norm_epsilon", "abc"), ("n_inner", 2.5), ("scale_attn_weights", "yes")]:
        bad = _variant(ckpt_h, tmp_path / f"bad-{field}", config={field: value})
        assert_one_line_error(gen(["-m", str(bad), "hi"]), 1, field, repr(value))


def test_echo_is_in_the_text_of_json_and_jsonl_alike(ckpt_h: Path, gen) -> None:
    args = ["-m", str(ckpt_h), "Echo me", "-n", "4", "-t", "0", "--ignore-eos", "--echo", "--format"]
    whole = json.loads(gen([*args, "json"]).out)["samples"][0]["text"]
    lines = [json.loads(line) for line in gen([*args, "jsonl"]).out.splitlines()]
    assert whole.startswith("Echo me") and lines[-1]["samples"][0]["text"] == whole
    assert "".join(line["text"] for line in lines[:-1]) == whole


def test_library_refuses_token_ids_outside_the_vocabulary(lm_h) -> None:
    from gpt2cli.errors import BadInputError

    for ids in ([50257], [-1], [True], ["a"]):
        with pytest.raises(BadInputError, match="not in the vocabulary"):
            lm_h.complete(ids, max_new_tokens=2)
    assert lm_h.complete([50256, 0], max_new_tokens=1).samples[0].tokens == 1


def test_generation_config_is_importable_from_the_package() -> None:
    from gpt2cli import GenerationConfig
    from gpt2cli.config import GenerationConfig as Defined

    assert GenerationConfig is Defined


def test_a_missing_argument_with_choices_is_one_line() -> None:
    result = run_subprocess(["completion"])
    assert_one_line_error(result, 2, "Missing argument 'shell'. Choose from: bash, zsh, fish")


def test_library_takes_numpy_and_torch_integer_ids(lm_h) -> None:
    import numpy as np
    import torch

    ids = [464, 3290]
    expected = lm_h.complete(ids, max_new_tokens=3, temperature=0).samples[0].text
    for typed in (list(np.array(ids)), list(torch.tensor(ids))):
        assert lm_h.complete(typed, max_new_tokens=3, temperature=0).samples[0].text == expected
