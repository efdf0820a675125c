"""`gpt2 score --jsonl` and `LM.score_many`: per-document numbers, order, streaming, resume, bad lines."""

from __future__ import annotations

import json
import math
import select
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from batchutil import SAME_SCORE, assert_same_lines, read_jsonl, text_of, write_jsonl
from cliutil import GPT2_BIN, assert_one_line_error, run_inprocess, run_subprocess

from gpt2cli.scoring import ScoreInputError

CONTEXT, STRIDE = 32, 16  # the tiny model's window is 128; a small one makes long documents cheap
WINDOW = ["--context", str(CONTEXT), "--stride", str(STRIDE)]
# Shorter than, equal to and longer than the window, short ones between long ones.
LENGTHS = [5, 32, 1, 33, 100, 12, 31, 64, 2, 47, 20, 3]


@pytest.fixture(scope="module")
def docs(lm_h) -> list[dict]:
    return [{"id": f"doc-{i}", "text": text_of(lm_h, n, seed=i)} for i, n in enumerate(LENGTHS)]


@pytest.fixture
def score(capsys, monkeypatch, ckpt_h: Path):
    def call(args: list[str], stdin: bytes | None = None):
        return run_inprocess(["score", "-m", str(ckpt_h), *args], capsys, monkeypatch, stdin=stdin)

    return call


def expected_line(lm, doc: dict, ident=None, per_token: bool = False) -> dict:
    """The output line `gpt2 score` gives this document's text alone."""
    result = lm.score(doc["text"], context=CONTEXT, stride=STRIDE, per_token=per_token)
    obj = result.to_json()
    line = {"id": doc["id"] if ident is None else ident}
    keys = ("tokens", "bytes", "words", "nll", "total_nll", "perplexity", "bits_per_byte", "word_perplexity")
    line |= {key: obj[key] for key in keys}
    if per_token:
        line["per_token"] = obj["per_token"]
    return line


def test_each_line_equals_gpt2_score_of_that_text_alone(score, docs, lm_h, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out.jsonl"
    result = score(["--jsonl", str(src), "--output", str(out), *WINDOW, "--lookahead", "5"])
    assert result.code == 0, result.err
    got = read_jsonl(out)
    assert [g["tokens"] for g in got] == LENGTHS
    assert_same_lines(got, [expected_line(lm_h, d) for d in docs])
    assert result.out == ""  # the lines went to --output
    summary = result.err.strip().splitlines()[-1]
    assert summary.startswith(f"gpt2: scored {len(docs)} documents") and f"{sum(LENGTHS)} tokens" in summary
    total_nll = sum(g["total_nll"] for g in got)
    assert f"perplexity {math.exp(total_nll / sum(LENGTHS)):.4g}" in summary


def test_stdout_and_line_number_ids(score, docs, lm_h) -> None:
    lines = [{"text": d["text"]} for d in docs[:4]]
    stdin = "".join(json.dumps(o) + "\n\n" for o in lines).encode()  # blank lines are not documents
    result = score(["--jsonl", "-", *WINDOW], stdin=stdin)
    assert result.code == 0, result.err
    got = [json.loads(line) for line in result.out.splitlines()]
    assert [g["id"] for g in got] == [1, 3, 5, 7]  # the line numbers
    assert_same_lines(
        got, [expected_line(lm_h, d, ident=n) for d, n in zip(docs, [1, 3, 5, 7], strict=False)]
    )


def test_id_and_text_fields(score, docs, lm_h, tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"key": 10 + i, "body": d["text"]} for i, d in enumerate(docs[:3])]
    )
    out = tmp_path / "out.jsonl"
    result = score(
        ["--jsonl", str(src), "-o", str(out), "--id-field", "key", "--text-field", "body", *WINDOW]
    )
    assert result.code == 0, result.err
    assert_same_lines(read_jsonl(out), [expected_line(lm_h, d, ident=10 + i) for i, d in enumerate(docs[:3])])


