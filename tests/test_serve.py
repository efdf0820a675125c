"""`gpt2 serve` against a real server on 127.0.0.1, with the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import fastapi  # noqa: F401  (the test extra: never a silent skip)
import httpx
import openai
import pytest
import torch
import uvicorn  # noqa: F401
from checkpoints import make_checkpoint  # noqa: E402
from cliutil import GPT2_BIN, assert_one_line_error, run_inprocess  # noqa: E402
from serverutil import Background, EngineGate, ServerThread, free_port, wait_for  # noqa: E402

from gpt2cli import load  # noqa: E402
from gpt2cli.chat import pick_template  # noqa: E402
from gpt2cli.config import GenerationConfig  # noqa: E402
from gpt2cli.logprobs import sequence_logprobs  # noqa: E402
from gpt2cli.server.batch import Done, Failed, Job, Piece  # noqa: E402
from gpt2cli.server.scheduler import Scheduler  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):", "Hello, my name"]


@pytest.fixture(scope="module")
def served(ckpt_h: Path):
    srv = ServerThread(load(str(ckpt_h), device="cpu")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model_id(ckpt_h: Path) -> str:
    return ckpt_h.name  # a local directory is served under its name


@pytest.fixture
def client(served: ServerThread):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(lm, prompt, n: int, **options) -> str:
    return lm.complete(prompt, max_new_tokens=n, temperature=0, **options).samples[0].text


# --- happy paths ------------------------------------------------------------------------------


def test_models_and_health(served: ServerThread, client, model_id: str, ckpt_h: Path) -> None:
    assert [m.id for m in client.models.list().data] == [model_id]
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == model_id
    # the path as typed to -m still names it
    out = client.completions.create(model=str(ckpt_h), prompt="hi", max_tokens=1)
    assert out.model == str(ckpt_h)


def test_completion_equals_the_library(client, model_id: str, lm_h) -> None:
    out = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert out.choices[0].text == greedy(lm_h, PROMPTS[0], 6)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(lm_h.encode(PROMPTS[0]))
    assert out.usage.completion_tokens == 6


def test_stream_equals_whole(client, model_id: str) -> None:
    args = {"model": model_id, "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, logprobs=1, **args)]
    tokens = [t for lp in streamed if lp for t in lp.tokens]
    offsets = [o for lp in streamed if lp for o in lp.text_offset]
    assert "".join(tokens) == whole
    assert offsets == [len(PROMPTS[1]) + len("".join(tokens[:k])) for k in range(len(tokens))]


def test_n_samples_with_seed_are_reproducible_and_match_the_library(client, model_id: str, lm_h) -> None:
    args = {"model": model_id, "prompt": PROMPTS[2], "max_tokens": 5, "n": 3, "seed": 7, "temperature": 1.0}
    first = [c.text for c in client.completions.create(**args).choices]
    again = [c.text for c in client.completions.create(**args).choices]
    assert len(first) == 3 and first == again
    lib = lm_h.complete(
        PROMPTS[2], max_new_tokens=5, num_samples=3, seed=7, temperature=1.0, top_k=0, top_p=1.0
    )
    assert first == [s.text for s in lib.samples]


def test_stop_string_cuts_the_text(client, model_id: str, lm_h) -> None:
    text = greedy(lm_h, PROMPTS[0], 10)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = client.completions.create(
        model=model_id, prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[stop]
    )
    assert out.choices[0].text == text[: text.find(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_logprobs_equal_transformers_log_softmax(client, model_id: str, ckpt_h: Path, lm_h) -> None:
    transformers = pytest.importorskip("transformers")
    prompt = lm_h.encode(PROMPTS[3])
    out = client.completions.create(
        model=model_id, prompt=prompt, max_tokens=5, temperature=0, logprobs=5, echo=True
    )
    lp = out.choices[0].logprobs
    generated = lm_h.complete(prompt, max_new_tokens=5, temperature=0).samples[0].token_ids
    ids = prompt + generated
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(ckpt_h), dtype=torch.float32).eval()
    with torch.no_grad():
        logsm = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)  # (T, V)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(logsm[t - 1, ids[t]].item(), abs=1e-4)
        top = sorted(lp.top_logprobs[t].values(), reverse=True)[:5]  # (+ the chosen token, if not in them)
        want = logsm[t - 1].topk(5).values.tolist()
        assert top == pytest.approx(want[: len(top)], abs=1e-4) and len(top) >= 1
        assert lp.tokens[t] in lp.top_logprobs[t]
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0


def test_echo_with_zero_max_tokens_scores_the_prompt(client, model_id: str, lm_h) -> None:
    ids = [lm_h.tokenizer.eot_id, *lm_h.encode(PROMPTS[1])]
    out = client.completions.create(
        model=model_id, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = out.choices[0]
    assert choice.text == lm_h.tokenizer.decode(ids)
    want = [e.logprob for e in sequence_logprobs(lm_h.model, ids)]
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-5)
    assert out.usage.completion_tokens == 0


def test_token_id_and_list_prompts(client, model_id: str, lm_h) -> None:
    ids = [lm_h.encode(p) for p in PROMPTS[:2]]
    out = client.completions.create(model=model_id, prompt=ids, max_tokens=4, temperature=0)
    assert [c.text for c in out.choices] == [greedy(lm_h, i, 4) for i in ids]
    out = client.completions.create(model=model_id, prompt=PROMPTS[:2], max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [greedy(lm_h, p, 4) for p in PROMPTS[:2]]


def test_chat_uses_the_repl_template(client, model_id: str, lm_h) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    out = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
    template = pick_template(model_id)
    want = greedy(lm_h, template.render(messages), 8, stop=template.stop).strip()
    assert out.choices[0].message.content == want
    assert out.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_dialogpt_models_get_their_template(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "DialoGPT-tiny", seed=5)
    lm = load(str(path), device="cpu")
    srv = ServerThread(lm).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        messages = [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": "How are you?"},
        ]
        out = client.chat.completions.create(model=str(path), messages=messages, max_tokens=6, temperature=0)
    finally:
        srv.stop()
    template = pick_template(str(path))
    assert template.kind == "dialogpt"
    prompt = "Hello there<|endoftext|>Hi<|endoftext|>How are you?<|endoftext|>"
    assert template.render(messages) == prompt
    assert out.choices[0].message.content == greedy(lm, prompt, 6).strip()


# --- batching and load ------------------------------------------------------------------------


def run_jobs(lm, specs, max_batch: int = 8) -> list[list]:
    """Jobs (prompt ids, config, logprobs) submitted together to a real scheduler; each job's events."""
    results: list[list] = [[] for _ in specs]
    ended = [threading.Event() for _ in specs]

    def emitter(i):
        def emit(event):
            results[i].append(event)
            if isinstance(event, Done | Failed):
                ended[i].set()

        return emit

    jobs = [
        Job(p, c, emitter(i), logprobs=lp, eos_id=lm.tokenizer.eot_id) for i, (p, c, lp) in enumerate(specs)
    ]
    scheduler = Scheduler(lm, max_batch=max_batch)
    scheduler.submit(jobs)  # all waiting before the engine thread starts: they join together
    scheduler.start()
    for event in ended:
        assert event.wait(300)
    scheduler.close()
    return results


