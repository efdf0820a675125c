"""`gpt2 serve`'s OpenAI protocol where real clients (the official `openai` client, `llm`,
LangChain, lm-eval) need it: usage in streams, message shapes, model names, auth, 405s, empty
prompts, logprobs cut by a stop string, /tokenize and /detokenize, the chat token default."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from serverutil import ServerThread

from gpt2cli import load
from gpt2cli.chat import pick_template
from gpt2cli.hub import parse_spec
from gpt2cli.server.app import model_names


@pytest.fixture(scope="module")
def served(ckpt_h: Path):
    srv = ServerThread(load(str(ckpt_h), device="cpu"), served_model_names=["my-gpt", "other-name"]).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(served: ServerThread):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


MODEL = "my-gpt"


def greedy(lm, prompt, n: int, **options) -> str:
    return lm.complete(prompt, max_new_tokens=n, temperature=0, **options).samples[0].text


def test_include_usage_adds_a_last_chunk_with_the_usage(client, lm_h) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    prompt = lm_h.encode(pick_template(MODEL).render(messages))
    assert last.usage.prompt_tokens == len(prompt)
    assert last.usage.completion_tokens >= 1
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    plain = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, stream=True))
    assert all(getattr(c, "usage", None) is None for c in plain) and all(c.choices for c in plain)
    with_usage = list(
        client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 3


def test_developer_role_and_text_parts_read_as_system_and_text(client) -> None:
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]},
    ]
    want = client.chat.completions.create(model=MODEL, messages=plain, max_tokens=6, temperature=0)
    got = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=6, temperature=0)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [image]}], max_tokens=2
        )
    assert err.value.body["param"] == "messages.0.content.0"


def test_models_retrieve_and_every_name_of_the_model(client, ckpt_h: Path) -> None:
    assert [m.id for m in client.models.list().data] == ["my-gpt", "other-name"]
    for name in ("my-gpt", "other-name", ckpt_h.name, str(ckpt_h)):
        assert client.models.retrieve(name).id == name
        out = client.completions.create(model=name, prompt="hi", max_tokens=1)
        assert out.model == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)


def test_an_alias_and_its_repository_name_each_other() -> None:
    def names(spec: str, served=()):
        lm = SimpleNamespace(resolved=SimpleNamespace(spec=parse_spec(spec)))
        return model_names(lm, served)  # type: ignore[arg-type]

    by_repo = names("openai-community/gpt2")
    assert by_repo.listed == ["openai-community/gpt2"] and "gpt2" in by_repo.accepted  # lm-eval's tiktoken
    by_alias = names("gpt2")
    assert by_alias.listed == ["gpt2", "openai-community/gpt2"]
    pinned = names("openai-community/gpt2@main", served=["g"])
    assert pinned.listed == ["g"]
    assert {"openai-community/gpt2@main", "openai-community/gpt2", "gpt2"} <= pinned.accepted


def test_405_names_the_allowed_methods(served: ServerThread) -> None:
    r = httpx.post(served.url + "/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(served.url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_the_bearer_scheme_is_case_insensitive(lm_h) -> None:
    srv = ServerThread(lm_h, api_key="sekret").start()
    try:
        for header, status in (
            ("Bearer sekret", 200),
            ("bearer sekret", 200),
            ("BEARER  sekret", 200),
            ("Basic sekret", 401),
            ("bearer wrong", 401),
            ("sekret", 401),
        ):
            r = httpx.get(srv.url + "/v1/models", headers={"Authorization": header})
            assert r.status_code == status, header
        assert httpx.get(srv.url + "/metrics").status_code == 401
    finally:
        srv.stop()


def test_an_empty_prompt_means_endoftext_in_every_form(client, lm_h) -> None:
    want = greedy(lm_h, [lm_h.tokenizer.eot_id], 5)
    for prompt in ("", [], [""], [[]]):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
        assert out.choices[0].text == want, prompt
        assert out.usage.prompt_tokens == 1


def _greedy_args(prompt: str, max_tokens: int, **more: object) -> dict[str, object]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **more}


def _greedy_token_texts(lm, prompt: str, n: int) -> list[str]:
    ids = lm.complete(prompt, max_new_tokens=n, temperature=0).samples[0].token_ids
    return [lm.tokenizer.decode([t]) for t in ids]


def _inside_token_stop(lm, prompt: str, n: int) -> tuple[str, str]:
    """A stop string that starts inside a generated token (not at its start): (stop, text before it)."""
    texts = _greedy_token_texts(lm, prompt, n)
    full = "".join(texts)
    start = 0
    for text in texts:
        if len(text) >= 2 and text.isprintable():
            stop = text[1:]
            if full.find(stop) == start + 1:
                return stop, full[: start + 1]
        start += len(text)
    raise AssertionError(f"no token to cut in {texts}")


def _stop_across_tokens(lm, prompt: str, n: int) -> tuple[str, str]:
    """A stop string from the last character of a generated token into the next token: the
    text before it is sent while the end of that token is held back (stop, text before it)."""
    texts = _greedy_token_texts(lm, prompt, n)
    full, start = "".join(texts), 0
    for this, following in zip(texts, texts[1:], strict=False):
        start += len(this)
        stop = this[-1:] + following
        if len(this) >= 2 and (this + following).isprintable() and full.find(stop) == start - 1:
            return stop, full[: start - 1]
    raise AssertionError(f"no pair of tokens to cut across in {texts}")


@pytest.mark.parametrize("find_stop", [_inside_token_stop, _stop_across_tokens])
def test_logprobs_end_where_a_stop_string_cuts_the_text(client, lm_h, find_stop) -> None:
    """One-shot and streamed, chunk by chunk: the tokens span the text sent, never more."""
    prompt = "The meaning of life is"
    stop, text = find_stop(lm_h, prompt, 12)
    args = _greedy_args(prompt, 12, stop=[stop], logprobs=1)
    whole = client.completions.create(**args).choices[0]
    assert whole.text == text and whole.finish_reason == "stop" and "".join(whole.logprobs.tokens) == text
    assert len(whole.logprobs.tokens) == len(whole.logprobs.token_logprobs) == len(whole.logprobs.text_offset)
    sent, tokens, offsets = "", [], []
    for chunk in client.completions.create(stream=True, **args):
        choice = chunk.choices[0]
        sent += choice.text
        if choice.logprobs:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
        assert len("".join(tokens)) <= len(sent)  # never a token whose text was not sent yet
    assert sent == "".join(tokens) == text
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert offsets == [len(prompt) + len("".join(tokens[:k])) for k in range(len(tokens))]


def test_a_stream_with_echo_sends_the_prompts_logprobs_first(client) -> None:
    args = {
        "model": MODEL,
        "prompt": "Hello there",
        "max_tokens": 4,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
    }
    whole = client.completions.create(**args).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **args)]
    assert chunks[0].text == "Hello there"
    assert (
        "".join(chunks[0].logprobs.tokens) == "Hello there" and chunks[0].logprobs.token_logprobs[0] is None
    )
    streamed = {
        key: [x for c in chunks if c.logprobs for x in getattr(c.logprobs, key)]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    }
    assert streamed["tokens"] == whole.tokens and streamed["text_offset"] == whole.text_offset
    # the second request reuses the first one's cached prompt: the same numbers within rounding
    assert streamed["token_logprobs"][0] is None
    assert streamed["token_logprobs"][1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-4)
    assert [t and set(t) for t in streamed["top_logprobs"]] == [t and set(t) for t in whole.top_logprobs]


def test_echo_without_logprobs_scores_nothing(client, monkeypatch: pytest.MonkeyPatch) -> None:
    import gpt2cli.server.batch as batch_module

    calls = []
    real = batch_module.sequence_logprobs
    monkeypatch.setattr(batch_module, "sequence_logprobs", lambda *a: calls.append(a) or real(*a))
    args = {"model": MODEL, "prompt": "Hello there", "temperature": 0, "echo": True}
    whole = client.completions.create(max_tokens=3, **args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(max_tokens=3, stream=True, **args)]
    assert whole.text.startswith("Hello there") and whole.logprobs is None
    assert chunks[0].text == "Hello there" and "".join(c.text for c in chunks) == whole.text
    bare = client.completions.create(max_tokens=0, **args).choices[0]
    assert bare.text == "Hello there" and bare.logprobs is None
    assert calls == []  # the prompt's text is echoed; its log-probabilities are not computed
    client.completions.create(max_tokens=0, logprobs=0, **args)
    assert len(calls) == 1


def test_a_token_that_is_part_of_a_character_is_shown_as_its_bytes(client, lm_h) -> None:
    prompt = "ok 🎉 日本 é!"
    ids = lm_h.encode(prompt)
    raw = [lm_h.tokenizer.token_bytes(t) for t in ids]
    assert any(not _valid_utf8(r) for r in raw)  # the prompt does split a character
    args = {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
    lp = client.completions.create(**args).choices[0].logprobs
    want = [r.decode() if _valid_utf8(r) else "bytes:" + "".join(f"\\x{b:02x}" for b in r) for r in raw]
    assert lp.tokens == want and "\ufffd" not in "".join(lp.tokens)
    # text_offset counts the prompt's characters: a split character counts once
    complete = [len(b"".join(raw[:k]).decode("utf-8", errors="ignore")) for k in range(len(raw))]
    assert lp.text_offset == complete
    assert lp.text_offset[ids.index(lm_h.encode(" 日")[0])] == prompt.index(" 日")


def _valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _last_token_stop(lm, prompt: str, n: int) -> tuple[str, str]:
    """A stop string completed only by the n-th (last allowed) token: (stop, text before it)."""
    full = lm.complete(prompt, max_new_tokens=n, temperature=0, ignore_eos=True).samples[0].text
    for k in range(1, len(full) + 1):  # the shortest end of the text found nowhere before the end
        if full[-k:].strip() and full.find(full[-k:]) == len(full) - k:
            return full[-k:], full[:-k]
    raise AssertionError(f"no stop string to take from {full!r}")


def test_a_stop_string_on_the_last_allowed_token_is_stop_not_length(client, lm_h) -> None:
    prompt, n = "Hello world", 6
    stop, text = _last_token_stop(lm_h, prompt, n)
    result = lm_h.complete(prompt, max_new_tokens=n, temperature=0, ignore_eos=True, stop=[stop]).samples[0]
    assert (result.text, result.finish_reason) == (text, "stop")
    args = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "stop": [stop]}
    out = client.completions.create(**args).choices[0]
    assert (out.text, out.finish_reason) == (text, "stop")
    last = [c.choices[0] for c in client.completions.create(stream=True, **args)][-1]
    assert last.finish_reason == "stop"


def test_the_sampled_token_is_always_among_the_top_logprobs(client) -> None:
    args = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 2, "seed": 3, "logprobs": 1}
    lp = client.completions.create(**args).choices[0].logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == pytest.approx(logprob) and 1 <= len(top) <= 2
        assert max(top.values()) >= logprob  # the best alternative still leads


def test_null_options_mean_their_defaults(served: ServerThread) -> None:
    defaults = {"temperature": 1.0, "top_p": 1.0, "n": 1, "stream": False, "echo": False}
    defaults |= {"presence_penalty": 0.0, "frequency_penalty": 0.0}
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "seed": 1}
    got = httpx.post(served.url + "/v1/completions", json=body | dict.fromkeys(defaults), timeout=120)
    assert got.status_code == 200, got.text
    plain = httpx.post(served.url + "/v1/completions", json=body | defaults, timeout=120)
    assert got.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "logprobs": None,
    }
    assert httpx.post(served.url + "/v1/chat/completions", json=chat, timeout=120).status_code == 200
    wrong = httpx.post(served.url + "/v1/completions", json={**body, "temperature": "hot"}, timeout=120)
    assert wrong.status_code == 400  # null is a default; a wrong type is still an error


def test_tokenize_and_detokenize(served: ServerThread, lm_h) -> None:
    url = served.url
    text = "Hello world, café"
    ids = lm_h.encode(text)
    vllm = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert vllm == {"tokens": ids, "count": len(ids), "max_model_len": lm_h.window}
    llama = httpx.post(url + "/tokenize", json={"content": text, "with_pieces": True}).json()
    assert [t["id"] for t in llama["tokens"]] == ids
    assert [t["piece"] for t in llama["tokens"]] == [lm_h.tokenizer.decode([i]) for i in ids]
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(url + "/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == lm_h.encode(pick_template(MODEL).render(messages))
    back = httpx.post(url + "/detokenize", json={"model": MODEL, "tokens": ids}).json()
    assert back == {"prompt": text, "content": text}
    bad = httpx.post(url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    missing = httpx.post(url + "/tokenize", json={})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    unknown = httpx.post(url + "/tokenize", json={"model": "gpt-4", "prompt": "x"})
    assert unknown.status_code == 404


def test_chat_without_max_tokens_gets_the_default(ckpt_h: Path, lm_h) -> None:
    template = pick_template(ckpt_h.name)
    # a conversation whose greedy reply runs on (no turn marker, no EOS) for 20 tokens
    for k in range(20):
        messages = [{"role": "user", "content": f"Tell me about {k}"}]
        result = lm_h.complete(
            template.render(messages), max_new_tokens=20, temperature=0, stop=template.stop
        )
        if result.samples[0].finish_reason == "length":
            break
    else:
        raise AssertionError("no long-running reply found")
    srv = ServerThread(lm_h, default_max_tokens=7).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        out = c.chat.completions.create(model=ckpt_h.name, messages=messages, temperature=0)
        asked = c.chat.completions.create(model=ckpt_h.name, messages=messages, temperature=0, max_tokens=12)
    finally:
        srv.stop()
    assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"
    assert asked.usage.completion_tokens == 12  # an explicit max_tokens is the client's to set
