"""The REPL's conversation state against the real tiny model: turns as token ids, KV cache reuse
(counted in forward-pass tokens), stop strings, both modes, DialoGPT, the window, slash commands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from checkpoints import make_checkpoint

from gpt2cli import load
from gpt2cli.chat import ENDOFTEXT, ChatTemplate
from gpt2cli.config import GenerationConfig
from gpt2cli.repl.session import COMMANDS, SETTINGS, Session, make_session

GREEDY = GenerationConfig(max_new_tokens=8, temperature=0)


@pytest.fixture
def session(lm_h) -> Session:
    return make_session(lm_h, GREEDY)


@pytest.fixture(scope="module")
def lm_small(tmp_path_factory: pytest.TempPathFactory):
    """A model with a 64-token window, to overflow it in a few turns."""
    return load(str(make_checkpoint(tmp_path_factory.mktemp("small"), n_positions=64, seed=3)), device="cpu")


@pytest.fixture(scope="module")
def lm_dialogpt(tmp_path_factory: pytest.TempPathFactory):
    path = make_checkpoint(tmp_path_factory.mktemp("m") / "DialoGPT-tiny", seed=4)
    return load(str(path), device="cpu")


def reply(session: Session, text: str) -> str:
    return "".join(session.respond(text))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_chat_turns_are_template_text(session: Session, lm_h) -> None:
    shown = reply(session, "Hello there")
    user, bot = session.turns
    assert (user.role, user.content, bot.role) == ("user", "Hello there", "assistant")
    assert user.ids == lm_h.encode("User: Hello there\n")
    assert bot.ids[:2] == lm_h.encode("Assistant:")
    assert bot.ids[-1:] == lm_h.encode("\n")
    assert bot.content == shown.strip()
    text = lm_h.tokenizer.decode(session.context_ids)
    assert text == "User: Hello there\nAssistant:" + shown.rstrip() + "\n"


def test_reply_matches_plain_generation(session: Session, lm_h) -> None:
    """The session's reply is what the library generates from the rendered transcript."""
    shown = reply(session, "Hi")
    expected = lm_h.complete(
        "User: Hi\nAssistant:", max_new_tokens=8, temperature=0, stop=session.template.stop
    ).samples[0]
    assert shown == expected.text


def test_kv_cache_reused_across_turns(session: Session, lm_h) -> None:
    reply(session, "Hello there")
    first_prompt_len = session.context_tokens - len(session.turns[1].ids) + len(lm_h.encode("Assistant:"))
    cached = list(session.cache.ids)
    before = lm_h.model.forward_tokens
    gen = session.respond("How are you today?")
    "".join(gen)
    result = session.last_result
    assert result is not None
    prompt = session.context_ids[: -len(session.turns[-1].ids)] + lm_h.encode("Assistant:")
    reused = common_prefix(cached, prompt)
    assert reused >= first_prompt_len  # the whole first exchange came from the cache
    assert result.stats.prefill_tokens == len(prompt) - reused
    assert result.stats.prefill_tokens < len(prompt) // 2
    # the forward passes of this turn: the new tokens once, then one per generated token
    generated = result.samples[0].tokens
    assert lm_h.model.forward_tokens - before == result.stats.prefill_tokens + generated - 1


@dataclass(frozen=True)
class _StopAt(ChatTemplate):
    """The transcript template with a chosen stop string (the tiny model never writes 'User:')."""

    stop_text: str = ""

    @property
    def stop(self) -> tuple[str, ...]:
        return (self.stop_text,)


def test_stop_string_ends_reply_unshown_and_cache_still_reused(lm_h) -> None:
    free = lm_h.complete("User: Hello\nAssistant:", max_new_tokens=8, temperature=0).samples[0].text
    stop_text = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop_text.strip()
    session = Session(lm_h, GREEDY, _StopAt(stop_text=stop_text))
    shown = reply(session, "Hello")
    assert shown == free[: free.index(stop_text)]
    assert stop_text not in shown
    assert session.last_result is not None and session.last_result.samples[0].finish_reason == "stop"
    assert lm_h.tokenizer.decode(session.turns[1].ids) == "Assistant:" + shown.rstrip() + "\n"
    cached = list(session.cache.ids)
    reply(session, "Go on")
    prompt = session.context_ids[: -len(session.turns[-1].ids)] + lm_h.encode("Assistant:")
    assert common_prefix(cached, prompt) >= len(session.turns[0].ids) + 3


def test_complete_mode_continues_running_text(lm_h) -> None:
    session = make_session(lm_h, GREEDY, mode="complete")
    first = reply(session, "Once upon a time")
    second = reply(session, "and then")
    text = lm_h.tokenizer.decode(session.context_ids)
    assert text == "Once upon a time" + first + " and then" + second
    expected = lm_h.complete("Once upon a time", max_new_tokens=8, temperature=0).samples[0].text
    assert first == expected
    assert [t.mode for t in session.turns] == ["complete"] * 4


