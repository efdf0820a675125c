"""`gpt2 generate --jsonl`: one completion per prompt line, per-line sampling fields, resume, bad lines."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import ANY

import pytest
from batchutil import read_jsonl, write_jsonl
from cliutil import assert_one_line_error, run_inprocess

PROMPTS = [
    {"id": "a", "prompt": "Once upon a time"},
    {"id": "b", "prompt": "The cat", "max_new_tokens": 3},
    {"id": "c", "prompt": "Hello", "temperature": 0.9, "seed": 7, "top_k": 0},
    {"id": "d", "prompt": "In the beginning", "temperature": 0.7, "seed": 3, "stop": [" the", "."]},
    {"id": "e", "prompt": "<|endoftext|>", "ignore_eos": True, "max_new_tokens": 9},
]


@pytest.fixture
def gen(capsys, monkeypatch, ckpt_h: Path):
    def call(args: list[str], stdin: bytes | None = None):
        return run_inprocess(["generate", "-m", str(ckpt_h), *args], capsys, monkeypatch, stdin=stdin)

    return call


def alone(lm, line: dict, **defaults) -> dict:
    """What `gpt2 generate PROMPT` with the line's settings gives, as an output line."""
    keys = ("max_new_tokens", "temperature", "top_k", "seed", "stop", "ignore_eos")
    options = defaults | {k: line[k] for k in keys if k in line}
    if isinstance(options.get("stop"), list):
        options["stop"] = tuple(options["stop"])
    result = lm.complete(line["prompt"], **options)
    sample = result.samples[0]
    return {
        "id": line["id"],
        "text": sample.text,
        "tokens": sample.tokens,
        "finish_reason": sample.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "seed": result.seed if "seed" in options else ANY,  # unseeded: each run draws its own
    }


def test_each_line_equals_generating_its_prompt_alone(gen, lm_h, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    result = gen(["--jsonl", str(src), "-o", str(out), "-t", "0", "-n", "6", "--lookahead", "2"])
    assert result.code == 0, result.err
    got = read_jsonl(out)
    assert got == [alone(lm_h, p, temperature=0, max_new_tokens=6) for p in PROMPTS]
    assert [g["tokens"] for g in got][:2] == [6, 3]  # the line's own max_new_tokens
    assert got[4]["tokens"] == 9 and got[4]["prompt_tokens"] == 1
    assert f"gpt2: generated {len(PROMPTS)} completions" in result.err


def test_seeded_sampling_is_reproducible_and_per_line(gen, lm_h, tmp_path: Path) -> None:
    lines = [{"id": i, "prompt": "Hello there"} for i in range(3)] + [
        {"id": 3, "prompt": "Hello there", "seed": 99}
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    result = gen(["--jsonl", str(src), "--seed", "5", "-n", "8", "--ignore-eos"])
    assert result.code == 0, result.err
    got = [json.loads(line) for line in result.out.splitlines()]
    want = [alone(lm_h, line, seed=5, max_new_tokens=8, ignore_eos=True) for line in lines]
    assert got == want
    assert got[0]["text"] == got[1]["text"] == got[2]["text"] != got[3]["text"]
    assert [line["seed"] for line in got] == [5, 5, 5, 99]


def test_a_drawn_seed_is_written_and_replays(gen, lm_h, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "prompt": "Hello there"}])
    first = gen(["--jsonl", str(src), "-n", "8", "--ignore-eos"])  # no --seed: one is drawn
    assert first.code == 0, first.err
    (line,) = [json.loads(x) for x in first.out.splitlines()]
    assert isinstance(line["seed"], int)
    again = gen(["--jsonl", str(src), "-n", "8", "--ignore-eos", "--seed", str(line["seed"])])
    assert json.loads(again.out) == line


def test_bad_lines_and_bad_settings(gen, lm_h, tmp_path: Path) -> None:
    lines = [
        {"id": "ok", "prompt": "Hi"},
        {"id": "t", "prompt": "Hi", "temperature": -1},
        {"id": "k", "prompt": "Hi", "top_k": "many"},
        {"id": "s", "prompt": "Hi", "stop": [1]},
        {"id": "e", "prompt": "Hi", "ignore_eos": 1},
        {"id": "n", "text": "Hi"},
        {"id": "ok2", "prompt": "Hey", "max_new_tokens": 2},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    result = gen(["--jsonl", str(src), "-t", "0", "-n", "4"])
    assert result.code == 0, result.err
    got = [json.loads(line) for line in result.out.splitlines()]
    assert [g["id"] for g in got] == [line["id"] for line in lines]
    errors = {g["id"]: g["error"] for g in got if "error" in g}
    assert errors == {
        "t": "line 2: --temperature must be 0 (greedy) or at least 0.001, got -1",
        "k": 'line 3: "top_k" has the wrong type: "many"',
        "s": 'line 4: "stop" must be a string or a list of strings',
        "e": 'line 5: "ignore_eos" has the wrong type: 1',
        "n": 'line 6: no "prompt" field',
    }
    assert got[0] == alone(lm_h, lines[0], temperature=0, max_new_tokens=4)
    assert got[-1] == alone(lm_h, lines[-1], temperature=0, max_new_tokens=4)
    assert "5 errors" in result.err


def test_prompt_field_and_resume(gen, lm_h, tmp_path: Path) -> None:
    lines = [{"id": f"q{i}", "question": p["prompt"]} for i, p in enumerate(PROMPTS)]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    args = ["--jsonl", str(src), "-o", str(out), "--prompt-field", "question", "-t", "0", "-n", "5"]
    want = [
        alone(lm_h, {"id": line["id"], "prompt": line["question"]}, temperature=0, max_new_tokens=5)
        for line in lines
    ]
    write_jsonl(out, [{**line, "seed": 1} for line in want[:2]])  # an earlier run got this far
    result = gen([*args, "--resume"])
    assert result.code == 0, result.err
    assert read_jsonl(out) == want
    assert "3 completions, 2 already done" in result.err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["Hello", "--jsonl", "IN"], "PROMPT does not apply to --jsonl"),
        (["--jsonl", "IN", "--num-samples", "2"], "--num-samples does not apply"),
        (["--jsonl", "IN", "--format", "json"], "--format does not apply"),
        (["Hello", "--lookahead", "3"], "--lookahead applies to batch jobs only"),
    ],
)
def test_bad_options(gen, tmp_path: Path, args: list[str], needle: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", PROMPTS[:1])
    assert_one_line_error(gen([str(src) if a == "IN" else a for a in args]), 2, needle)
