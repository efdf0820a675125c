"""`gpt2 bench`: output shapes, sweeps, the transformers comparison and bad input (no timing asserted)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
from cliutil import Result, assert_one_line_error, run_inprocess

from gpt2cli.bench import BenchSpec, _percentile, parse_int_list, weight_bytes_per_step
from gpt2cli.errors import BadInputError

FAST = ["-n", "3", "--repeats", "1", "--warmup", "0"]
REQUIRED = {
    "prefill_tokens_per_second": float,
    "decode_tokens_per_second": float,
    "time_to_first_token_s": float,
    "token_latency_p50_s": float,
    "token_latency_p90_s": float,
    "peak_memory_bytes": int,
    "bandwidth_bytes_per_second": float,
    "weight_bytes_per_step": int,
    "load_seconds": float,
    "device": str,
    "dtype": str,
    "quantization": str,
    "torch_version": str,
    "threads": int,
}


@pytest.fixture
def bench(ckpt_h: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    def run(*args: str) -> Result:
        return run_inprocess(["bench", "-m", str(ckpt_h), *args], capsys, monkeypatch)

    return run


def test_json_keys_and_types(bench) -> None:
    res = bench(
        "--prompt-tokens", "5", "--warmup", "1", "--new-tokens", "4", "--repeats", "2", "--format", "json"
    )
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert list(report) == ["results"]
    (r,) = report["results"]
    for key, kind in REQUIRED.items():
        assert isinstance(r[key], kind), (key, r[key])
    import torch

    assert (r["engine"], r["device"], r["dtype"], r["quantization"]) == ("gpt2cli", "cpu", "float32", "none")
    assert (r["prompt_tokens"], r["new_tokens"], r["batch_size"], r["repeats"]) == (5, 4, 1, 2)
    assert r["torch_version"] == torch.__version__
    assert r["threads"] == torch.get_num_threads()
    assert r["prefill_tokens_per_second"] > 0 and r["decode_tokens_per_second"] > 0
    assert r["peak_memory_bytes"] > 0
    assert r["token_latency_p50_s"] <= r["token_latency_p90_s"]
    # batch 1: bandwidth is the weight bytes per token times decode tokens/s
    assert r["bandwidth_bytes_per_second"] == pytest.approx(
        r["weight_bytes_per_step"] * r["decode_tokens_per_second"]
    )
    for name in ("prefill_tokens_per_second", "decode_tokens_per_second", "time_to_first_token_s"):
        s = r["spread"][name]
        assert s["min"] <= s["median"] == r[name] <= s["max"]


def test_sweep_runs_every_combination(bench) -> None:
    res = bench("--prompt-tokens", "4,9", "--batch-size", "1,3", *FAST, "--format", "json")
    assert res.code == 0, res.err
    results = json.loads(res.out)["results"]
    assert [(r["prompt_tokens"], r["batch_size"]) for r in results] == [(4, 1), (4, 3), (9, 1), (9, 3)]


def test_the_largest_seed_runs(bench) -> None:
    res = bench("--prompt-tokens", "4", *FAST, "--seed", str(2**64 - 1), "--format", "json")
    assert res.code == 0, res.err  # the prompts' seeds (seed + an offset) wrap instead of overflowing


def test_csv_shape(bench) -> None:
    res = bench("--prompt-tokens", "4,6", *FAST, "--format", "csv")
    assert res.code == 0, res.err
    rows = list(csv.DictReader(io.StringIO(res.out)))
    assert len(rows) == 2
    assert set(REQUIRED) <= set(rows[0])
    assert "decode_tokens_per_second_min" in rows[0]
    assert [int(r["prompt_tokens"]) for r in rows] == [4, 6]
    assert all(float(r["decode_tokens_per_second"]) > 0 for r in rows)


def test_markdown_and_table_shape(bench) -> None:
    res = bench("--prompt-tokens", "4", "--batch-size", "1,2", *FAST, "--format", "markdown")
    assert res.code == 0, res.err
    table = [line for line in res.out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2  # header, separator, one row per configuration
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "decode tok/s" in table[0] and set(table[1]) <= {"|", "-"}

    res = bench("--prompt-tokens", "4", *FAST)  # table: plain text when stdout is not a terminal
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert len(lines) == 3 and "decode tok/s" in lines[1] and "gpt2cli" in lines[2]
    assert "\x1b[" not in res.out


def test_compare_transformers_reports_ratios(bench) -> None:
    res = bench("--prompt-tokens", "4,6", *FAST, "--format", "json", "--compare", "transformers")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    engines = [(r["engine"], r["prompt_tokens"]) for r in report["results"]]
    assert engines == [("gpt2cli", 4), ("gpt2cli", 6), ("transformers", 4), ("transformers", 6)]
    theirs = report["results"][2]
    assert theirs["quantization"] == "none" and theirs["dtype"] == "float32"
    assert theirs["weight_bytes_per_step"] == report["results"][0]["weight_bytes_per_step"]
    assert len(report["comparisons"]) == 2
    for c in report["comparisons"]:
        assert c["against"] == "transformers"
        assert set(c["ratio"]) == {
            "prefill_tokens_per_second",
            "decode_tokens_per_second",
            "time_to_first_token_s",
        }
        assert all(v > 0 for v in c["ratio"].values())

    res = bench("--prompt-tokens", "4", *FAST, "--format", "markdown", "--compare", "transformers")
    assert res.code == 0, res.err
    rows = [line for line in res.out.splitlines() if line.startswith("| 4 ")]
    assert [row.split("|")[3].strip() for row in rows] == ["gpt2cli", "transformers", "ratio vs transformers"]
    assert rows[2].split("|")[6].strip().endswith("x")


def test_compare_without_transformers_is_a_clear_error(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes it unimportable
    res = bench("--prompt-tokens", "4", *FAST, "--compare", "transformers")
    assert_one_line_error(res, 1, "transformers", "not installed")
    assert res.out == ""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--prompt-tokens", ""], "at least one value"),
        (["--prompt-tokens", ","], "at least one value"),
        (["--prompt-tokens", "4,x"], "not a whole number"),
        (["--prompt-tokens", "0"], "at least 1"),
        (["--prompt-tokens", "4,-2"], "at least 1"),
        (["--batch-size", "0"], "at least 1"),
        (["--batch-size", ""], "at least one value"),
        (["--new-tokens", "0"], "--max-new-tokens must be at least 2"),
        (["-n", "1"], "--max-new-tokens must be at least 2"),
        (["--seed", "-5"], "--seed must be -1 (random) or an integer"),
        (["--repeats", "0"], "repeats"),
        (["--warmup", "-1"], "warmup"),
        (["--threads", "0"], "threads"),
        (["--prompt-tokens", "4,120", "--new-tokens", "10"], "window"),
        (["--compare", "llama.cpp"], "cannot compare"),
        (["--quantize", "int4"], "quantization"),
        (["--format", "xml"], "xml"),
    ],
)
def test_bad_input_exits_2(bench, args: list[str], needle: str) -> None:
    res = bench(*["--new-tokens", "3", "--repeats", "1", "--prompt-tokens", "4"], *args)
    assert_one_line_error(res, 2, needle)
    assert res.out == ""


def test_parse_int_list_and_spec() -> None:
    assert parse_int_list(" 16, 512 ", "prompt-tokens") == (16, 512)
    with pytest.raises(BadInputError):
        parse_int_list("1.5", "batch-size")
    spec = BenchSpec(prompt_tokens=(16, 512), batch_sizes=(1, 8)).validate()
    assert spec.workloads() == [(16, 1), (16, 8), (512, 1), (512, 8)]
    spec.check_window(1024)
    with pytest.raises(BadInputError, match="window"):
        spec.check_window(600)


def test_percentile_matches_numpy_linear() -> None:
    assert _percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert _percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert _percentile([7.0], 90) == 7.0


def test_weight_bytes_count_tied_weights_once(lm_h) -> None:
    model = lm_h.model
    params = {n: p for n, p in model.named_parameters()}
    expected = sum(p.numel() * p.element_size() for n, p in params.items() if n != "wpe.weight")
    assert weight_bytes_per_step(model, "wpe.weight") == expected


def test_library_run_reports_progress_and_batch_bandwidth(ckpt_h: Path) -> None:
    from gpt2cli.bench import run

    events: list[tuple[str, int, int]] = []
    spec = BenchSpec(
        model=str(ckpt_h), prompt_tokens=(4,), new_tokens=3, batch_sizes=(2,), repeats=2, warmup=0
    )
    report = run(spec, progress=lambda label, done, total: events.append((label, done, total)))
    (r,) = report.results
    assert events[0] == ("gpt2cli: loading", 0, 2) and events[-1] == ("gpt2cli: done", 2, 2)
    assert [done for _, done, _ in events] == sorted(done for _, done, _ in events)
    # the weights are read once per step for all rows of the batch
    assert r.bandwidth_bytes_per_second == pytest.approx(
        r.weight_bytes_per_step * r.decode_tokens_per_second / 2
    )


def test_draft_model_reports_acceptance_and_speed_up(ckpt_h, ckpt_t, capsys, monkeypatch) -> None:
    import json

    from cliutil import run_inprocess

    base = ["bench", "-m", str(ckpt_h), "--prompt-tokens", "8", "--new-tokens", "12", "--repeats", "1"]
    same = run_inprocess([*base, "--draft-model", str(ckpt_h), "--format", "json"], capsys, monkeypatch)
    assert same.code == 0, same.err
    report = json.loads(same.out)
    engines = [r["engine"] for r in report["results"]]
    assert engines == ["gpt2cli", f"gpt2cli+draft:{ckpt_h}"]
    assert report["results"][1]["acceptance_rate"] == 1.0  # a draft identical to the target
    assert report["comparisons"][0]["against"] == "gpt2cli"
    assert report["comparisons"][0]["ratio"]["decode_tokens_per_second"] > 0
    other = run_inprocess([*base, "--draft-model", str(ckpt_t), "--format", "json"], capsys, monkeypatch)
    rate = json.loads(other.out)["results"][1]["acceptance_rate"]
    assert 0.0 <= rate < 1.0  # another random model agrees with the target only sometimes
    table = run_inprocess([*base, "--draft-model", str(ckpt_h)], capsys, monkeypatch)
    assert "accepts 100%" in table.out


def test_draft_model_needs_batch_1(ckpt_h, capsys, monkeypatch) -> None:
    from cliutil import assert_one_line_error, run_inprocess

    args = ["bench", "-m", str(ckpt_h), "--draft-model", str(ckpt_h), "--batch-size", "1,8"]
    assert_one_line_error(run_inprocess(args, capsys, monkeypatch), 2, "one sequence")


def _interrupt_at_run(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Ctrl-C as the n-th timed run starts (each run draws its prompt: count the draws)."""
    import gpt2cli.bench as bench_module

    real, calls = bench_module.random_prompt, {"n": 0}

    def drawing(*args: int) -> list[int]:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(bench_module, "random_prompt", drawing)