def test_per_token_lines_stream(ckpt_h: Path, docs, lm_h, tmp_path: Path) -> None:
    """With the input still open, the first documents' lines (with per-token data) are already out."""
    args = ["score", "-m", str(ckpt_h), "--jsonl", "-", "--per-token", "--lookahead", "2", *WINDOW]
    proc = subprocess.Popen([str(GPT2_BIN), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("".join(json.dumps(d) + "\n" for d in docs[:2]).encode())
        proc.stdin.flush()
        first = []
        for _ in range(2):
            ready, _, _ = select.select([proc.stdout], [], [], 300)  # a guard against a hang, not a timing
            assert ready, "no output line while the input is still open"
            first.append(json.loads(proc.stdout.readline()))
        assert proc.poll() is None  # still running: it streamed, it did not wait for the end
        proc.stdin.write("".join(json.dumps(d) + "\n" for d in docs[2:4]).encode())
        proc.stdin.close()
        rest = [json.loads(line) for line in proc.stdout.read().splitlines()]
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
        proc.wait()
    got = first + rest
    assert_same_lines(got, [expected_line(lm_h, d, per_token=True) for d in docs[:4]])
    for line, doc in zip(got, docs, strict=False):
        tokens = line["per_token"]
        assert "".join(t["text"] for t in tokens) == doc["text"]
        assert [t["position"] for t in tokens] == list(range(line["tokens"]))
        assert sum(-t["logprob"] for t in tokens) == pytest.approx(line["total_nll"], rel=1e-6)


def test_kill_then_resume_equals_an_uninterrupted_run(ckpt_h: Path, docs, tmp_path: Path) -> None:
    many = [{"id": f"{d['id']}-{k}", "text": d["text"]} for k in range(3) for d in docs]
    src = write_jsonl(tmp_path / "in.jsonl", many)
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    base = ["score", "-m", str(ckpt_h), *WINDOW, "--lookahead", "4"]
    done = run_subprocess([*base, "--jsonl", str(src), "-o", str(whole)])
    assert done.code == 0, done.err

    # Feed half of the input through a pipe that stays open, so the job cannot finish; kill it
    # as soon as some lines are out.
    proc = subprocess.Popen([str(GPT2_BIN), *base, "--jsonl", "-", "-o", str(part)], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(src.read_bytes()[: len(src.read_bytes()) // 2])
    proc.stdin.flush()
    _wait_for_lines(part, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    kept = part.read_text().splitlines()
    assert 5 <= len(kept) < len(many)
    with open(part, "a", encoding="utf-8") as f:
        f.write('{"id": "doc-9-0", "tokens": 4')  # a line cut short by the kill

    resumed = run_subprocess([*base, "--jsonl", str(src), "-o", str(part), "--resume"])
    assert resumed.code == 0, resumed.err
    assert "partial line" in resumed.err and f"{len(kept)} already done" in resumed.err
    got = read_jsonl(part)
    assert len({g["id"] for g in got}) == len(got) == len(many)  # no duplicate, none missing
    assert_same_lines(got, read_jsonl(whole))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_keeps_the_lines_written_and_exits_130(
    ckpt_h: Path, docs, tmp_path: Path, workers: str
) -> None:
    out = tmp_path / "out.jsonl"
    args = ["score", "-m", str(ckpt_h), *WINDOW, "--lookahead", "2", "--jsonl", "-", "-o", str(out)]
    proc = subprocess.Popen(
        [str(GPT2_BIN), *args, "--workers", workers], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    proc.stdin.write("".join(json.dumps(d) + "\n" for d in docs[:6]).encode())
    proc.stdin.flush()
    _wait_for_lines(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"interrupted: --resume continues" in err
    kept = read_jsonl(out)  # every line whole
    assert [k["id"] for k in kept] == [d["id"] for d in docs[: len(kept)]] and len(kept) >= 2


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen) -> None:
    """Block until ``path`` holds ``n`` complete lines (an event; the deadline only stops a hang)."""
    import time

    deadline = time.monotonic() + 600
    while not (path.exists() and path.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None, "the job ended early"
        assert time.monotonic() < deadline, f"no {n} lines in {path} while the input is open"
        time.sleep(0.05)


def test_bad_lines_are_reported_and_the_rest_is_scored(score, docs, lm_h, tmp_path: Path) -> None:
    good = [json.dumps(d).encode() for d in docs[:3]]
    raw = [
        good[0],
        b"{not json",
        json.dumps({"id": "no-text"}).encode(),
        good[1],
        b'{"id": "latin1", "text": "caf\xe9"}',
        json.dumps({"id": "empty", "text": ""}).encode(),
        b"[1, 2]",
        json.dumps({"id": [1], "text": "x"}).encode(),
        json.dumps({"id": "num", "text": 5}).encode(),
        good[2],
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(raw) + b"\n")
    out = tmp_path / "out.jsonl"
    result = score(["--jsonl", str(src), "-o", str(out), *WINDOW])
    assert result.code == 0, result.err
    got = read_jsonl(out)
    assert [g["id"] for g in got] == ["doc-0", 2, "no-text", "doc-1", 5, "empty", 7, 8, "num", "doc-2"]
    errors = {g["line"]: g["error"] for g in got if "error" in g}
    assert sorted(errors) == [2, 3, 5, 6, 7, 8, 9]
    assert "not valid JSON" in errors[2] and 'no "text" field' in errors[3]
    assert "not valid UTF-8" in errors[5] and '"text" is empty' in errors[6]
    assert "not a JSON object" in errors[7] and '"id" must be a string or an integer' in errors[8]
    assert '"text" is not a string' in errors[9]
    for number, message in errors.items():
        assert message.startswith(f"line {number}: ")
        assert f"gpt2: warning: {message}" in result.err
    scored = [g for g in got if "error" not in g]
    assert_same_lines(scored, [expected_line(lm_h, d) for d in docs[:3]])
    assert "7 errors" in result.err.splitlines()[-1]


def test_on_error_stop_ends_at_the_bad_line(score, docs, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(docs[0]) + "\n{oops\n" + json.dumps(docs[1]) + "\n")
    out = tmp_path / "out.jsonl"
    result = score(["--jsonl", str(src), "-o", str(out), "--on-error", "stop", *WINDOW])
    assert_one_line_error(result, 2, "line 2: not valid JSON", "--resume")
    assert [g["id"] for g in read_jsonl(out)] == ["doc-0"]  # what came before is kept


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--workers", "2"], "--workers applies to batch jobs only"),
        (["--resume"], "--resume applies to batch jobs only"),
        (["--jsonl", "IN", "--format", "json"], "--format does not apply to --jsonl"),
        (["--jsonl", "IN", "--top", "3"], "--top does not apply to --jsonl"),
        (["--jsonl", "IN", "--protocol", "hf"], "--protocol does not apply to --jsonl"),
        (["--jsonl", "IN", "--compare", "IN"], "--compare does not apply to --jsonl"),
        (["--jsonl", "IN", "--color", "rank"], "--color does not apply to --jsonl"),
        (["--jsonl", "-", "--ray"], "--ray cannot read standard input"),
        (["--jsonl", "IN", "--workers", "0"], "--workers 0 is below 1"),
        (["--jsonl", "IN", "--lookahead", "0"], "--lookahead 0 is below 1"),
        (["--jsonl", "IN", "--resume"], "--resume needs an --output file"),
        (["--jsonl", "IN", "-o", "OUT"], "already exists"),
        (["--jsonl", "IN", "-o", "IN"], "--output is the input file"),
        (["--jsonl", "MISSING", "-o", "NEW"], "no such file"),
    ],
)
def test_bad_options(score, docs, tmp_path: Path, args: list[str], needle: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", docs[:1])
    (tmp_path / "out.jsonl").write_text('{"id": 1}\n')
    paths = {"IN": str(src), "OUT": str(tmp_path / "out.jsonl"), "MISSING": str(tmp_path / "nope.jsonl")}
    paths["NEW"] = str(tmp_path / "new.jsonl")
    result = score([paths.get(a, a) for a in args])
    assert_one_line_error(result, 2, needle)
    assert not (tmp_path / "new.jsonl").exists()


def test_output_that_is_not_ours_is_refused(score, docs, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", docs[:2])
    out = tmp_path / "out.jsonl"
    out.write_text("some notes\n" + json.dumps({"id": "doc-0"}) + "\n")
    assert_one_line_error(score(["--jsonl", str(src), "-o", str(out), "--resume"]), 2, "line 1 is not a line")


def test_progress_bar_on_a_terminal(score, docs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from gpt2cli.cli import batch as batch_cli

    screen = io.StringIO()
    monkeypatch.setattr(batch_cli, "is_terminal", lambda stream: True)
    monkeypatch.setattr(
        batch_cli, "stderr_console", lambda: Console(file=screen, force_terminal=True, width=150)
    )
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    result = score(["--jsonl", str(src), "-o", str(tmp_path / "out.jsonl"), *WINDOW, "--lookahead", "3"])
    assert result.code == 0, result.err
    shown = screen.getvalue()
    assert "docs/s" in shown and "tok/s" in shown and f"{len(docs)} docs" in shown
    assert str(src) in shown


# --- the library ---------------------------------------------------------------------------------


def test_score_many_yields_in_order_with_errors_in_place(lm_h, docs) -> None:
    texts = [d["text"] for d in docs[:3]] + ["", docs[3]["text"], b"\xff bad", docs[4]["text"].encode()]
    results = list(lm_h.score_many(texts, context=CONTEXT, stride=STRIDE, lookahead=3))
    assert len(results) == len(texts)
    assert isinstance(results[3], ScoreInputError) and "empty" in results[3].message
    assert isinstance(results[5], ScoreInputError) and "not valid UTF-8" in results[5].message
    for text, result in zip(texts, results, strict=True):
        if isinstance(result, ScoreInputError):
            continue
        alone = lm_h.score(text, context=CONTEXT, stride=STRIDE)
        assert (result.tokens, result.bytes, result.words) == (alone.tokens, alone.bytes, alone.words)
        assert result.total_nll == pytest.approx(alone.total_nll, rel=SAME_SCORE)


def test_score_many_reads_only_a_lookahead_ahead(lm_h, docs) -> None:
    pulled = []

    def texts():
        for i in range(100):
            pulled.append(i)
            yield docs[i % len(docs)]["text"]

    results = lm_h.score_many(texts(), context=CONTEXT, stride=STRIDE, lookahead=4)
    next(results)
    assert len(pulled) == 4  # the first group, not the whole input
    assert len(list(results)) == 99


def test_packing_shares_batches(lm_h, docs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short documents share forward passes: far fewer than one per document."""
    from gpt2cli.scoring import Scorer

    calls = []
    original = Scorer.window_logprobs

    def counting(self, windows, want_ranks=False):
        calls.append(len(windows))
        return original(self, windows, want_ranks)

    monkeypatch.setattr(Scorer, "window_logprobs", counting)
    short = [text_of(lm_h, n, seed=n) for n in range(1, 31)]  # one window each
    list(lm_h.score_many(short, context=CONTEXT, stride=STRIDE, batch_size=8, lookahead=30))
    # Longest first, at most 8 x 32 padded tokens a batch: 8 of 30..23 tokens, 11 of 22..12, 11 of 11..1.
    assert calls == [8, 11, 11]


def test_windows_much_shorter_than_their_batch_start_another(lm_h, monkeypatch: pytest.MonkeyPatch) -> None:
    """Padding a short window to a long one costs attention over the padded length: past 64
    tokens and a quarter of the longest, it gets a batch of its own; the numbers do not change."""
    from gpt2cli.scoring import Scorer

    calls = []
    original = Scorer.window_logprobs

    def counting(self, windows, want_ranks=False):
        calls.append(sorted(len(w.ids) for w in windows))
        return original(self, windows, want_ranks)

    monkeypatch.setattr(Scorer, "window_logprobs", counting)
    texts = [text_of(lm_h, n, seed=n) for n in (126, 20, 110, 50)]  # one window each
    packed = list(lm_h.score_many(texts, context=128, stride=64, batch_size=8, lookahead=4))
    assert calls == [[110, 126], [20, 50]]  # 126 - 50 = 76 > 64 and > 126 / 4
    for text, result in zip(texts, packed, strict=True):
        assert result.total_nll == pytest.approx(
            lm_h.score(text, context=128, stride=64).total_nll, rel=SAME_SCORE
        )


# --- workers and Ray: the same lines ------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory: pytest.TempPathFactory, docs) -> Path:
    """Documents of every length, a few of them twice over, with two bad lines among them."""
    lines = [json.dumps({"id": f"{d['id']}-{k}", "text": d["text"]}) for k in range(2) for d in docs]
    lines[5:5] = ["{broken", json.dumps({"id": "blank", "text": ""})]
    path = tmp_path_factory.mktemp("mixed") / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def job_args(ckpt: Path, src: Path, out: Path) -> list[str]:
    return ["score", "-m", str(ckpt), *WINDOW, "--lookahead", "5", "--jsonl", str(src), "-o", str(out)]


@pytest.fixture(scope="module")
def local_run(ckpt_h: Path, mixed_input: Path) -> list[dict]:
    out = mixed_input.with_name("local.jsonl")
    args = job_args(ckpt_h, mixed_input, out)
    result = run_subprocess(args)
    assert result.code == 0, result.err
    return read_jsonl(out)


def test_workers_2_equals_workers_1(
    ckpt_h: Path, mixed_input: Path, local_run: list[dict], tmp_path: Path
) -> None:
    out = tmp_path / "w2.jsonl"
    args = job_args(ckpt_h, mixed_input, out)
    result = run_subprocess([*args, "--workers", "2"])
    assert result.code == 0, result.err
    assert "2 errors" in result.err and "on 2 worker processes" in result.err
    assert_same_lines(read_jsonl(out), local_run)


def test_ray_local_equals_the_local_run(
    ckpt_h: Path, mixed_input: Path, local_run: list[dict], tmp_path: Path
) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'gpt2cli[ray]')")
    out = tmp_path / "ray.jsonl"
    args = job_args(ckpt_h, mixed_input, out)
    ray_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a limit
    env = {"GPT2_THREADS": "1", "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_dir)}  # two one-thread actors
    try:
        result = run_subprocess([*args, "--ray", "--workers", "2"], env=env, timeout=600)
        sessions = list((ray_dir / "ray").glob("session_2*")) if (ray_dir / "ray").exists() else []
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert result.code == 0, result.err
    assert "Traceback" not in result.err and "2 errors" in result.err and "2 actors" in result.err
    assert len(sessions) == 1  # it did start a Ray instance of its own
    assert_same_lines(read_jsonl(out), local_run)
