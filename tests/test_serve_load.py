"""`gpt2 serve` under load: continuous batching, no head-of-line blocking, the prompt cache,
isolation of bad requests, HTTP timeouts and /metrics. No test waits on the clock: the engine
is held between steps (``EngineGate``) where an order must be arranged, and every wait is for
an event."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import httpx
import openai
import pytest
from checkpoints import make_checkpoint
from serverutil import Background, EngineGate, ServerThread, together, wait_for

from gpt2cli import load
from gpt2cli.chat import pick_template
from gpt2cli.server.http import Timeouts


@pytest.fixture(scope="module")
def ckpt_long(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a 1024-token window, so one request can keep the engine busy for a while."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_long"), n_positions=1024, n_embd=64, seed=4)


@pytest.fixture(scope="module")
def lm_long(ckpt_long: Path):
    return load(str(ckpt_long), device="cpu")


@pytest.fixture
def lm(ckpt_h: Path):
    """A model of its own: tests here count its forward-pass tokens."""
    return load(str(ckpt_h), device="cpu")


def client_for(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)


def greedy(lm, prompt, n: int, **options) -> str:
    return lm.complete(prompt, max_new_tokens=n, temperature=0, **options).samples[0].text


def streamed_text(stream) -> str:
    return "".join(c.choices[0].text for c in stream if c.choices)


# --- continuous batching ----------------------------------------------------------------------


def test_mixed_concurrent_requests_batch_and_equal_the_serial_replies(lm, ckpt_h: Path) -> None:
    """8 clients, prompts of 1-60 tokens, 3-20 new tokens, streamed and not: the serial answers."""
    vocab = lm.tokenizer.n_vocab
    specs = [([(k * 7919 + j * 104729) % vocab for j in range(1 + 9 * k)], 3 + 2 * k) for k in range(8)]
    expected = [greedy(lm, ids, n) for ids, n in specs]
    srv = ServerThread(lm, max_batch=8).start()
    gate = EngineGate(srv.scheduler)
    c = client_for(srv)

    def ask(k: int, stream: bool) -> str:
        ids, n = specs[k]
        args = {"model": ckpt_h.name, "prompt": ids, "max_tokens": n, "temperature": 0}
        if stream:
            return streamed_text(c.completions.create(stream=True, **args))
        return c.completions.create(**args).choices[0].text

    def client_loop(k: int) -> list[str]:
        return [ask(k, stream=(k + r) % 2 == 1) for r in range(2)]

    try:
        # the first wave queues up in full and starts as one batch; then clients come and go
        first = together(srv, gate, [lambda k=k: ask(k, stream=k % 2 == 0) for k in range(8)])
        rest = [Background(lambda k=k: client_loop(k)) for k in range(8)]
        results = {k: [first[k], *rest[k].result()] for k in range(8)}
        metrics = srv.metrics()
    finally:
        gate.open()
        srv.stop()
    assert all(results[k] == [expected[k]] * 3 for k in range(8)), (results, expected)
    assert metrics["gpt2_active_rows_max"] > 1  # the batching really happened
    assert metrics["gpt2_batched_steps_total"] > 0
    assert metrics['gpt2_requests_total{path="/v1/completions",status="200"}'] == 24


def test_a_short_request_gets_its_first_token_before_a_long_one_ends(lm_long, ckpt_long: Path) -> None:
    srv = ServerThread(lm_long, max_batch=8).start()
    gate = EngineGate(srv.scheduler)
    order: list[str] = []
    lock = threading.Lock()
    long_started = threading.Event()

    def note(what: str) -> None:
        with lock:
            order.append(what)

    def run(name: str, body: dict) -> None:
        c = client_for(srv)
        first = True
        for chunk in c.completions.create(model=ckpt_long.name, stream=True, **body):
            if chunk.choices and chunk.choices[0].text and first:
                note(f"{name} first token")
                first = False
                if name == "long":
                    long_started.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                note(f"{name} done")

    long_body = {"prompt": [50256], "max_tokens": 1000, "temperature": 0}
    short_body = {"prompt": "Hi", "max_tokens": 4, "temperature": 0}
    try:
        long = Background(lambda: run("long", long_body))
        assert long_started.wait(120)
        gate.close()
        assert gate.held.wait(60)  # the long generation is parked mid-way
        short = Background(lambda: run("short", short_body))
        wait_for(lambda: srv.health()["waiting"] == 1)
        gate.open()
        short.result()
        long.result()
    finally:
        gate.open()
        srv.stop()
    assert order.index("short first token") < order.index("long done"), order
    assert order.index("short done") < order.index("long done"), order


# --- prompt cache across requests -------------------------------------------------------------


def _chat_turns(srv: ServerThread, model: str, lm) -> list[tuple[object, int]]:
    """Two chat turns, the second resending the first; (response, forward tokens it ran) each."""
    c = client_for(srv)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something"}]
    out = []
    for turn in range(2):
        before = lm.model.forward_tokens
        reply = c.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
        out.append((reply, lm.model.forward_tokens - before))
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": f"And now something else {turn}"},
        ]
    return out


def test_a_follow_up_chat_turn_prefills_only_its_new_tokens(lm, ckpt_h: Path) -> None:
    srv = ServerThread(lm).start()
    try:
        (first, _), (second, ran) = _chat_turns(srv, ckpt_h.name, lm)
        metrics = srv.metrics()
    finally:
        srv.stop()
    first_prompt = first.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first_prompt  # the whole first turn (and some of its reply) was reused
    new = second.usage.prompt_tokens - cached
    generated = second.usage.completion_tokens
    # forward tokens: the new prompt tokens, then one per generated token but the first (+1 if EOS)
    assert ran in (new + generated - 1, new + generated), (ran, new, generated)
    assert metrics["gpt2_prompt_cache_hits_total"] >= 1
    assert metrics["gpt2_prompt_cache_hit_tokens_total"] >= cached
    # reuse changes nothing in the answer: the same reply as the library's, from scratch
    template = pick_template(ckpt_h.name)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say something"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And now something else 0"},
    ]
    want = greedy(lm, template.render(messages), 6, stop=template.stop).strip()
    assert second.choices[0].message.content == want


def test_cache_tokens_zero_turns_the_cache_off(lm, ckpt_h: Path) -> None:
    srv = ServerThread(lm, cache_tokens=0).start()
    try:
        _, (second, ran) = _chat_turns(srv, ckpt_h.name, lm)
    finally:
        srv.stop()
    assert second.usage.prompt_tokens_details.cached_tokens == 0
    generated = second.usage.completion_tokens
    assert ran in (second.usage.prompt_tokens + generated - 1, second.usage.prompt_tokens + generated)


def test_the_cache_evicts_the_least_recently_used_sequence(lm, ckpt_h: Path) -> None:
    """A budget for one 30-token sequence and a bit: B's arrival evicts A."""
    a, b = [464 + i for i in range(30)], [1000 + 3 * i for i in range(30)]
    srv = ServerThread(lm, cache_tokens=50).start()
    c = client_for(srv)

    def cached(prompt: list[int]) -> int:
        out = c.completions.create(model=ckpt_h.name, prompt=prompt, max_tokens=3, temperature=0)
        return out.usage.prompt_tokens_details.cached_tokens

    try:
        assert cached(a) == 0
        assert cached(a + [11]) == 30  # A is cached ...
        assert cached(b) == 0  # ... until B takes its place
        assert cached(a + [12]) == 0
        assert cached(a + [13]) >= 30  # the A just run is cached again
    finally:
        srv.stop()


