"""The scoring method (library): fidelity with transformers, windows, streaming, metrics."""

from __future__ import annotations

import io
import math
import tracemalloc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers  # noqa: E402  (the test extra: a hard requirement, never a silent skip)
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2cli import load, scoring
from gpt2cli.errors import BadInputError
from gpt2cli.scoring import ScoreInputError, WindowCutter

EOT = 50256
TEXT = (
    "The quick brown fox jumps over the lazy dog.\nIt was the best of times, it was the worst of times; "
    "ünïcödé 🎉 and numbers 12345.\n\n  Indented line\twith a tab. <|endoftext|>A new document starts here. "
) * 3


@pytest.fixture(scope="module")
def lms(ckpt_h: Path, ckpt_t: Path):
    return {"h": load(str(ckpt_h), device="cpu"), "transformer": load(str(ckpt_t), device="cpu")}


@pytest.fixture(scope="module")
def refs(ckpt_h: Path, ckpt_t: Path):
    def ref(path: Path):
        return transformers.GPT2LMHeadModel.from_pretrained(str(path), dtype=torch.float32).eval()

    return {"h": ref(ckpt_h), "transformer": ref(ckpt_t)}


def reference_nll(model, ids: list[int], context: int, stride: int) -> tuple[float, int, list[float]]:
    """Hugging Face's perplexity-guide recipe, adapted so every token is scored exactly once.

    seq = <|endoftext|> + ids; window inputs seq[begin:end] (end - begin <= context) predict
    seq[begin+1:end+1]; only the targets after the previous window's last one count.
    Returns (total NLL, scored tokens, per-token log-probabilities).
    """
    seq = torch.tensor([EOT, *ids])
    last = len(seq) - 1  # index of the last target
    total, count, prev_end, logprobs = 0.0, 0, 0, []
    for begin in range(0, last, stride):
        end = min(begin + context, last)
        trg_len = end - prev_end
        input_ids = seq[begin:end][None]
        target_ids = seq[begin + 1 : end + 1].clone()
        target_ids[:-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits[0].double()
        total += F.cross_entropy(logits, target_ids, ignore_index=-100, reduction="sum").item()
        lp = torch.log_softmax(logits, -1)[-trg_len:].gather(1, seq[end - trg_len + 1 : end + 1, None])
        logprobs += lp[:, 0].tolist()
        count += trg_len
        prev_end = end
        if end == last:
            break
    return total, count, logprobs


@pytest.mark.parametrize("layout", ["h", "transformer"])
@pytest.mark.parametrize(
    ("context", "stride", "batch", "chars"),
    [
        (128, 64, 8, None),
        (128, 128, 2, None),
        (32, 16, 3, None),
        (32, 32, 8, None),
        (17, 5, 4, 150),
        (9, 1, 16, 60),
    ],
)
def test_matches_transformers(
    lms, refs, layout: str, context: int, stride: int, batch: int, chars: int | None
) -> None:
    lm, ref = lms[layout], refs[layout]
    text = TEXT[:chars]
    ids = lm.encode(text)
    result = lm.score(text, context=context, stride=stride, batch_size=batch, per_token=True)
    total, count, logprobs = reference_nll(ref, ids, context, stride)
    assert result.tokens == count == len(ids)
    assert result.total_nll == pytest.approx(total, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)
    assert [t.id for t in result.token_scores] == ids
    torch.testing.assert_close(
        torch.tensor([t.logprob for t in result.token_scores]),
        torch.tensor(logprobs, dtype=torch.float32),
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize("layout", ["h", "transformer"])
def test_text_shorter_than_a_window_and_exactly_one_window(lms, refs, layout: str) -> None:
    lm, ref = lms[layout], refs[layout]
    short = "Hello there, general Kenobi."
    one_window = "x" + " a" * 127  # 128 tokens: the whole model window
    assert len(lm.encode(one_window)) == 128
    for text in (short, one_window):
        for stride in (64, 128):
            result = lm.score(text, stride=stride)
            total, count, _ = reference_nll(ref, lm.encode(text), 128, stride)
            assert result.tokens == count
            assert result.total_nll == pytest.approx(total, rel=1e-4)
    single = lm.score("a", per_token=True)  # one token: scored after <|endoftext|> alone
    assert single.tokens == 1 and single.token_scores[0].position == 0


def test_batching_does_not_change_scores(lms) -> None:
    lm = lms["h"]
    one = lm.score(TEXT, context=24, stride=8, batch_size=1)
    many = lm.score(TEXT, context=24, stride=8, batch_size=7)
    assert many.total_nll == pytest.approx(one.total_nll, rel=1e-6)


def test_int8_logits_come_in_smaller_chunks_with_the_same_bits(ckpt_h: Path, monkeypatch) -> None:
    """An int8 lm_head going through torch's _int_mm makes LOGIT_ELEMENTS_INT8 logits at a time
    (that GEMM holds an int32 and a float32 copy of each), through the numba int8 kernel and a
    float one LOGIT_ELEMENTS; the chunking never changes a score, the int8 path within float32
    rounding (each layer's bits are the same; _int_mm's path fuses the MLP's activation)."""
    monkeypatch.setenv("GPT2_INT8_GEMM", "int-mm")
    int8, fp32 = load(str(ckpt_h), device="cpu", quantize="int8"), load(str(ckpt_h), device="cpu")
    vocab = int8.model.config.vocab_size
    monkeypatch.setattr(scoring, "LOGIT_ELEMENTS", 40 * vocab)
    monkeypatch.setattr(scoring, "LOGIT_ELEMENTS_INT8", 20 * vocab)
    seen: dict[str, list[int]] = {"int8": [], "fp32": []}
    for name, lm in (("int8", int8), ("fp32", fp32)):
        real = lm.model.logits
        monkeypatch.setattr(
            lm.model, "logits", lambda h, real=real, name=name: seen[name].append(len(h)) or real(h)
        )
    chunked = int8.score(TEXT, context=96, stride=48, per_token=True)
    fp32.score(TEXT, context=96, stride=48)
    assert max(seen["int8"]) == 20 and max(seen["fp32"]) == 40, seen
    monkeypatch.setattr(scoring, "LOGIT_ELEMENTS_INT8", 3 * vocab)  # GEMV rows instead of the GEMM
    rows = int8.score(TEXT, context=96, stride=48, per_token=True)
    assert max(seen["int8"][-5:]) == 3
    assert [t.logprob for t in rows.token_scores] == [t.logprob for t in chunked.token_scores]
    monkeypatch.setenv("GPT2_INT8_GEMM", "numba")
    numba_path = int8.score(TEXT, context=96, stride=48, per_token=True)
    assert max(seen["int8"][-5:]) == 40
    assert [t.logprob for t in numba_path.token_scores] == pytest.approx(
        [t.logprob for t in chunked.token_scores], rel=1e-5, abs=1e-5
    )


def test_default_batch_is_a_token_budget_on_cpu(lms, monkeypatch) -> None:
    """Unless --batch-size is given, a CPU batch holds CPU_BATCH_TOKENS worth of windows (the
    memory of eight 1024-token windows bought no speed there); a GPU batch eight windows."""
    assert scoring.default_batch_size(1024, torch.device("cpu")) == scoring.CPU_BATCH_TOKENS // 1024
    assert scoring.default_batch_size(scoring.CPU_BATCH_TOKENS * 2, torch.device("cpu")) == 1
    assert scoring.default_batch_size(1024, torch.device("cuda")) == scoring.GPU_BATCH_WINDOWS
    lm = lms["h"]
    batches: list[int] = []
    real = scoring.Scorer._run

    def spied(self, windows, *rest):  # type: ignore[no-untyped-def]
        batches.append(len(windows))
        return real(self, windows, *rest)

    monkeypatch.setattr(scoring.Scorer, "_run", spied)
    monkeypatch.setattr(scoring, "CPU_BATCH_TOKENS", 3 * 24)
    default = lm.score(TEXT, context=24, stride=8)
    assert max(batches) == 3 and len(batches) > 2, batches
    batches.clear()
    given = lm.score(TEXT, context=24, stride=8, batch_size=5)
    assert max(batches) == 5, batches
    assert default.total_nll == pytest.approx(given.total_nll, rel=1e-6)


def test_windows_score_every_target_once() -> None:
    for context, stride, n in [(4, 2, 11), (4, 4, 8), (4, 1, 3), (5, 3, 5), (5, 5, 4), (3, 2, 0)]:
        cutter = WindowCutter(-1, context, stride)
        windows = list(cutter.push(list(range(1, n + 1)))) + list(cutter.finish())
        scored = [w.begin + j + 1 for w in windows for j in range(w.first, len(w.ids))]
        assert scored == list(range(1, n + 1)), (context, stride, n)
        for w in windows:
            assert len(w.ids) <= context and w.targets == [
                i + 1 for i in range(w.begin, w.begin + len(w.ids))
            ]


def test_metrics_follow_lm_eval(lms) -> None:
    text = "  Two   words\nand three more  "
    result = lms["h"].score(text)
    assert result.bytes == len(text.encode())
    assert result.words == len(__import__("re").split(r"\s+", text))
    assert result.nll == pytest.approx(result.total_nll / result.tokens)
    assert result.bits_per_byte == pytest.approx(result.total_nll / result.bytes / math.log(2))
    assert result.word_perplexity == pytest.approx(math.exp(result.total_nll / result.words))
    pooled = scoring.total([result, result])
    assert pooled.tokens == 2 * result.tokens and pooled.perplexity == pytest.approx(result.perplexity)


def test_top_tokens_have_context(lms) -> None:
    result = lms["h"].score(TEXT, top=3, per_token=True)
    worst = sorted(result.token_scores, key=lambda t: t.logprob)[:3]
    assert [s.token.position for s in result.top] == [t.position for t in worst]
    for s in result.top:
        assert s.before + s.token.text in TEXT and s.token.text + s.after in TEXT


# --- streaming ----------------------------------------------------------------------------------

_ALPHABET = st.sampled_from(
    list("ab Z9.,'\n\t\u00e9\u4e2d") + [" ", "  ", "\n\n", "'s", "<|endoftext|>", "\U0001f389"]
)


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(_ALPHABET, max_size=60), read=st.integers(1, 9))
def test_streamed_tokenization_equals_whole(lms, parts: list[str], read: int) -> None:
    text = "".join(parts)
    tok = lms["h"].tokenizer
    stats, seen = scoring.TextStats(), [0]
    chunks = scoring.decoded_chunks(io.BytesIO(text.encode()), "t", read_bytes=read)
    streamed = [i for ids in scoring.token_chunks(tok, chunks, stats, seen) for i in ids]
    assert streamed == tok.encode(text, allow_special=True)
    assert stats.bytes == seen[0] == len(text.encode())
    assert stats.words == (len(__import__("re").split(r"\s+", text)) if text else 0)


def test_windows_stream_in_bounded_memory(lms, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading, tokenizing and cutting 2 MB into windows never holds the whole token sequence."""
    monkeypatch.setattr(scoring, "READ_BYTES", 16 << 10)
    data = "".join(f"A line of text that goes on, number {i}.\n" for i in range(50_000)).encode()
    stats, read, count, last = scoring.TextStats(), [0], 0, 0
    tracemalloc.start()
    try:
        for window in scoring.windows(
            lms["h"].tokenizer, io.BytesIO(data), "big", "strict", 128, 64, stats, read
        ):
            count += len(window.ids) - window.first
            last = window.begin + len(window.ids)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == last == len(lms["h"].encode(data.decode())) > 500_000
    assert stats.bytes == read[0] == len(data)
    # Holding every token id as a Python int would take more than 28 bytes x tokens.
    assert peak < count * 28 / 10, peak


# --- bad input ----------------------------------------------------------------------------------


def test_invalid_utf8_names_the_byte_offset(lms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xff world")
    with pytest.raises(ScoreInputError, match=r"bad\.txt.*offset 6"):
        lms["h"].score(path)
    assert lms["h"].score(path, errors="replace").tokens == len(lms["h"].encode("hello \ufffd world"))
    monkeypatch.setattr(scoring, "READ_BYTES", 3)  # the bad sequence straddles two reads
    with pytest.raises(ScoreInputError, match="offset 2"):
        lms["h"].score(b"ab\xc3(cd")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"context": 64, "stride": 65}, "larger than --context"),
        ({"context": 129}, "outside 1..128"),
        ({"context": 0}, "outside"),
        ({"stride": 0}, "below 1"),
        ({"batch_size": 0}, "below 1"),
    ],
)
def test_bad_window_settings(lms, kwargs: dict, needle: str) -> None:
    with pytest.raises(BadInputError, match=needle):
        lms["h"].score("some text", **kwargs)


def test_bad_sources(lms, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    for source, needle in [
        (tmp_path / "empty.txt", "is empty"),
        (tmp_path / "missing.txt", "no such file"),
        (tmp_path, "is a directory"),
        ("", "is empty"),
    ]:
        with pytest.raises(ScoreInputError, match=needle):
            lms["h"].score(source)


# --- issue 14: Hugging Face's perplexity guide, progress by bytes scored, Ctrl-C ---------------


def hf_guide_perplexity(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int, list[int]]:
    """The code of Hugging Face's perplexity guide (docs/source/en/perplexity.md), as published:
    returns (perplexity, n_tokens, and, added here, the positions its losses predict)."""
    predicted: list[int] = []
    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        predicted += [begin_loc + j for j in range(1, end_loc - begin_loc) if target_ids[0, j] != -100]
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    avg_nll = nll_sum / n_tokens
    return float(torch.exp(avg_nll)), n_tokens, predicted


@pytest.mark.parametrize("layout", ["h", "transformer"])
@pytest.mark.parametrize(
    ("context", "stride", "batch"), [(128, 128, 4), (128, 64, 3), (32, 16, 8), (33, 7, 2)]
)
def test_hf_protocol_is_the_perplexity_guide(
    lms, refs, layout: str, context: int, stride: int, batch: int
) -> None:
    lm = lms[layout]
    ids = lm.encode(TEXT)
    expected, n_tokens, predicted = hf_guide_perplexity(refs[layout], ids, context, stride)
    got = lm.score(TEXT, context=context, stride=stride, batch_size=batch, protocol="hf", per_token=True)
    assert got.tokens == n_tokens
    assert got.perplexity == pytest.approx(expected, rel=1e-4)
    assert [t.position for t in got.token_scores] == predicted  # the tokens the guide predicts
    assert [t.id for t in got.token_scores] == [ids[i] for i in predicted]
    default = lm.score(TEXT, context=context, stride=stride, batch_size=batch)
    assert default.tokens == len(ids) and default.perplexity != pytest.approx(got.perplexity, rel=1e-6)


def test_hf_windows_match_the_guide() -> None:
    cutter = scoring.HFWindowCutter(context=4, stride=2)
    ids = list(range(100, 109))  # 9 tokens
    windows = [*cutter.push(ids[:5]), *cutter.push(ids[5:]), *cutter.finish()]
    # the guide: [0,4) [2,6) [4,8) [6,9); new tokens 4, 2, 2, 1 -> weights 3, 1, 1, 0
    assert [(w.begin, len(w.ids) + 1, w.weight) for w in windows] == [
        (0, 4, 3),
        (2, 4, 1),
        (4, 4, 1),
        (6, 3, 0),
    ]
    predicted = [t for w in windows for t in w.targets[w.first :]]
    assert predicted == ids[1:]


def test_progress_follows_bytes_scored(lms) -> None:
    text = TEXT * 20  # one read of the input holds it all: bytes read would jump to the end at once
    seen: list[tuple[int, int]] = []
    result = lms["h"].score(
        text, context=64, stride=64, batch_size=1, progress=lambda b, t: seen.append((b, t))
    )
    total = len(text.encode())
    assert len(seen) > 10
    assert seen[0][0] < total / 10 and seen[-1] == (total, result.tokens)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(seen, seen[1:], strict=False))


def test_ctrl_c_gives_the_result_so_far(lms, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = lms["h"]
    real = type(lm.model).hidden
    calls = {"n": 0}

    def hidden(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(lm.model), "hidden", hidden)
    with pytest.raises(scoring.ScoreInterrupted) as caught:
        lm.score(TEXT * 5, context=32, stride=32, batch_size=2)
    partial = caught.value.partial
    assert isinstance(caught.value, KeyboardInterrupt) and partial.interrupted
    assert partial.tokens == 3 * 2 * 32  # three batches of two disjoint 32-token windows
    scored_text = lm.tokenizer.decode(lm.encode(TEXT * 5)[: partial.tokens])
    assert partial.bytes == len(scored_text.encode())
    assert partial.words == len(__import__("re").split(r"\s+", scored_text))
    assert math.isfinite(partial.perplexity) and partial.to_json()["interrupted"] is True


@pytest.mark.parametrize("pieces", [["a ", " b"], ["a\n", "\nb"], ["a", " ", " ", "b"], [" a", " b "]])
def test_text_stats_count_words_across_cuts(pieces: list[str]) -> None:
    import re

    stats = scoring.TextStats()
    for piece in pieces:
        stats.add(piece)
    text = "".join(pieces)
    assert stats.words == len(re.split(r"\s+", text)) and stats.bytes == len(text.encode())