def test_a_batch_gives_each_job_what_it_gets_alone(lm_h) -> None:
    """Jobs run together (same prompt length, different settings) equal the same jobs run alone."""
    prompt_a, prompt_b = lm_h.encode("one two three"), lm_h.encode("four five six")
    assert len(prompt_a) == len(prompt_b)
    cfgs = [
        GenerationConfig(max_new_tokens=6, temperature=0),
        GenerationConfig(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0, seed=3, num_samples=2),
        GenerationConfig(max_new_tokens=8, temperature=0.7, top_k=20, seed=5, repetition_penalty=1.3),
    ]

    def run(jobs_spec):
        return run_jobs(lm_h, [(p, c, 2) for p, c in jobs_spec])

    spec = [(prompt_a, cfgs[0]), (prompt_b, cfgs[1]), (prompt_a, cfgs[2])]
    together = run(spec)
    alone = [run([s])[0] for s in spec]
    for got, want in zip(together, alone, strict=True):
        assert [e.samples for e in got if isinstance(e, Done)] == [
            e.samples for e in want if isinstance(e, Done)
        ]
        lp_got = [x for e in got if isinstance(e, Piece) for x in e.logprobs]
        lp_want = [x for e in want if isinstance(e, Piece) for x in e.logprobs]
        assert [x.token for x in lp_got] == [x.token for x in lp_want]
        assert [x.logprob for x in lp_got] == pytest.approx([x.logprob for x in lp_want], abs=1e-4)


def test_concurrent_clients_get_the_serial_answers(served: ServerThread, model_id: str, lm_h) -> None:
    expected = {p: greedy(lm_h, p, 4) for p in PROMPTS}
    errors: list[str] = []

    def client_loop(k: int) -> None:
        c = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=300)
        for r in range(10):
            prompt = PROMPTS[(k + r) % len(PROMPTS)]
            try:
                out = c.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0)
                if out.choices[0].text != expected[prompt]:
                    errors.append(f"{prompt!r}: {out.choices[0].text!r} != {expected[prompt]!r}")
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert served.health()["waiting"] == 0


# --- bad requests -----------------------------------------------------------------------------


