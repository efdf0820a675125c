"""`gpt2 score` as users drive it: files, stdin, formats, per-token output and bad input."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
from cliutil import assert_one_line_error, run_inprocess, run_subprocess

from gpt2cli.cli import score as score_cli

TEXT = "It was the best of times, it was the worst of times.\nThe end, or is it? ünïcödé 🎉\n"
OTHER = "Completely different words about numbers: 1 2 3 4 5.\n"
KEYS = {"file", "tokens", "bytes", "words", "nll", "perplexity", "bits_per_byte", "word_perplexity"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("texts")
    paths = {"a": d / "a.txt", "b": d / "b.txt", "empty": d / "empty.txt", "bad": d / "bad.bin"}
    paths["a"].write_text(TEXT, encoding="utf-8")
    paths["b"].write_text(OTHER, encoding="utf-8")
    paths["empty"].write_bytes(b"")
    paths["bad"].write_bytes(b"valid start \x80\x81 then junk")
    return paths


@pytest.fixture
def score(capsys, monkeypatch, ckpt_h: Path):
    def call(args: list[str], stdin: bytes | None = None):
        return run_inprocess(["score", "-m", str(ckpt_h), *args], capsys, monkeypatch, stdin=stdin)

    return call


def test_json_single_file_matches_library(score, files, lm_h) -> None:
    result = score([str(files["a"]), "--format", "json", "--context", "32", "--stride", "8"])
    assert result.code == 0, result.err
    obj = json.loads(result.out)
    assert set(obj) >= KEYS
    expected = lm_h.score(TEXT, context=32, stride=8)
    assert obj["file"] == str(files["a"])
    assert obj["tokens"] == expected.tokens == len(lm_h.encode(TEXT))
    assert obj["bytes"] == len(TEXT.encode())
    assert obj["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert obj["nll"] == pytest.approx(math.log(obj["perplexity"]))
    assert result.err == ""  # no progress bar or chrome off a terminal


def test_stdin_and_dash(score, lm_h) -> None:
    expected = lm_h.score(TEXT)
    for args in ([], ["-"]):
        result = score([*args, "--format", "json"], stdin=TEXT.encode())
        assert result.code == 0, result.err
        obj = json.loads(result.out)
        assert obj["file"] == "<stdin>" and obj["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)


def test_several_files_json_and_total(score, files, lm_h) -> None:
    result = score([str(files["a"]), str(files["b"]), "--format", "json"])
    assert result.code == 0, result.err
    obj = json.loads(result.out)
    assert [f["file"] for f in obj["files"]] == [str(files["a"]), str(files["b"])]
    a, b = (lm_h.score(t) for t in (TEXT, OTHER))
    total = obj["total"]
    assert set(total) >= KEYS and total["tokens"] == a.tokens + b.tokens
    assert total["perplexity"] == pytest.approx(
        math.exp((a.total_nll + b.total_nll) / (a.tokens + b.tokens)), rel=1e-6
    )


def test_text_table_and_csv(score, files) -> None:
    text = score([str(files["a"]), str(files["b"])])
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    assert lines[0].split() == [
        "file",
        "tokens",
        "bytes",
        "words",
        "nll",
        "perplexity",
        "bits_per_byte",
        "word_perplexity",
    ]
    assert [line.split()[0] for line in lines[1:]] == [str(files["a"]), str(files["b"]), "total"]
    assert "\x1b" not in text.out
    table = score([str(files["a"]), str(files["b"]), "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(table.out)))
    assert [r["file"] for r in rows] == [str(files["a"]), str(files["b"]), "total"]
    assert float(rows[0]["perplexity"]) == pytest.approx(
        json.loads(score([str(files["a"]), "--format", "json"]).out)["perplexity"]
    )


def test_jsonl_per_token(score, files, lm_h) -> None:
    result = score([str(files["a"]), "--format", "jsonl", "--per-token"])
    assert result.code == 0, result.err
    objs = [json.loads(line) for line in result.out.splitlines()]
    tokens = [o for o in objs if o["type"] == "token"]
    assert [o["type"] for o in objs[len(tokens) :]] == ["file"]
    assert "".join(t["text"] for t in tokens) == TEXT
    assert [t["id"] for t in tokens] == lm_h.encode(TEXT)
    assert all(
        set(t) >= {"text", "id", "logprob", "rank"} and t["rank"] >= 1 and t["logprob"] <= 0 for t in tokens
    )
    assert sum(-t["logprob"] for t in tokens) == pytest.approx(objs[-1]["total_nll"], rel=1e-5)


def test_json_per_token_and_top(score, files) -> None:
    obj = json.loads(score([str(files["a"]), "--format", "json", "--per-token", "--top", "3"]).out)
    assert len(obj["per_token"]) == obj["tokens"]
    worst = sorted(obj["per_token"], key=lambda t: t["logprob"])[:3]
    assert [t["position"] for t in obj["top"]] == [t["position"] for t in worst]
    assert all({"before", "after", "nll", "text"} <= set(t) for t in obj["top"])


def test_per_token_text_off_a_terminal_is_tsv_and_top_listing(score, files) -> None:
    result = score([str(files["a"]), "--per-token", "--top", "2"])
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "position\tid\tlogprob\trank\tentropy\ttext"
    assert "\\n" in result.out and "\x1b" not in result.out
    assert "most surprising tokens" in result.out and result.out.count(" nats ") == 2


def test_heat_map_on_a_colour_terminal(score, files, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setattr(score_cli, "color_allowed", lambda stream: True)
    result = score([str(files["a"]), "--per-token"])
    assert result.code == 0, result.err
    assert "\x1b[" in result.out and "surprisal (nats)" in result.out
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.out)
    assert plain.startswith(TEXT)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--stride", "64", "--context", "32"], 2, "larger than --context"),
        (["--context", "4096"], 2, "outside 1..128"),
        (["--stride", "0"], 2, "below 1"),
        (["--context", "0"], 2, "below 1"),
        (["--stride", "200"], 2, "larger than --context"),
        (["--batch-size", "0"], 2, "below 1"),
        (["--errors", "ignore"], 2, "invalid value"),
    ],
)
def test_bad_options(score, files, args: list[str], code: int, needle: str) -> None:
    assert_one_line_error(score([str(files["a"]), *args]), code, needle)


def test_bad_files(score, files, tmp_path: Path) -> None:
    assert_one_line_error(score([str(files["empty"])]), 2, "empty.txt is empty")
    assert_one_line_error(score([], stdin=b""), 2, "<stdin> is empty")
    assert_one_line_error(score([str(tmp_path / "nope.txt")]), 2, "nope.txt: no such file")
    assert_one_line_error(score([str(tmp_path)]), 2, "is a directory")
    bad = score([str(files["bad"])])
    assert_one_line_error(bad, 2, "bad.bin is not valid UTF-8", "offset 12", "--errors replace")
    replaced = score([str(files["bad"]), "--errors", "replace", "--format", "json"])
    assert replaced.code == 0 and json.loads(replaced.out)["tokens"] > 0


def test_several_files_with_failures_still_score_the_good_ones(score, files, tmp_path: Path) -> None:
    args = [
        str(files["a"]),
        str(tmp_path / "missing.txt"),
        str(files["empty"]),
        str(files["b"]),
        "--format",
        "jsonl",
    ]
    result = score(args)
    assert result.code == 1
    assert "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if line.startswith("gpt2: error:")]
    assert len(errors) == 2 and "missing.txt" in errors[0] and "empty.txt" in errors[1]
    objs = [json.loads(line) for line in result.out.splitlines()]
    assert [o.get("file") for o in objs] == [str(files["a"]), str(files["b"]), "total"]


def test_help_documents_the_method(score) -> None:
    result = score(["--help"])
    assert result.code == 0
    flat = " ".join(result.out.split())
    assert "prefixed with <|endoftext|>" in flat and "exactly once" in flat and "--stride" in flat


def test_every_file_failing_prints_no_json(score, tmp_path: Path) -> None:
    result = score([str(tmp_path / "x.txt"), str(tmp_path / "y.txt"), "--format", "json"])
    assert result.code == 1 and result.out == ""
    assert [line for line in result.err.splitlines() if line.startswith("gpt2: error:")] == [
        f"gpt2: error: {tmp_path / 'x.txt'}: no such file",
        f"gpt2: error: {tmp_path / 'y.txt'}: no such file",
    ]


def test_real_pipe_in_and_out(ckpt_h: Path, lm_h) -> None:
    """A real process: text piped on stdin, JSON on stdout, nothing on stderr."""
    result = run_subprocess(["score", "-m", str(ckpt_h), "--format", "json"], input=TEXT.encode())
    assert result.code == 0, result.err
    assert result.err == ""
    # Another process, so not the same bits on every CPU: on Intel CPUs float32 GEMMs go to MKL,
    # whose sums may move in the last bit with its operands' alignment (CI once saw 1.5e-5).
    expected = lm_h.score(TEXT).perplexity
    assert json.loads(result.out)["perplexity"] == pytest.approx(expected, rel=1e-4)


# --- issue 14: per-token csv, piped per-token, Ctrl-C, --protocol, terminal widths -------------


def test_per_token_csv_writes_token_rows(score, files, lm_h) -> None:
    result = score([str(files["a"]), "--per-token", "--format", "csv"])
    assert result.code == 0, result.err
    rows = list(csv.reader(io.StringIO(result.out)))
    assert rows[0] == ["file", "position", "id", "text", "logprob", "rank"]
    expected = lm_h.score(TEXT, per_token=True).token_scores
    assert [int(r[2]) for r in rows[1:]] == [t.id for t in expected]
    assert "".join(r[3] for r in rows[1:]) == TEXT
    assert "perplexity" in result.err and "perplexity" not in result.out  # the summary on stderr


def test_piped_per_token_writes_only_the_tsv(score, files) -> None:
    result = score([str(files["a"]), "--per-token"])
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "position\tid\tlogprob\trank\tentropy\ttext"
    assert all(line.count("\t") == 5 for line in lines)  # nothing but the TSV on stdout
    assert "perplexity" in result.err  # the table went to stderr


def test_ctrl_c_prints_the_partial_result(score, files, monkeypatch, tmp_path: Path) -> None:
    from gpt2cli.model import GPT2

    long = tmp_path / "long.txt"
    long.write_text(TEXT * 40, encoding="utf-8")
    real, calls = GPT2.hidden, {"n": 0}

    def hidden(self, ids, *args, **kwargs):
        if tuple(ids.shape) == (2, 32):  # a full batch: only the long file has those
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real(self, ids, *args, **kwargs)

    monkeypatch.setattr(GPT2, "hidden", hidden)
    args = [str(files["a"]), str(long), "--context", "32", "--stride", "32", "--batch-size", "2"]
    result = score([*args, "--format", "json"])
    assert result.code == 130, result.err
    obj = json.loads(result.out)
    done, partial = obj["files"]
    assert "interrupted" not in done and partial["file"] == str(long) and partial["interrupted"] is True
    assert (
        0 < partial["tokens"] < len(TEXT * 40)
        and obj["total"]["tokens"] == done["tokens"] + partial["tokens"]
    )
    assert f"interrupted in {long} after" in result.err
    calls["n"] = 0
    text = score(args)
    assert text.code == 130 and f"{long} (interrupted)" in text.out


def test_protocol_hf_from_the_cli(score, files, lm_h) -> None:
    result = score(
        [str(files["a"]), "--protocol", "hf", "--format", "json", "--context", "16", "--stride", "8"]
    )
    assert result.code == 0, result.err
    expected = lm_h.score(TEXT, context=16, stride=8, protocol="hf")
    assert json.loads(result.out)["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)
    assert "--protocol" in score(["--help"]).out and "default" in score(["--help"]).out


def test_tables_and_top_fit_a_narrow_terminal(score, files, monkeypatch) -> None:
    import sys

    import gpt2cli.cli.output as output

    monkeypatch.setattr(output, "is_terminal", lambda stream: stream is not None and stream is sys.stdout)
    monkeypatch.setattr(score_cli, "is_terminal", output.is_terminal)
    monkeypatch.setenv("COLUMNS", "40")
    result = score([str(files["a"]), str(files["b"])])
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) > 3 and max(len(line) for line in lines) <= 40, result.out
    monkeypatch.setenv("COLUMNS", "60")
    result = score([str(files["a"]), "--top", "3"])
    top = [line for line in result.out.splitlines() if " nats " in line]
    assert len(top) == 3 and all("[" in line and len(line) <= 60 for line in top), result.out
    assert any("…" in line for line in top)  # the context was cut to fit, not wrapped


def _strict(text: str) -> object:
    """JSON as a strict parser reads it: Python's Infinity and NaN refused."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_stays_strict_when_a_metric_overflows(score, tmp_path: Path) -> None:
    one_word = tmp_path / "b64.txt"
    one_word.write_text("QmFzZTY0IHRleHQ" * 40)  # one "word" of ~200 tokens: exp(total nll) > float max
    obj = _strict(score([str(one_word), "--format", "json"]).out)
    assert obj["word_perplexity"] is None and obj["words"] == 1 and obj["perplexity"] > 0
    for line in score([str(one_word), "--format", "jsonl"]).out.splitlines():
        _strict(line)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": one_word.read_text()}) + "\n" + json.dumps({"text": 5}) + "\n")
    batch = score(["--jsonl", str(jsonl)])
    lines = [_strict(line) for line in batch.out.splitlines()]
    assert lines[0]["word_perplexity"] is None and "error" in lines[1]
    assert "scored 1 documents, 1 errors" in batch.err  # the error line is no scored document