def test_requests_borrowing_a_cache_entry_leave_it_unchanged(lm, ckpt_h: Path) -> None:
    """An entry for x+y; four requests for x+z_k borrow it at once (and save their own);
    then x+y+w reuses all of x+y from it: every reply is the serial one."""
    x, y = [464 + 5 * i for i in range(30)], [1500 + i for i in range(10)]
    borrowers = [x + [2000 + k, 3000 + k] for k in range(4)]
    last = x + y + [50, 51]
    expected = [greedy(lm, p, 8) for p in [*borrowers, last]]
    srv = ServerThread(lm, max_batch=8).start()
    gate = EngineGate(srv.scheduler)
    c = client_for(srv)

    def ask(prompt: list[int]):
        return c.completions.create(model=ckpt_h.name, prompt=prompt, max_tokens=8, temperature=0)

    try:
        ask(x + y)  # the entry
        answers = together(srv, gate, [lambda p=p: ask(p) for p in borrowers])
        answers.append(ask(last))
    finally:
        gate.open()
        srv.stop()
    texts = [out.choices[0].text for out in answers]
    cached = [out.usage.prompt_tokens_details.cached_tokens for out in answers]
    assert texts == expected
    assert all(n >= 30 for n in cached[:4]) and cached[4] >= 40, cached


