"""The one engine: independent streams, rows of different lengths in one batch, rows that join
and leave, chunked prefill, caller-owned prompt caches, speculative decoding as its token
source, and the compiled decode step. All on tiny real checkpoints."""

from __future__ import annotations

import itertools
import math
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint

from gpt2cli import load
from gpt2cli.config import GenerationConfig
from gpt2cli.engine import BURST_CHUNKS, Engine, Request
from gpt2cli.kvcache import PromptCache

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "a",
    "def fib(n):\n    return fib(n - 1) + fib(n - 2)",
]
GREEDY = GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
SEEDED = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different tiny model with GPT-2's vocabulary (one layer), to draft for the target."""
    return make_checkpoint(tmp_path_factory.mktemp("draft"), n_layer=1, seed=7)


def solo(lm, prompt, cfg) -> list[int]:
    result = list(lm.stream(prompt, cfg))[-1]
    return result.samples[0].token_ids


def run_engine(lm, requests, *, max_rows=8, chunk=256, joins=None, cancel=None):
    """Step an engine to the end; ``joins`` {step: request} submits later, ``cancel`` (step, request)."""
    engine = Engine(lm.model, max_rows=max_rows, chunk=chunk)
    for r in requests:
        engine.submit(r)
    tokens: dict[int, list] = {}
    step = 0
    joins = dict(joins or {})
    while not engine.idle or joins:
        if step in joins:
            engine.submit(joins.pop(step))
        if cancel is not None and step == cancel[0]:
            engine.cancel(cancel[1])
        for event in engine.step():
            tokens.setdefault(id(event.seq), []).append(event)
        step += 1
    engine.release()
    return tokens


def request(lm, prompt, cfg, logprobs=None) -> Request:
    return Request(lm.encode(prompt), cfg, lm.tokenizer.eot_id, logprobs)


# --- streams on one LM are independent ---------------------------------------------------------


