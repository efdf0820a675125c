"""`gpt2 lens`, `gpt2 attention`, `gpt2 activations` and `gpt2 score --compare/--color` as users drive them."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cliutil import assert_one_line_error, run_inprocess
from rich.console import Console
from safetensors import safe_open

from gpt2cli.cli import attention as attention_cli
from gpt2cli.cli import lens as lens_cli
from gpt2cli.cli import score as score_cli
from gpt2cli.cli.output import shade

TEXT = "The cat sat on the mat."


@pytest.fixture
def gpt2(capsys, monkeypatch, ckpt_h: Path):
    def call(command: str, *args: str, stdin: bytes | None = None):
        return run_inprocess([command, "-m", str(ckpt_h), *args], capsys, monkeypatch, stdin=stdin)

    return call


def plain_console(width: int = 100) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, color_system=None, highlight=False, markup=False), out


# --- lens ---------------------------------------------------------------------------------------


def test_lens_json_and_jsonl(gpt2, lm_h) -> None:
    result = gpt2("lens", TEXT, "--format", "json", "--layers", "-1", "--positions", "1:4", "--top", "2")
    assert result.code == 0, result.err
    obj = json.loads(result.out)
    expected = lm_h.lens(TEXT, layers=-1, positions="1:4", top=2)
    assert obj["layers"] == [1] and obj["positions"] == [1, 2, 3] and obj["at"] == "post"
    assert [c["top"] for c in obj["cells"]] == [[t.to_json() for t in c.top] for c in expected.cells]
    cell = obj["cells"][0]
    assert set(cell) >= {"layer", "position", "token", "top", "target_logprob", "target_rank"}
    assert cell["token"] == lm_h.tokenizer.decode(lm_h.encode("The")) and cell["target"] == " cat"
    lines = gpt2("lens", TEXT, "--format", "jsonl", "--at", "pre").out.splitlines()
    n_tokens = len(lm_h.encode(TEXT)) + 1
    assert len(lines) == lm_h.config.n_layer * n_tokens
    last = json.loads(lines[-1])
    assert last["target"] is None and last["target_rank"] is None


def test_lens_piped_is_tsv(gpt2, lm_h) -> None:
    result = gpt2("lens", "-", "--top", "3", stdin=TEXT.encode())
    assert result.code == 0, result.err
    rows = [line.split("\t") for line in result.out.splitlines()]
    assert rows[0][:6] == ["layer", "position", "token", "target", "target_logprob", "target_rank"]
    assert len(rows[0]) == 6 + 2 * 3 and all(len(r) == len(rows[0]) for r in rows)
    assert len(rows) == 1 + lm_h.config.n_layer * (len(lm_h.encode(TEXT)) + 1)
    assert "\x1b" not in result.out


def test_lens_grid_shows_top1_and_target_probability(lm_h) -> None:
    result = lm_h.lens(TEXT, top=1)
    console, out = plain_console(width=70)  # narrow: the positions split over several grids
    lens_cli.render_grid(result, console)
    text = out.getvalue()
    lines = text.splitlines()
    # a grid opens with its positions' numbers (the title above may wrap, as long paths do)
    grids = sum(re.fullmatch(r" +(\d+ *)+", line) is not None for line in lines)
    assert sum(line.startswith("next ") for line in lines) >= grids
    for layer in result.layers:
        assert sum(line.startswith(f"L{layer} ") for line in lines) == grids  # a row in every grid
    assert grids > 1 and "p(next)" in text
    per_grid = -(-len(result.positions) // grids)
    for layer in result.layers:
        row = next(line for line in lines if line.startswith(f"L{layer} "))  # the first grid
        for j, p in enumerate(result.positions[:per_grid]):
            start = lens_cli.LABEL + 1 + j * (lens_cli.CELL + 1)
            cell = result.cell(layer, p)
            shown = row[start : start + lens_cli.CELL]
            assert shown[0] == shade(cell.target_prob)[0]  # the shade is p(actual next token)
            assert shown[2:].rstrip() == lens_cli._clip(cell.top[0].text, lens_cli.CELL - 2).rstrip()


def test_lens_bad_input(gpt2) -> None:
    assert_one_line_error(gpt2("lens", TEXT, "--layers", "2"), 2, "layer 2 is out of range")
    assert_one_line_error(gpt2("lens", TEXT, "--positions", "50"), 2, "position 50 is out of range")
    assert_one_line_error(gpt2("lens", TEXT, "--at", "end"), 2, "invalid value")
    assert_one_line_error(gpt2("lens", "word " * 200), 2, "more than the model's 128-token window", "first")
    assert_one_line_error(gpt2("lens", TEXT, "--top", "0"), 2, "--top")
    assert_one_line_error(gpt2("lens", "", "--no-bos"), 2, "empty")
    empty = gpt2("lens", "")
    assert_one_line_error(empty, 2, "empty", 'gpt2 lens "')
    assert "unconditionally" not in empty.err  # generation's hint, not the lens's


# --- attention ----------------------------------------------------------------------------------


def test_attention_data_formats(gpt2, lm_h, tmp_path: Path) -> None:
    T = len(lm_h.encode(TEXT)) + 1
    expected = lm_h.attention(TEXT, layers="0", heads="1")
    assert (
        gpt2(
            "attention", TEXT, "--layer", "0", "--head", "1", "--format", "npy", "-o", str(tmp_path / "a.npy")
        ).code
        == 0
    )
    array = np.load(tmp_path / "a.npy")
    assert array.shape == (1, 1, T, T)
    umask = os.umask(0o022)
    os.umask(umask)
    assert ((tmp_path / "a.npy").stat().st_mode & 0o777) == 0o666 & ~umask  # as open() makes files
    np.testing.assert_array_equal(array, expected.pattern.numpy())
    assert gpt2("attention", TEXT, "--format", "safetensors", "-o", str(tmp_path / "a.safetensors")).code == 0
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.get_tensor("pattern").shape == (lm_h.config.n_layer, lm_h.config.n_head, T, T)
        assert f.get_tensor("tokens").tolist() == [50256, *lm_h.encode(TEXT)]
    obj = json.loads(gpt2("attention", TEXT, "--format", "json", "--head", "0").out)
    assert obj["shape"] == [lm_h.config.n_layer, 1, T, T] and obj["heads"] == [0]
    torch.testing.assert_close(torch.tensor(obj["pattern"])[0, 0], lm_h.attention(TEXT).pattern[0, 0])


def test_attention_refuses_to_overwrite_and_bad_paths(gpt2, tmp_path: Path) -> None:
    out = tmp_path / "a.npy"
    out.write_bytes(b"precious")
    assert_one_line_error(
        gpt2("attention", TEXT, "--format", "npy", "-o", str(out)), 2, "exists", "--overwrite"
    )
    assert out.read_bytes() == b"precious"
    assert gpt2("attention", TEXT, "--format", "npy", "-o", str(out), "--overwrite").code == 0
    assert np.load(out).ndim == 4
    missing = tmp_path / "nowhere" / "a.npy"
    assert_one_line_error(gpt2("attention", TEXT, "--format", "npy", "-o", str(missing)), 2, "does not exist")
    assert_one_line_error(
        gpt2("attention", TEXT, "--format", "npy", "-o", str(tmp_path)), 2, "is a directory"
    )
    assert_one_line_error(gpt2("attention", TEXT, "--head", "2"), 2, "head 2 is out of range")
    assert_one_line_error(gpt2("attention", TEXT, "--layer", "-3"), 2, "layer -3 is out of range")


def test_binary_attention_to_a_terminal_is_refused(gpt2, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_cli, "is_terminal", lambda stream: True)
    assert_one_line_error(gpt2("attention", TEXT, "--format", "npy"), 2, "binary", "--output")


def test_attention_piped_tsv_lists_the_heaviest_keys(gpt2, lm_h) -> None:
    result = gpt2("attention", TEXT, "--layer", "1", "--head", "0", "--top", "2")
    assert result.code == 0, result.err
    rows = [line.split("\t") for line in result.out.splitlines()]
    assert rows[0] == ["layer", "head", "query", "query_token", "rank", "key", "key_token", "weight"]
    pattern = lm_h.attention(TEXT, layers=1, heads=0).pattern[0, 0]
    T = pattern.shape[0]
    assert len(rows) == 1 + 1 + 2 * (T - 1)  # query 0 has one key; the others their top 2
    for row in rows[1:]:
        q, key = int(row[2]), int(row[5])
        assert key <= q and float(row[7]) == pytest.approx(float(pattern[q, key]), rel=1e-5)


def test_attention_heat_map_and_lists_on_a_terminal(lm_h) -> None:
    result = lm_h.attention(TEXT, layers="0", heads="0")
    console, out = plain_console()
    attention_cli.render_heatmaps(result, console)
    lines = out.getvalue().splitlines()
    header = lines.index(" " * attention_cli.LABEL + "".join(f"{k:>2}" for k in range(len(result.tokens))))
    rows = lines[header + 1 : header + 1 + len(result.tokens)]
    assert [int(row.split()[0]) for row in rows] == list(range(len(result.tokens)))
    for q, row in enumerate(rows):
        cells = row[attention_cli.LABEL :]
        assert len(cells) == 2 * (q + 1)  # one shaded pair per visible key
        expected = "".join(shade(float(w))[0] * 2 for w in result.pattern[0, 0, q, : q + 1])
        assert cells == expected
    console, out = plain_console()
    attention_cli.render_lists(result, console, 1)
    assert out.getvalue().count("->") == len(result.tokens)


# --- activations --------------------------------------------------------------------------------


def test_activations_one_text_and_jsonl(gpt2, lm_h, tmp_path: Path) -> None:
    out = tmp_path / "one.safetensors"
    result = gpt2("activations", TEXT, "-o", str(out), "--hook", "blocks.1.*")
    assert result.code == 0, result.err
    assert result.out.strip() == str(out) and "1 text" in result.err
    with safe_open(str(out), "pt") as f:
        names = set(f.keys())
    assert names == {"tokens", "offsets"} | {
        f"blocks.1.{p}"
        for p in (
            "hook_resid_pre",
            "attn.hook_pattern",
            "attn.hook_z",
            "hook_resid_mid",
            "mlp.hook_post",
            "hook_resid_post",
        )
    }
    lines = "\n".join(json.dumps({"body": t}) for t in ["a b c", TEXT, "last one"]) + "\n"
    many = tmp_path / "many.safetensors"
    result = gpt2(
        "activations", "--jsonl", "-", "--text-field", "body", "-o", str(many), stdin=lines.encode()
    )
    assert result.code == 0, result.err
    with safe_open(str(many), "pt") as f:
        assert f.metadata()["texts"] == "3"
        assert f.get_tensor("blocks.0.hook_resid_post").shape[0] == f.get_tensor("offsets")[-1]


def test_activations_bad_input(gpt2, tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    err = gpt2("activations", TEXT, "-o", str(out), "--hook", "blocks.0.resid")
    assert_one_line_error(
        err,
        2,
        "no hook point is called 'blocks.0.resid'",
        "blocks.{0..1}.hook_resid_pre",
        "ln_final.hook_normalized",
    )
    assert_one_line_error(gpt2("activations", TEXT), 2, "no output file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    assert_one_line_error(
        gpt2("activations", "--jsonl", str(bad), "-o", str(out)), 2, "line 2: not valid JSON"
    )
    assert_one_line_error(
        gpt2("activations", "--jsonl", str(tmp_path / "none.jsonl"), "-o", str(out)), 2, "no such file"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written
    out.write_bytes(b"old")
    assert_one_line_error(gpt2("activations", TEXT, "-o", str(out)), 2, "exists")
    assert out.read_bytes() == b"old"
    assert gpt2("activations", TEXT, "-o", str(out), "--overwrite").code == 0 and out.stat().st_size > 3


# --- score --compare and --color ------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return path


def test_compare_with_itself_and_int8(gpt2, text_file: Path, ckpt_h: Path) -> None:
    same = json.loads(gpt2("score", str(text_file), "--compare", str(ckpt_h), "--format", "json").out)
    assert (
        abs(same["mean_kl"]) < 1e-6
        and same["same_top1"] == 1.0
        and same["perplexity_ratio"] == pytest.approx(1.0)
    )
    result = gpt2("score", str(text_file), "--compare-quantize", "int8", "--format", "json", "--per-token")
    assert result.code == 0, result.err
    obj = json.loads(result.out)
    assert obj["model_b"] == f"{ckpt_h} [int8]" and obj["model_a"] == str(ckpt_h)
    assert obj["mean_kl"] > 0 and len(obj["per_token"]) == obj["tokens"]
    assert obj["mean_kl"] == pytest.approx(sum(t["kl"] for t in obj["per_token"]) / obj["tokens"], rel=1e-6)
    assert set(obj) >= {"delta_perplexity", "cross_perplexity", "binoculars", "perplexity_a", "perplexity_b"}


def test_compare_jsonl_csv_and_text(gpt2, text_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "u.txt"
    other.write_text("Another text entirely.", encoding="utf-8")
    lines = [
        json.loads(x)
        for x in gpt2(
            "score",
            str(text_file),
            str(other),
            "--compare-dtype",
            "bfloat16",
            "--format",
            "jsonl",
            "--per-token",
        ).out.splitlines()
    ]
    kinds = [x["type"] for x in lines]
    assert kinds[-1] == "total" and kinds.count("file") == 2 and kinds[0] == "token"
    assert lines[-1]["tokens"] == sum(x["tokens"] for x in lines if x["type"] == "file")
    csv_out = gpt2("score", str(text_file), "--compare-quantize", "int8", "--format", "csv").out.splitlines()
    assert csv_out[0].startswith("model_a,model_b,file,tokens,mean_kl") and len(csv_out) == 2
    text = gpt2("score", str(text_file), "--compare-quantize", "int8", "--per-token").out
    lines = text.splitlines()
    assert lines[0].startswith("position\tid\tdelta_logprob")
    rows = [line for line in lines[1:] if "\t" in line]
    summary = lines[1 + len(rows) :]
    assert summary[0].startswith("A = ") and summary[1] == f"{text_file}: {len(rows)} tokens"
    assert [line.split()[0] for line in summary[2:]] == [
        "mean",
        "perplexity",
        "same",
        "cross-perplexity",
        "binoculars",
    ]


def test_compare_with_a_smaller_window_defaults_to_it(gpt2, text_file: Path, tmp_path: Path) -> None:
    from checkpoints import make_checkpoint

    narrow = make_checkpoint(tmp_path / "narrow", seed=3, n_positions=16)
    result = gpt2("score", str(text_file), "--compare", str(narrow), "--format", "json")
    assert result.code == 0, result.err  # not "--context 128 is outside 1..16": none was given
    assert json.loads(result.out)["context"] == 16
    assert_one_line_error(
        gpt2("score", str(text_file), "--compare", str(narrow), "--context", "32"), 2, "--context 32"
    )


def test_compare_bad_input(gpt2, text_file: Path, tmp_path: Path) -> None:
    from checkpoints import make_checkpoint

    other = make_checkpoint(tmp_path / "wide", seed=3)
    vocab = json.loads((other / "vocab.json").read_text(encoding="utf-8"))
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    (other / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    assert_one_line_error(gpt2("score", str(text_file), "--compare", str(other)), 2, "different vocabularies")
    assert_one_line_error(
        gpt2("score", str(text_file), "--compare-quantize", "int8", "--top", "3"), 2, "--compare"
    )
    assert_one_line_error(
        gpt2("score", str(text_file), "--compare-quantize", "int4"), 2, "unknown quantization"
    )


def test_per_token_json_has_entropy(gpt2, text_file: Path) -> None:
    tokens = json.loads(gpt2("score", str(text_file), "--per-token", "--format", "json").out)["per_token"]
    assert all(t["entropy"] >= 0 for t in tokens)


@pytest.mark.parametrize("color", ["rank", "entropy", "surprisal"])
def test_gltr_colours_and_legend_fractions(
    gpt2, lm_h, text_file: Path, monkeypatch: pytest.MonkeyPatch, color: str
) -> None:
    monkeypatch.setattr(score_cli, "color_allowed", lambda stream: True)
    result = gpt2("score", str(text_file), "--color", color)  # --color implies --per-token
    assert result.code == 0, result.err
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.out)
    scores = lm_h.score(text_file, per_token=True).token_scores
    if color == "rank":
        assert "rank (GLTR)" in plain
        buckets = [
            sum(1 for t in scores if lo < t.rank <= hi)
            for lo, hi in [(0, 10), (10, 100), (100, 1000), (1000, 10**9)]
        ]
        for label, n in zip(["top-10", "top-100", "top-1000", ">1000"], buckets, strict=True):
            assert f" {label} {n / len(scores):.0%} " in plain
        if buckets[0]:
            assert "\x1b[30;42m" in result.out  # GLTR's green for the top-10
    else:
        assert ("entropy (nats)" if color == "entropy" else "surprisal (nats)") in plain
        value = [t.entropy if color == "entropy" else -t.logprob for t in scores]
        first = sum(1 for v in value if v < 1.0)
        assert f" 0-1 {first / len(scores):.0%} " in plain