def test_dialogpt_template_picked_by_model_id(lm_dialogpt) -> None:
    session = make_session(lm_dialogpt, GREEDY)
    assert session.template.kind == "dialogpt"
    shown = reply(session, "Hello")
    eot = lm_dialogpt.tokenizer.eot_id
    assert session.turns[0].ids == lm_dialogpt.encode("Hello") + [eot]
    assert session.turns[1].ids[-1] == eot
    text = lm_dialogpt.tokenizer.decode(session.context_ids)
    assert text == "Hello" + ENDOFTEXT + shown + ENDOFTEXT
    assert "Assistant" not in text
    assert make_session(lm_dialogpt, GREEDY, template="transcript").template.kind == "transcript"


def test_window_overflow_drops_oldest_whole_exchanges(lm_small) -> None:
    session = make_session(lm_small, GREEDY)
    for i in range(6):
        reply(session, f"This is message number {i} with some words")
        assert session.context_tokens <= lm_small.window
    assert session.start > 0 and session.start % 2 == 0
    assert session.turns[session.start].role == "user"
    assert "earlier turns dropped to fit the window" in session.show()
    assert len(session.turns) == 12  # nothing is forgotten by /save
    assert lm_small.tokenizer.decode(session.context_ids).startswith("User: This is message number")


def test_slash_help_lists_every_command(session: Session) -> None:
    out = session.command("/help")
    assert not out.error and not out.leave
    for cmd in COMMANDS:
        assert cmd.usage in out.text
    for name in SETTINGS:
        assert name in out.text


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("temperature", "0.5", 0.5),
        ("top_k", "20", 20),
        ("top-p", "0.9", 0.9),
        ("min_p", "0.05", 0.05),
        ("repetition_penalty", "1.2", 1.2),
        ("max_new_tokens", "16", 16),
        ("seed", "7", 7),
        ("seed", "none", None),
        ("Temperature", " 0.25 ", 0.25),
    ],
)
def test_set_each_option(session: Session, option: str, value: str, expected: object) -> None:
    out = session.command(f"/set {option} {value}")
    assert not out.error, out.text
    key = option.replace("-", "_").lower()
    assert getattr(session.cfg, key) == expected
    assert f"{key}={expected}" in session.command("/show").text


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("/set temperature -1", "temperature must be 0 (greedy) or at least 0.001, got -1"),
        ("/set temperature 1e-45", "temperature must be 0 (greedy) or at least 0.001"),
        ("/set temperature hot", "temperature must be a number"),
        ("/set top_k many", "top_k must be an integer"),
        ("/set top_p 2", "top_p must be in (0, 1]"),
        ("/set min_p 1.5", "min_p must be in [0, 1]"),
        ("/set repetition_penalty 0", "repetition_penalty must be between 0.01 and 100"),
        ("/set max_new_tokens 0", "max_new_tokens must be at least 1"),
        ("/set seed 99999999999999999999", "seed must be -1 (random) or an integer from 0 to"),
        ("/set seed x", "seed must be an integer"),
        ("/set warmth 3", "unknown setting 'warmth'"),
        ("/set temperature", "usage: /set OPTION VALUE"),
        ("/set temperature 0.5 extra", "usage: /set OPTION VALUE"),
        ("/frobnicate", "unknown command /frobnicate: type /help"),
        ("/mode poetry", "unknown mode 'poetry'"),
        ("/save", "usage: /save FILE"),
        ("/load", "usage: /load FILE"),
        ("/undo", "nothing to undo"),
    ],
)
def test_bad_commands_get_one_line(session: Session, line: str, needle: str) -> None:
    before = session.settings()
    out = session.command(line)
    assert out.error and not out.leave
    assert needle in out.text
    assert "\n" not in out.text
    assert session.settings() == before


def test_show_reports_model_device_settings_context(session: Session, lm_h) -> None:
    reply(session, "Hello")
    text = session.command("/show").text
    assert f"model:    {lm_h.name}" in text
    assert "device:   cpu (float32)" in text
    assert "mode:     chat (template transcript, User / Assistant)" in text
    assert "temperature=0" in text and "max_new_tokens=8" in text
    assert f"context:  {session.context_tokens}/{lm_h.window} tokens, 2 turns" in text


def test_reset_and_undo(session: Session) -> None:
    reply(session, "one")
    reply(session, "two")
    assert session.command("/undo").text == "dropped the last exchange"
    assert [t.content for t in session.turns if t.role == "user"] == ["one"]
    session.command("/reset")
    assert session.turns == [] and session.context_tokens == 0


def test_mode_switch(session: Session) -> None:
    assert session.command("/mode").text.startswith("mode: chat (")  # no argument: shows it
    assert session.mode == "chat"
    assert session.command("/mode complete").text == "mode: complete"
    assert session.command("/mode").text.startswith("mode: complete (")
    assert session.command("/MODE chat").text == "mode: chat"


def test_help_lists_every_command_and_alias(session: Session) -> None:
    from gpt2cli.repl.session import COMMAND_INDEX

    text = session.command("/help").text
    for name in COMMAND_INDEX:
        assert name in text, name