def _post(served: ServerThread, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(served.url + path, content=content, timeout=60, **kwargs)


def _bad_cases(model: str) -> list[tuple[str, object, int, str | None, str | None]]:
    """(path, body, status, param, code)."""
    c = "/v1/completions"
    ok = {"model": model, "prompt": "hi", "max_tokens": 2}
    return [
        (c, b"{not json", 400, None, "invalid_json"),
        (c, [1, 2], 400, None, "invalid_type"),
        (c, {"model": model}, 400, "prompt", "missing_field"),
        (c, {"prompt": "hi"}, 400, "model", "missing_field"),
        (c, {**ok, "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
        (c, {**ok, "temperature": "hot"}, 400, "temperature", "invalid_value"),
        (c, {**ok, "stream": "yes"}, 400, "stream", "invalid_value"),
        (c, {**ok, "max_tokens": 1000}, 400, "max_tokens", "context_length_exceeded"),
        (c, {**ok, "prompt": [1] * 200}, 400, "prompt", "context_length_exceeded"),
        (c, {**ok, "max_tokens": 0}, 400, "max_tokens", None),
        (c, {**ok, "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
        (c, {**ok, "n": 0}, 400, "n", "invalid_value"),
        (c, {**ok, "n": 1000}, 400, "n", "invalid_value"),
        (c, {**ok, "logprobs": 21}, 400, "logprobs", "invalid_value"),
        (c, {**ok, "prompt": [99999999]}, 400, "prompt", None),
        (c, {**ok, "stop": [""]}, 400, "stop", None),
        (c, {**ok, "model": "gpt-4"}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"model": model, "messages": []}, 400, "messages", "invalid_value"),
        (
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "x", "content": "a"}]},
            400,
            None,
            None,
        ),
        ("/v1/nothing", {}, 404, None, "not_found"),
    ]


def test_each_bad_request_gets_an_openai_error(served: ServerThread, model_id: str) -> None:
    for path, body, status, param, code in _bad_cases(model_id):
        r = _post(served, path, body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, r.text
        assert error["message"] and "Traceback" not in r.text
        if param is not None:
            assert error["param"] == param, (body, error)
        if code is not None:
            assert error["code"] == code, (body, error)
    assert any('"POST /v1/completions" 400' in line for line in served.lines)


def test_body_over_the_limit_gets_413(served: ServerThread, model_id: str) -> None:
    r = _post(served, "/v1/completions", {"model": model_id, "prompt": "x" * (5 * 1024 * 1024)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_openai_client_sees_typed_errors(client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=client.models.list().data[0].id, prompt="hi", max_tokens=2, logprobs=50
        )


def test_api_key(ckpt_h: Path, lm_h) -> None:
    srv = ServerThread(lm_h, api_key="sekret").start()
    try:
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        assert good.completions.create(model=str(ckpt_h), prompt="hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()


# --- a busy engine: full queue, disconnects, SIGTERM ------------------------------------------


@pytest.fixture(scope="module")
def ckpt_long(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a 1024-token window, so one request can keep the engine busy for a while."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_long"), n_positions=1024, n_embd=64, seed=4)


LONG = {"prompt": [50256], "max_tokens": 1000, "n": 4, "temperature": 1.0, "seed": 1, "stream": True}


def test_full_queue_503_and_a_disconnect_frees_its_slot(ckpt_long: Path) -> None:
    srv = ServerThread(load(str(ckpt_long), device="cpu"), max_queue=1, max_batch=1).start()
    gate = EngineGate(srv.scheduler)
    model = ckpt_long.name
    try:
        with httpx.Client(timeout=120) as http:
            with http.stream("POST", srv.url + "/v1/completions", json={"model": model, **LONG}) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")  # the engine is now busy with it
                gate.close()
                assert gate.held.wait(60)  # ... and parked between two of its steps
                small = {"model": model, "prompt": "hi", "max_tokens": 2}
                waiting = Background(lambda: httpx.post(srv.url + "/v1/completions", json=small, timeout=120))
                wait_for(lambda: srv.health()["waiting"] == 1)
                full = httpx.post(srv.url + "/v1/completions", json=small, timeout=60)
                assert full.status_code == 503
                assert full.headers["retry-after"] == "1"
                assert full.json()["error"]["code"] == "queue_full"
            # leaving the block closed the stream mid-generation
            gate.open()
        assert waiting.result().status_code == 200
        wait_for(lambda: srv.health()["running"] == 0)
        health = srv.health()
        assert health["cancelled"] == 1 and health["waiting"] == 0
        # the stream's 200 status line was sent, but its client left: logged as 499
        wait_for(lambda: sum('"POST /v1/completions" 499' in line for line in srv.lines) == 1)
    finally:
        gate.open()
        srv.stop()


def _raw_request(port: int, body: dict) -> socket.socket:
    """A POST /v1/completions sent on a raw socket (so the test decides when the client leaves)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_waiting_client_that_leaves_cancels_its_job(ckpt_long: Path) -> None:
    srv = ServerThread(load(str(ckpt_long), device="cpu")).start()
    gate = EngineGate(srv.scheduler)
    try:
        sock = _raw_request(srv.port, {"model": ckpt_long.name, **LONG, "n": 8, "stream": False})
        wait_for(lambda: srv.health()["running"] == 1)  # the engine is generating for it
        gate.close()
        assert gate.held.wait(60)  # and cannot finish while the client leaves
        sock.close()
        wait_for(lambda: srv.health()["cancelled"] == 1)
        gate.open()
        wait_for(lambda: srv.health()["running"] == 0)
        assert srv.health()["completed"] == 0, (srv.health(), srv.lines)
        wait_for(lambda: any('"POST /v1/completions" 499' in line for line in srv.lines))
    finally:
        gate.open()
        srv.stop()


def test_shutdown_fails_queued_and_running_requests_with_shutting_down(ckpt_long: Path) -> None:
    """What SIGTERM does (``begin_close``): no finish_reason is invented for a cut stream."""
    srv = ServerThread(load(str(ckpt_long), device="cpu"), max_batch=1).start()
    gate = EngineGate(srv.scheduler)
    model = ckpt_long.name
    try:
        with httpx.stream(
            "POST", srv.url + "/v1/completions", json={"model": model, **LONG, "n": 1}, timeout=120
        ) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            gate.close()
            assert gate.held.wait(60)
            small = {"model": model, "prompt": "hi", "max_tokens": 2}
            queued = Background(lambda: httpx.post(srv.url + "/v1/completions", json=small, timeout=120))
            wait_for(lambda: srv.health()["waiting"] == 1)
            srv.scheduler.begin_close()
            gate.open()
            rest = [line for line in lines if line]
        assert queued.result().status_code == 503
        assert queued.result().json()["error"]["code"] == "shutting_down"
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "server_error"
        reasons = [c["finish_reason"] for line in rest[:-2] for c in json.loads(line[6:])["choices"]]
        assert set(reasons) <= {None}  # no "length": the generation did not reach max_tokens
    finally:
        gate.open()
        srv.stop()


def test_sigterm_ends_streams_cleanly_and_exits_0(ckpt_long: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [str(GPT2_BIN), "serve", "-m", str(ckpt_long), "--port", str(port), "--device", "cpu"]
        + ["--served-model-name", "long-one", "--served-model-name", "l1", "--cache-tokens", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1", "PYTHONFAULTHANDLER": "1"},  # SIGABRT: every thread's stack
    )
    url = f"http://127.0.0.1:{port}"
    hung = False
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["long-one", "l1"]
        received: list[str] = []
        try:
            with httpx.stream(
                "POST", url + "/v1/completions", json={"model": str(ckpt_long), **LONG}, timeout=120
            ) as r:
                for line in r.iter_lines():
                    if line:
                        received.append(line)
                    if len(received) == 1:
                        proc.send_signal(signal.SIGTERM)
        except httpx.TimeoutException:
            hung = True
            proc.send_signal(signal.SIGABRT)  # the faulthandler writes where each thread stands
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, err_bytes = proc.communicate()  # reads and closes both pipes
    err = err_bytes.decode()
    assert not hung, f"nothing streamed for 120 s after SIGTERM ({len(received)} lines); the server:\n{err}"
    assert code == 0, err
    assert received[-1] == "data: [DONE]"
    assert json.loads(received[-2][6:])["error"]["code"] == "shutting_down"
    reasons = [c["finish_reason"] for line in received[:-2] for c in json.loads(line[6:])["choices"]]
    assert "length" not in reasons
    assert "Traceback" not in err and "stopped" in err


# --- the command line -------------------------------------------------------------------------


def test_missing_extra_names_it(ckpt_h: Path, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    result = run_inprocess(["serve", "-m", str(ckpt_h)], capsys, monkeypatch)
    assert_one_line_error(result, 1, "fastapi", "pip install 'gpt2cli[serve]'")


def test_port_in_use_is_one_line(ckpt_h: Path, capsys, monkeypatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_inprocess(["serve", "-m", str(ckpt_h), "--port", str(port)], capsys, monkeypatch)
    assert_one_line_error(result, 1, "cannot listen")


def test_empty_api_key_is_a_usage_error(ckpt_h: Path, capsys, monkeypatch) -> None:
    result = run_inprocess(["serve", "-m", str(ckpt_h), "--api-key", " "], capsys, monkeypatch)
    assert_one_line_error(result, 2, "API key")


def test_empty_served_model_name_is_a_usage_error(ckpt_h: Path, capsys, monkeypatch) -> None:
    result = run_inprocess(["serve", "-m", str(ckpt_h), "--served-model-name", ""], capsys, monkeypatch)
    assert_one_line_error(result, 2, "served model name")