@pytest.mark.parametrize("cfg", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_interleaved_streams_on_one_lm_give_their_solo_outputs(lm_h, cfg) -> None:
    a_alone, b_alone = solo(lm_h, PROMPTS[0], cfg), solo(lm_h, PROMPTS[1], cfg)
    last = {}
    for x, y in itertools.zip_longest(lm_h.stream(PROMPTS[0], cfg), lm_h.stream(PROMPTS[1], cfg)):
        last["a"], last["b"] = x or last["a"], y or last["b"]  # one event of each, in turn
    assert last["a"].samples[0].token_ids == a_alone
    assert last["b"].samples[0].token_ids == b_alone


def test_two_threads_on_one_lm_give_their_solo_outputs(lm_h) -> None:
    expected = [solo(lm_h, p, SEEDED) for p in PROMPTS[:2]]
    got: list[list[int] | None] = [None, None]
    go = threading.Barrier(2)

    def work(i: int) -> None:
        go.wait()
        got[i] = solo(lm_h, PROMPTS[i], SEEDED)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


# --- rows of different lengths, joining and leaving ----------------------------------------------


def test_rows_of_different_lengths_match_each_prompt_alone(lm_h) -> None:
    reqs = [request(lm_h, p, GREEDY, logprobs=2) for p in PROMPTS]
    assert len({len(r.prompt) for r in reqs}) == len(reqs)
    together = run_engine(lm_h, reqs)
    for prompt, req in zip(PROMPTS, reqs, strict=True):
        alone_req = request(lm_h, prompt, GREEDY, logprobs=2)
        alone = run_engine(lm_h, [alone_req])
        got, want = together[id(req.sequences[0])], alone[id(alone_req.sequences[0])]
        assert [e.token for e in got] == [e.token for e in want] == solo(lm_h, prompt, GREEDY)
        assert [e.logprob.logprob for e in got] == pytest.approx([e.logprob.logprob for e in want], abs=1e-4)


def test_a_row_joining_mid_run_and_one_cancelled_leave_the_others_unchanged(lm_h) -> None:
    cfg = GenerationConfig(max_new_tokens=20, temperature=0, ignore_eos=True)
    keep = request(lm_h, PROMPTS[3], cfg)
    doomed = request(lm_h, PROMPTS[1], cfg)
    late = request(lm_h, PROMPTS[0], cfg)
    tokens = run_engine(lm_h, [keep, doomed], joins={5: late}, cancel=(8, doomed))
    assert [e.token for e in tokens[id(keep.sequences[0])]] == solo(lm_h, PROMPTS[3], cfg)
    assert [e.token for e in tokens[id(late.sequences[0])]] == solo(lm_h, PROMPTS[0], cfg)
    assert doomed.sequences[0].finish_reason == "cancelled"
    assert 0 < len(tokens[id(doomed.sequences[0])]) < 20


def test_chunked_prefill_beside_decoding_rows_changes_nothing(lm_h) -> None:
    long_prompt = " ".join(["word"] * 60)
    first, second = request(lm_h, PROMPTS[0], GREEDY), request(lm_h, long_prompt, GREEDY)
    engine = Engine(lm_h.model, max_rows=4, chunk=7)
    engine.submit(first)
    engine.step()  # `first` is decoding now
    engine.submit(second)
    before = lm_h.model.forward_tokens
    events = engine.step()  # one chunk of `second` and one decode step of `first`
    assert lm_h.model.forward_tokens - before == 7 + 1
    assert [e.seq for e in events] == [first.sequences[0]]
    tokens = {}
    while not engine.idle:
        for e in engine.step():
            tokens.setdefault(id(e.seq), []).append(e.token)
    assert tokens[id(second.sequences[0])] == solo(lm_h, long_prompt, GREEDY)


def test_short_prompts_waiting_together_join_in_one_step(lm_h) -> None:
    first = request(lm_h, PROMPTS[0], GREEDY)
    engine = Engine(lm_h.model, max_rows=8, chunk=64)
    engine.submit(first)
    engine.step()  # `first` is decoding now
    short = [engine.submit(request(lm_h, p, GREEDY)) for p in PROMPTS[1:4]]
    long_prompt = " ".join(["word"] * 80)
    long_one = engine.submit(request(lm_h, long_prompt, GREEDY))
    before = lm_h.model.forward_tokens
    events = engine.step()
    prompt_tokens = sum(len(r.prompt) for r in short)
    # the three short prompts, the first 64 - their length tokens of the long one, one decode row
    assert lm_h.model.forward_tokens - before == 64 + 1
    assert {id(e.seq) for e in events} == {id(first.sequences[0])} | {id(r.sequences[0]) for r in short}
    assert long_one.prefilled == 64 - prompt_tokens and list(engine.waiting) == [long_one]
    tokens: dict[int, list[int]] = {id(e.seq): [e.token] for e in events}
    while not engine.idle:
        for e in engine.step():
            tokens.setdefault(id(e.seq), []).append(e.token)
    for r, text in zip([*short, long_one], [*PROMPTS[1:4], long_prompt], strict=True):
        assert tokens[id(r.sequences[0])] == solo(lm_h, text, GREEDY)


def test_a_burst_on_an_idle_engine_prefills_in_one_step(lm_h) -> None:
    """Nothing decodes yet: the first prompt runs whole, the others share BURST_CHUNKS chunks."""
    burst = [request(lm_h, p, GREEDY) for p in PROMPTS[:4]]
    lengths = [len(r.prompt) for r in burst]
    chunk = lengths[0] - 1  # the first prompt is longer than a chunk, and runs whole
    assert sum(lengths) > BURST_CHUNKS * chunk > sum(lengths[:3])  # the last one is cut
    engine = Engine(lm_h.model, max_rows=8, chunk=chunk)
    for r in burst:
        engine.submit(r)
    before = lm_h.model.forward_tokens
    events = engine.step()
    # no decode step: nothing was decoding when the step began
    assert lm_h.model.forward_tokens - before == BURST_CHUNKS * chunk
    assert {id(e.seq) for e in events} == {id(r.sequences[0]) for r in burst[:3]}
    assert list(engine.waiting) == [burst[3]] and burst[3].prefilled == BURST_CHUNKS * chunk - sum(
        lengths[:3]
    )
    tokens: dict[int, list[int]] = {id(e.seq): [e.token] for e in events}
    while not engine.idle:
        for e in engine.step():
            tokens.setdefault(id(e.seq), []).append(e.token)
    for r, text in zip(burst, PROMPTS[:4], strict=True):
        assert tokens[id(r.sequences[0])] == solo(lm_h, text, GREEDY)


def test_generate_many_keeps_input_order_and_solo_results(lm_h) -> None:
    items = [(p, GenerationConfig(max_new_tokens=4 + 3 * i, temperature=0)) for i, p in enumerate(PROMPTS)]
    results = list(lm_h.generate_many(items, max_batch=3))
    assert [r.samples[0].token_ids for r in results] == [
        lm_h.complete(p, **{"max_new_tokens": c.max_new_tokens, "temperature": 0}).samples[0].token_ids
        for p, c in items
    ]


def test_a_request_whose_sampling_fails_fails_alone(lm_h) -> None:
    good = request(lm_h, PROMPTS[0], GREEDY)
    bad = request(lm_h, PROMPTS[1], GREEDY)

    def broken(*_args):
        raise RuntimeError("probability tensor contains inf")

    engine = Engine(lm_h.model, max_rows=4)
    engine.submit(good)
    engine.submit(bad)
    bad._sampler = broken
    tokens = []
    while not engine.idle:
        tokens += [e.token for e in engine.step() if e.seq.request is good]
    assert isinstance(bad.error, RuntimeError)
    assert bad.sequences[0].finish_reason == "error"
    assert tokens == solo(lm_h, PROMPTS[0], GREEDY)


# --- caller-owned prompt caches ------------------------------------------------------------------


def test_prompt_cache_reuses_the_shared_prefix_and_gives_the_same_text(lm_h) -> None:
    cache = PromptCache()
    first = list(lm_h.stream(PROMPTS[3], GREEDY, cache=cache))[-1]
    follow_up = lm_h.encode(PROMPTS[3]) + first.samples[0].token_ids + lm_h.encode(" and then")
    assert cache.ids == follow_up[: len(cache.ids)]
    reusable = cache.common_prefix(follow_up)
    again = list(lm_h.stream(follow_up, GREEDY, cache=cache))[-1]
    assert again.stats.prefill_tokens == len(follow_up) - reusable
    fresh = list(lm_h.stream(follow_up, GREEDY))[-1]
    assert again.samples[0].token_ids == fresh.samples[0].token_ids
    assert again.stats.prefill_tokens < fresh.stats.prefill_tokens // 2
    # several samples: the cache is copied in and out, not shared with the batch
    many = list(
        lm_h.stream(follow_up, GenerationConfig(max_new_tokens=5, temperature=0, num_samples=3), cache=cache)
    )
    assert [s.token_ids for s in many[-1].samples] == [fresh.samples[0].token_ids[:5]] * 3
    assert many[-1].stats.prefill_tokens < len(follow_up) // 2


# --- speculative decoding ------------------------------------------------------------------------


def _spec(target, draft, prompt, cfg, k=3):
    return list(target.stream(prompt, cfg, draft=draft, draft_tokens=k))[-1]


def test_speculative_stops_where_plain_stops_and_runs_at_most_one_round_past(lm_h, ckpt_h: Path) -> None:
    draft = load(str(ckpt_h), device="cpu")  # the target as its own draft: every proposal kept
    free = lm_h.complete(PROMPTS[0], max_new_tokens=20, temperature=0, ignore_eos=True)
    text = free.samples[0].text
    k = 3
    tried = 0
    for cut in range(2, 15):
        ids = free.samples[0].token_ids
        stop = lm_h.tokenizer.decode(ids[cut - 1 : cut])  # the cut-th token's text
        if not stop.strip() or text.find(stop) != len(lm_h.tokenizer.decode(ids[: cut - 1])):
            continue  # it must first occur as that token
        tried += 1
        cfg = GenerationConfig(max_new_tokens=20, temperature=0, ignore_eos=True, stop=(stop,))
        plain = list(lm_h.stream(PROMPTS[0], cfg))[-1]
        before = lm_h.model.forward_tokens
        spec = _spec(lm_h, draft, PROMPTS[0], cfg, k)
        target_work = lm_h.model.forward_tokens - before
        assert spec.samples[0].text == plain.samples[0].text
        assert spec.samples[0].token_ids == plain.samples[0].token_ids
        assert spec.samples[0].finish_reason == plain.samples[0].finish_reason == "stop"
        # the first token comes from the prefill; each round yields k + 1 tokens: no extra round
        rounds = spec.stats.draft_proposed // k
        assert len(plain.samples[0].token_ids) == cut
        assert rounds == math.ceil((cut - 1) / (k + 1))
        assert target_work == plain.prompt_tokens + rounds * (k + 1)
    assert tried >= 3


def test_speculative_greedy_equals_plain_at_eos_and_across_window_slides(tmp_path: Path, ckpt_draft) -> None:
    small = make_checkpoint(tmp_path / "w16", n_positions=16, seed=3)
    target, draft = load(str(small), device="cpu"), load(str(ckpt_draft), device="cpu")
    cfg = GenerationConfig(max_new_tokens=40, temperature=0, ignore_eos=True)
    plain = list(target.stream("a b c d", cfg))[-1]
    spec = _spec(target, draft, "a b c d", cfg, k=4)
    assert plain.stats.window_slides >= 2
    assert spec.stats.window_slides == plain.stats.window_slides
    assert spec.samples[0].token_ids == plain.samples[0].token_ids
    # EOS: a token the greedy run produces, declared the end-of-text id
    eos = plain.samples[0].token_ids[6]
    ids = target.encode("a b c d")
    outs = []
    for use_draft in (False, True):
        engine = target._engine(ids, cfg, None, draft if use_draft else None, 3)
        req = engine.submit(Request(ids, GenerationConfig(max_new_tokens=40, temperature=0), eos))
        got = []
        while not engine.idle:
            got += [e.token for e in engine.step()]
        outs.append((got, req.sequences[0].finish_reason))
    assert outs[0] == outs[1]
    assert outs[0][1] == "eos" and outs[0][0][-1] == eos


def test_speculative_sampling_follows_the_target_distribution(lm_h, ckpt_draft) -> None:
    """Chi-square of (token 1, token 2) from a different draft against the target's exact probabilities."""
    draft = load(str(ckpt_draft), device="cpu")
    cfg_of = lambda seed: GenerationConfig(max_new_tokens=2, temperature=1.0, top_k=3, top_p=1.0, seed=seed)  # noqa: E731
    prompt = lm_h.encode("The")
    exact: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        first = torch.softmax(_top3(lm_h.model(torch.tensor([prompt]))[0, -1]), -1)
        for t1 in first.nonzero().flatten().tolist():
            second = torch.softmax(_top3(lm_h.model(torch.tensor([prompt + [t1]]))[0, -1]), -1)
            for t2 in second.nonzero().flatten().tolist():
                exact[(t1, t2)] = float(first[t1] * second[t2])
    runs = 600
    counts: Counter = Counter()
    proposed = accepted = 0
    for seed in range(runs):
        result = list(lm_h.stream(prompt, cfg_of(seed), draft=draft, draft_tokens=2))[-1]
        counts[tuple(result.samples[0].token_ids)] += 1
        proposed += result.stats.draft_proposed
        accepted += result.stats.draft_accepted
    assert proposed > 0 and accepted < proposed  # the draft differs: the rejection path ran
    assert set(counts) <= set(exact)
    # cells expected fewer than 5 times are pooled into one, as the test requires
    cells = [(counts[c], runs * p) for c, p in exact.items() if runs * p >= 5]
    rare = [(counts[c], runs * p) for c, p in exact.items() if runs * p < 5]
    if rare:
        cells.append((sum(o for o, _ in rare), sum(e for _, e in rare)))
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    critical = {1: 12.1, 2: 15.2, 3: 17.7, 4: 20.0, 5: 22.1, 6: 24.1, 7: 26.0, 8: 27.9}  # p = 0.0005
    assert len(cells) >= 3
    assert chi2 < critical[len(cells) - 1], (chi2, counts, exact)


def _top3(logits: torch.Tensor) -> torch.Tensor:
    kth = logits.topk(3).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


# --- compiled decode step --------------------------------------------------------------------------


def test_compiled_step_one_graph_per_batch_bucket_whatever_the_prompt_length(
    ckpt_h: Path, ckpt_draft
) -> None:
    compiled = load(str(ckpt_h), device="cpu", compile=True)
    eager = load(str(ckpt_h), device="cpu")
    decoder = compiled.decoder
    assert decoder is not None
    for prompt in PROMPTS:  # four prompt lengths
        assert solo(compiled, prompt, GREEDY) == solo(eager, prompt, GREEDY)
    if decoder.failed:
        pytest.skip("torch.compile is unavailable here (no C++ toolchain?)")
    assert decoder.calls == 4 * (GREEDY.max_new_tokens - 1)
    assert decoder.graphs == 1
    three = GenerationConfig(max_new_tokens=4, temperature=0, ignore_eos=True, num_samples=3)
    result = list(compiled.stream(PROMPTS[0], three))[-1]  # 3 rows: the bucket of 4
    assert [s.token_ids for s in result.samples] == [solo(eager, PROMPTS[0], GREEDY)[:4]] * 3
    assert decoder.graphs == 2 and not decoder.failed
    # with a draft model: the draft's decode steps run through its compiled step
    draft = load(str(ckpt_draft), device="cpu", compile=True)
    spec = list(compiled.stream(PROMPTS[1], GREEDY, draft=draft, draft_tokens=3))[-1]
    assert spec.samples[0].token_ids == solo(eager, PROMPTS[1], GREEDY)
    assert draft.decoder is not None and draft.decoder.calls > 0
    assert not decoder.failed and not draft.decoder.failed


def test_readme_prompt_cache_example(lm_h) -> None:
    from gpt2cli import PromptCache

    cache = PromptCache()
    first = lm_h.complete("User: Hi\nAssistant:", cache=cache, max_new_tokens=6, temperature=0)
    follow = cache.ids + lm_h.encode("\nUser: More?\nAssistant:")
    before = lm_h.model.forward_tokens
    more = lm_h.complete(follow, cache=cache, max_new_tokens=6, temperature=0)
    assert first.samples[0].tokens == 6
    assert more.stats.prefill_tokens == len(lm_h.encode("\nUser: More?\nAssistant:"))
    assert lm_h.model.forward_tokens - before == more.stats.prefill_tokens + 5
    assert (
        more.samples[0].token_ids
        == lm_h.complete(follow, max_new_tokens=6, temperature=0).samples[0].token_ids
    )


def test_greedy_picks_the_first_largest_as_torch_does() -> None:
    """The CPU greedy pick (numpy's argmax) against torch's: ties go to the first index, a NaN
    wins, each row apart; other dtypes and shapes go through torch itself."""
    from gpt2cli.sampling import first_argmax

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 50257, generator=gen)
    rows[1, [7, 40000]] = 100.0  # a tie: the first
    rows[2, 123] = float("nan")
    rows[3] = 0.0  # all equal: index 0
    rows[4, -1] = float("inf")
    picked = first_argmax(rows)
    assert picked.dtype == torch.int64 and torch.equal(picked, rows.argmax(dim=-1))
    assert picked.tolist()[1:4] == [7, 123, 0]
    half = rows.bfloat16()
    assert torch.equal(first_argmax(half), half.argmax(dim=-1))