# --- isolation ----------------------------------------------------------------------------------


BAD_VALUES = [
    ({"seed": 2**64}, "seed"),
    ({"seed": -2}, "seed"),
    ({"temperature": 1e-300}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"top_p": 0.0}, "top_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"prompt": json.loads("[" * 80 + "]" * 80)}, "prompt"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
]


def test_each_bad_value_is_a_400_naming_its_field(ckpt_h: Path, lm_h) -> None:
    srv = ServerThread(lm_h).start()
    ok = {"model": ckpt_h.name, "prompt": "hi", "max_tokens": 2}
    try:
        for extra, param in BAD_VALUES:
            content = json.dumps({**ok, **extra})  # NaN and Infinity as Python writes them
            r = httpx.post(srv.url + "/v1/completions", content=content, timeout=60)
            assert r.status_code == 400, (extra, r.text)
            assert r.json()["error"]["param"] == param, (extra, r.text)
        deep = httpx.post(srv.url + "/v1/completions", content="[" * 100_000, timeout=60)
        assert deep.status_code == 400 and "deeper than" in deep.json()["error"]["message"]
        chat = {"model": ckpt_h.name, "messages": [{"role": "user", "content": "hi"}], "seed": 2**70}
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
        # the largest seed and the smallest temperature are fine
        for seed in (2**64 - 1, -1):  # -1: a random seed, as in `gpt2 generate --seed -1`
            good = {**ok, "seed": seed, "temperature": 1e-3}
            assert httpx.post(srv.url + "/v1/completions", json=good, timeout=60).status_code == 200
    finally:
        srv.stop()
    assert not any("internal error" in line for line in srv.lines)


FAIL_SEED = 666  # requests with this seed get a sampler that fails on its third call (the test hook)