def test_save_asks_before_overwriting(session: Session, tmp_path: Path) -> None:
    reply(session, "Hello")
    path = tmp_path / "chat.json"
    assert session.command(f"/save {path}").text.startswith("saved 2 turns")
    path.write_text("keep me")
    asked = session.command(f"/save {path}")
    assert asked.confirm == f"/save! {path}" and "exists" in asked.text
    assert path.read_text() == "keep me"
    assert session.command(asked.confirm).text.startswith("saved 2 turns")
    assert json.loads(path.read_text())["turns"][0]["content"] == "Hello"


def test_save_to_a_folder_asks_for_a_file_name(session: Session, tmp_path: Path) -> None:
    out = session.command(f"/save {tmp_path}")
    assert out.error and out.confirm is None and "is a folder" in out.text
    assert list(tmp_path.iterdir()) == []


def test_clearing_a_setting_says_none(session: Session) -> None:
    assert session.command("/set seed -1").text == "set seed to none (a random seed each reply)"
    assert session.command("/set top_k none").text == "set top_k to none"
    assert session.command("/set seed 7").text == "set seed to 7"


def test_script_inputs_blocks_are_one_turn() -> None:
    from gpt2cli.repl.session import script_inputs

    lines = [
        "one\n",
        '"""\n',
        "two a\n",
        "two b\n",
        '"""\n',
        '"""three"""\n',
        '"""four\n',
        'more"""\n',
        '"""open\n',
        "tail\n",
    ]
    assert list(script_inputs(iter(lines))) == [
        (1, "one"),
        (2, "two a\ntwo b"),
        (6, "three"),
        (7, "four\nmore"),
        (9, "open\ntail"),
    ]


@pytest.mark.parametrize("name", ["/exit", "/quit", "/bye"])
def test_exit_commands_leave(session: Session, name: str) -> None:
    assert session.command(name).leave


def test_save_load_round_trip(session: Session, lm_h, tmp_path: Path) -> None:
    reply(session, "Hello")
    session.command("/mode complete")
    reply(session, "More text")
    session.command("/set temperature 0.3")
    first = tmp_path / "chat.json"
    assert not session.command(f"/save {first}").error
    other = make_session(lm_h, GenerationConfig(), user_name="Me", bot_name="Bot")
    out = other.command(f"/load {first}")
    assert not out.error, out.text
    assert other.context_ids == session.context_ids
    assert other.mode == "complete" and other.cfg.temperature == 0.3
    assert other.template == session.template
    second = tmp_path / "again.json"
    other.command(f"/save {second}")
    assert json.loads(second.read_text()) == json.loads(first.read_text())


def test_load_hand_written_transcript_without_tokens(session: Session, lm_h, tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path.write_text(json.dumps({"format": "gpt2cli-repl-transcript", "turns": turns}))
    assert not session.command(f"/load {path}").error
    assert lm_h.tokenizer.decode(session.context_ids) == "User: Hi\nAssistant: Hello!\n"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read"),
        ("{not json", "is not JSON"),
        ('{"format": "other"}', "is not a gpt2 repl transcript"),
        ('{"format": "gpt2cli-repl-transcript"}', "is not a valid transcript"),
        ('{"format": "gpt2cli-repl-transcript", "turns": [{"role": "x", "content": 1}]}', "not a valid"),
        (
            '{"format": "gpt2cli-repl-transcript", "turns": [{"role": "user", "content": "a", "tokens": [-1]}]}',
            "vocabulary",
        ),
        (
            '{"format": "gpt2cli-repl-transcript", "turns": [], "settings": {"temperature": -1}}',
            "bad.json: temperature must be 0 (greedy) or at least 0.001, got -1",
        ),
        (
            '{"format": "gpt2cli-repl-transcript", "turns": [], '
            '"template": {"user_name": "Bob", "bot_name": "Bob"}}',
            "bad.json: the user and the model are both named 'Bob' (fix that value in the file)",
        ),
        (
            '{"format": "gpt2cli-repl-transcript", "turns": [], "template": {"kind": "alpaca"}}',
            "unknown chat template 'alpaca' (use one of:",
        ),
    ],
)
def test_load_bad_files(session: Session, tmp_path: Path, content: str | None, needle: str) -> None:
    reply(session, "keep me")
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    out = session.command(f"/load {path}")
    assert out.error and needle in out.text and "\n" not in out.text
    assert "--" not in out.text  # the repl's words, not the command line's flags
    assert session.turns[0].content == "keep me"  # a failed load loses nothing


def test_interrupted_reply_keeps_what_was_shown(session: Session, lm_h) -> None:
    session.command("/set max_new_tokens 30")
    pieces = session.respond("Tell me a story")
    shown = next(pieces) + next(pieces)  # asking for the next piece means this one was printed
    unshown = next(pieces)  # Ctrl-C lands before the UI has printed this one
    assert unshown
    pieces.close()  # what the UI does on Ctrl-C
    assert session.turns[-1].content == shown.strip()
    text = lm_h.tokenizer.decode(session.turns[-1].ids)
    assert text == "Assistant:" + shown.rstrip() + "\n"