def test_ctrl_c_prints_the_configurations_that_finished(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupt_at_run(monkeypatch, 3)
    res = bench("--prompt-tokens", "4,9", "--batch-size", "1,2", *FAST, "--format", "json")
    assert res.code == 130 and "Traceback" not in res.err
    results = json.loads(res.out)["results"]
    assert [(r["prompt_tokens"], r["batch_size"]) for r in results] == [(4, 1), (4, 2)]
    assert "gpt2: interrupted: 2 of 4 timed configurations finished" in res.err


def test_ctrl_c_while_comparing_keeps_the_finished_pairs(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupt_at_run(monkeypatch, 4)  # ours at 4 and 6 done, transformers at 4 done, then Ctrl-C
    res = bench("--prompt-tokens", "4,6", *FAST, "--format", "markdown", "--compare", "transformers")
    assert res.code == 130, res.err
    rows = [[cell.strip() for cell in line.split("|")[1:4]] for line in res.out.splitlines()[4:]]
    assert rows == [
        ["4", "1", "gpt2cli"],
        ["4", "1", "transformers"],
        ["4", "1", "ratio vs transformers"],
        ["6", "1", "gpt2cli"],
    ]
    assert "3 of 4 timed configurations finished" in res.err


def test_ctrl_c_before_any_result_prints_nothing_on_stdout(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupt_at_run(monkeypatch, 1)
    res = bench("--prompt-tokens", "4", *FAST)
    assert res.code == 130 and res.out == ""
    assert "gpt2: interrupted: 0 of 1 timed configuration finished" in res.err


def test_the_seed_is_reported_a_drawn_one_too(bench) -> None:
    given = json.loads(bench("--prompt-tokens", "4", *FAST, "--seed", "7", "--format", "json").out)
    assert given["results"][0]["seed"] == 7
    drawn = json.loads(bench("--prompt-tokens", "4", *FAST, "--seed", "-1", "--format", "json").out)
    seed = drawn["results"][0]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**64
    csv_rows = list(csv.DictReader(io.StringIO(bench("--prompt-tokens", "4", *FAST, "--format", "csv").out)))
    assert csv_rows[0]["seed"] == "0"