@pytest.fixture
def failing_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpt2cli.engine

    real = gpt2cli.engine.make_sampler

    def make_sampler(cfg):
        sampler = real(cfg)
        if cfg.seed != FAIL_SEED:
            return sampler
        calls = [0]

        def failing(logits, previous, generator):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
            return sampler(logits, previous, generator)

        return failing

    monkeypatch.setattr(gpt2cli.engine, "make_sampler", make_sampler)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_failing_in_the_engine_fails_alone(
    failing_sampler, stream: bool, lm_long, ckpt_long: Path
) -> None:
    model = ckpt_long.name
    good = {"model": model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    bad = {"model": model, "prompt": "Hello there", "max_tokens": 12, "seed": FAIL_SEED, "stream": stream}
    alone = lm_long.complete("Once upon a time", max_new_tokens=12, temperature=0)
    srv = ServerThread(lm_long).start()
    gate = EngineGate(srv.scheduler)

    def post(body: dict) -> httpx.Response:
        return httpx.post(srv.url + "/v1/completions", json=body, timeout=300)

    try:
        good_answer, bad_answer = together(srv, gate, [lambda: post(good), lambda: post(bad)])
        metrics = srv.metrics()
    finally:
        gate.open()
        srv.stop()
    answers = {"good": good_answer, "bad": bad_answer}
    assert metrics["gpt2_batched_steps_total"] > 0  # they did share the engine's steps
    assert answers["good"].status_code == 200
    choice = answers["good"].json()["choices"][0]
    assert choice["text"] == alone.samples[0].text and choice["finish_reason"] == "length"
    if stream:
        assert answers["bad"].status_code == 200  # the status line went out with the stream
        lines = [line for line in answers["bad"].text.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
    else:
        assert answers["bad"].status_code == 500
        error = answers["bad"].json()["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert any("request failed in the engine: RuntimeError" in line for line in srv.lines)


def test_more_prompts_than_the_queue_holds_is_a_400(served_h: ServerThread, ckpt_h: Path) -> None:
    c = client_for(served_h)
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=ckpt_h.name, prompt=["hi"] * 65, max_tokens=1)
    assert err.value.body["param"] == "prompt" and err.value.body["code"] == "too_many_prompts"
    out = c.completions.create(model=ckpt_h.name, prompt=["hi"] * 64, max_tokens=1)
    assert len(out.choices) == 64


@pytest.fixture(scope="module")
def served_h(ckpt_h: Path):
    srv = ServerThread(load(str(ckpt_h), device="cpu")).start()
    yield srv
    srv.stop()


# --- HTTP timeouts and slow readers -----------------------------------------------------------


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_partial_headers_and_a_short_body_get_408_and_close(lm_h, ckpt_h: Path) -> None:
    srv = ServerThread(lm_h, timeouts=Timeouts(header=2, body=2)).start()
    try:
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=120)
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")  # and nothing more
        idle = socket.create_connection(("127.0.0.1", srv.port), timeout=120)  # sends nothing at all
        short = socket.create_connection(("127.0.0.1", srv.port), timeout=120)
        short.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model":')
        for sock in (slow, idle, short):
            answer = _read_all(sock)  # returns when the server closes the connection
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b'"code": "request_timeout"' in answer
            sock.close()
        # the server goes on serving
        ok = {"model": ckpt_h.name, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/completions", json=ok, timeout=60).status_code == 200
    finally:
        srv.stop()
    assert sum("request headers did not arrive" in line for line in srv.lines) == 2
    assert sum("request body did not arrive" in line for line in srv.lines) == 1
    assert any('"POST /v1/completions" 499' in line for line in srv.lines)  # the short body's


def test_a_client_that_reads_nothing_is_dropped(lm_long, ckpt_long: Path) -> None:
    srv = ServerThread(lm_long, timeouts=Timeouts(write=0.5)).start()
    body = {"model": ckpt_long.name, "prompt": [50256], "max_tokens": 1000, "n": 4, "stream": True}
    body |= {"logprobs": 5, "seed": 1, "temperature": 1.0}
    data = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills up fast
    sock.connect(("127.0.0.1", srv.port))
    try:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
        sock.sendall(head.encode() + data)  # then never read
        wait_for(lambda: any("read nothing of its response" in line for line in srv.lines))
        wait_for(lambda: srv.health()["running"] == 0)
        wait_for(lambda: any('"POST /v1/completions" 499' in line for line in srv.lines))
    finally:
        sock.close()
        srv.stop()


# --- /metrics -----------------------------------------------------------------------------------


def test_metrics_are_prometheus_text(served_h: ServerThread, ckpt_h: Path) -> None:
    c = client_for(served_h)
    before = served_h.metrics()
    out = c.completions.create(model=ckpt_h.name, prompt="Hello", max_tokens=5, temperature=0)
    r = httpx.get(served_h.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = r.text.splitlines()
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for name in (
        "gpt2_requests_total",
        "gpt2_queue_waiting",
        "gpt2_active_rows",
        "gpt2_prompt_tokens_total",
        "gpt2_generation_tokens_total",
        "gpt2_prompt_tokens_per_second",
        "gpt2_generation_tokens_per_second",
        "gpt2_prompt_cache_hits_total",
        "gpt2_time_to_first_token_seconds",
        "gpt2_time_per_output_token_seconds",
    ):
        assert name in families, name
    after = served_h.metrics()
    gen = "gpt2_generation_tokens_total"
    assert after[gen] - before.get(gen, 0) == out.usage.completion_tokens
    assert after["gpt2_prompt_tokens_total"] - before.get("gpt2_prompt_tokens_total", 0) == 1
    assert after["gpt2_generation_tokens_per_second"] > 0
    # histograms: cumulative buckets ending at +Inf == count; one TTFT and 4 gaps per request
    ttft = [v for k, v in after.items() if k.startswith("gpt2_time_to_first_token_seconds_bucket")]
    assert ttft == sorted(ttft) and ttft[-1] == after["gpt2_time_to_first_token_seconds_count"]
    gaps = "gpt2_time_per_output_token_seconds_count"
    assert after[gaps] - before.get(gaps, 0) == out.usage.completion_tokens - 1
