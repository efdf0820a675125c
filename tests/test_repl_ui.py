"""`gpt2 repl` as users drive it: the real prompt-toolkit app fed through a pipe input in-process,
piped stdin, bad options, and the installed command in a pseudo-terminal for Ctrl-C and Ctrl-D."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cliutil import GPT2_BIN, HANG_GUARD, assert_one_line_error, run_inprocess
from prompt_toolkit.application import create_app_session
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from gpt2cli.config import GenerationConfig
from gpt2cli.repl.session import Session, make_session
from gpt2cli.repl.ui import LEAVE_HINT, SlashCompleter, TerminalUI, history_path

GREEDY = GenerationConfig(max_new_tokens=6, temperature=0)


def drive(session: Session, keys: str, steps: list[tuple[Callable[[TerminalUI], bool], str]] = ()) -> str:
    """Run the real TerminalUI on ``keys``; each step sends its keys once its condition holds."""
    out = io.StringIO()
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        ui = TerminalUI(session, console=Console(file=out, width=300, no_color=True))
        if steps:

            def feed() -> None:
                # Each step waits for its condition, however long a busy machine takes: sending
                # early (after a fixed time) would type into the wrong prompt.
                hung = time.monotonic() + HANG_GUARD  # a guard only: a hang ends the UI (Ctrl-D)
                for ready, text in steps:
                    while not ready(ui):
                        if time.monotonic() > hung:
                            pipe.send_text("\x04\x04")
                            return
                        threading.Event().wait(0.01)
                    pipe.send_text(text)

            threading.Thread(target=feed, daemon=True).start()
        pipe.send_text(keys)
        ui.run()
    return out.getvalue()


def test_ui_turns_blocks_alt_enter_commands_and_history(lm_h) -> None:
    session = make_session(lm_h, GREEDY)
    keys = 'Hello\r"""\rline one\rline two\r"""\rfirst\x1b\rsecond\r/show\r/mode complete\rcontinue this\r/exit\rnever read\r'
    out = drive(session, keys)
    users = [t.content for t in session.turns if t.role == "user"]
    assert users == ["Hello", "line one\nline two", "first\nsecond", " continue this"]
    assert [t.mode for t in session.turns][-2:] == ["complete", "complete"]
    assert "context:  " in out and "mode: complete" in out
    for turn in session.turns[1:6:2]:
        assert turn.content in out  # each reply was shown as it was kept
    assert "Hello" in history_path().read_text()  # $XDG_DATA_HOME/gpt2cli/repl_history


def test_ui_ctrl_c_at_empty_prompt_says_how_to_leave_and_ctrl_d_leaves(lm_h) -> None:
    session = make_session(lm_h, GREEDY)
    out = drive(session, "\x03typed\x03\x04")
    assert out.count(LEAVE_HINT) == 1  # not when the line had text
    assert session.turns == []


def test_ui_unknown_command_and_bad_value_one_line(lm_h) -> None:
    session = make_session(lm_h, GREEDY)
    out = drive(session, "/nope\r/set top_p 3\r\x04")
    lines = out.splitlines()
    assert "unknown command /nope: type /help for the commands" in lines
    assert any(line.startswith("top_p must be in (0, 1]") for line in lines)  # as /set names it
    assert "Traceback" not in out


def test_ui_tab_completes_slash_commands(lm_h) -> None:
    session = make_session(lm_h, GREEDY)

    def text_is(expected: str) -> Callable[[TerminalUI], bool]:
        return lambda ui: ui.prompt.default_buffer.text == expected

    steps = [
        (text_is(""), "/sh\t"),
        (text_is("/show"), "\r"),
        (text_is(""), "/set temp\t"),
        (text_is("/set temperature"), " 0.25\r"),
        (text_is(""), "\x04"),
    ]
    out = drive(session, "", steps)
    assert "model:    " in out
    assert session.cfg.temperature == 0.25


def test_completer_choices() -> None:
    def complete(text: str) -> list[str]:
        return [c.text for c in SlashCompleter().get_completions(Document(text), None)]

    assert complete("/s") == ["/save", "/save!", "/set", "/show"]
    assert complete("/b") == ["/bye"]
    assert complete("/set top") == ["top_k", "top_p"]
    assert complete("/mode c") == ["chat", "complete"]
    assert complete("hello") == [] and complete("/show x") == []


def test_toolbar_shows_model_device_context_speed(lm_h) -> None:
    session = make_session(lm_h, GREEDY)
    drive(session, "Hi\r\x04")
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        bar = TerminalUI(session).toolbar()
    assert lm_h.name in bar and "cpu" in bar
    assert f"context {session.context_tokens}/{lm_h.window}" in bar
    assert f"{session.tokens_per_second:.1f} tok/s" in bar


@pytest.fixture
def repl(capsys, monkeypatch):
    def call(args, stdin=None):
        return run_inprocess(["repl", *args], capsys, monkeypatch, stdin=stdin)

    return call


def test_piped_stdin_each_line_a_turn(ckpt_h: Path, lm_h, repl) -> None:
    result = repl(
        ["-m", str(ckpt_h), "-t", "0", "-n", "6"], stdin=b"hi\n\nhow are you\n/show\n/bye\nignored\n"
    )
    assert result.code == 0, result.err
    session = make_session(lm_h, GREEDY)
    expected = ["".join(session.respond(text)).lstrip() for text in ("hi", "how are you")]
    assert result.out == "".join(e + "\n" for e in expected)
    assert "context:  " in result.err  # notes go to stderr, stdout carries only replies
    assert "\x1b" not in result.out


def test_piped_complete_mode_and_dialogpt_template(ckpt_h: Path, repl) -> None:
    result = repl(
        ["-m", str(ckpt_h), "-t", "0", "-n", "4", "--mode", "complete"], stdin=b"Once upon\n/show\n"
    )
    assert result.code == 0 and "mode:     complete" in result.err
    result = repl(["-m", str(ckpt_h), "-n", "4", "--template", "dialogpt"], stdin=b"/show\n")
    assert result.code == 0 and "template dialogpt" in result.err


def test_piped_subprocess_plain_text_and_ctrl_c_exits_130(ckpt_h: Path, tmp_path: Path) -> None:
    """A real pipe, colour allowed by the environment: plain text; SIGINT ends the line, exit 130."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["TERM"] = "xterm-256color"
    lines = tmp_path / "in.txt"
    lines.write_bytes(b"Tell me a long story\n")
    with lines.open("rb") as stdin:
        proc = subprocess.Popen(
            [str(GPT2_BIN), "repl", "-m", str(ckpt_h), "--seed", "1", "-n", "100000"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], HANG_GUARD)
    assert ready, "no reply: the repl hung"
    first = proc.stdout.read1(64)  # the reply has begun
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=HANG_GUARD)
    text = (first + out).decode()
    assert proc.returncode == 130, err
    assert text.strip() and text.endswith("\n") and "\x1b" not in text
    assert b"Traceback" not in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--mode", "poem"], "--mode"),
        (["--template", "alpaca"], "--template"),
        (["--user-name", ""], "speaker name"),
        (["--bot-name", "A: B"], "speaker name"),
        (["--user-name", "Bob", "--bot-name", " Bob "], "both named 'Bob'"),
        (["--temperature", "-1"], "--temperature must be 0 (greedy) or at least 0.001"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--seed", "99999999999999999999"], "--seed must be -1 (random)"),
    ],
)
def test_bad_options_one_line_exit_2(ckpt_h: Path, repl, args: list[str], needle: str) -> None:
    assert_one_line_error(repl(["-m", str(ckpt_h), *args], stdin=b"hi\n"), 2, needle)


def test_missing_model_one_line(tmp_path: Path, repl) -> None:
    assert_one_line_error(repl(["-m", str(tmp_path / "nothing-here"), "--offline"], stdin=b"hi\n"), 1)


def test_pty_ctrl_c_while_streaming_and_at_prompt_ctrl_d_leaves(ckpt_h: Path, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(
        str(GPT2_BIN),
        ["repl", "-m", str(ckpt_h), "--seed", "1", "-n", "100000"],
        env=env,
        encoding="utf-8",
        timeout=HANG_GUARD,
        dimensions=(24, 120),
    )
    log = io.StringIO()
    child.logfile_read = log
    try:
        child.expect(">>>")
        child.sendcontrol("c")
        child.expect_exact(LEAVE_HINT)
        child.expect(">>>")
        child.sendline("Tell me a long story")
        child.expect_exact("\x1b[?2004l")  # the prompt has returned the line
        child.expect(r"\S")  # the reply has begun
        child.send("qqzzqq")  # typed while it streams: not echoed into the reply
        child.sendcontrol("c")
        child.expect_exact("[stopped]")
        assert "qqzzqq" not in child.before
        child.expect(">>>")
        saved = tmp_path / "s.json"
        child.sendline(f"/save {saved}")
        child.expect_exact("saved 2 turns")
        child.expect(">>>")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, log.getvalue()[-2000:]
    assert "Traceback" not in log.getvalue()
    reply = json.loads(saved.read_text())["turns"][1]
    shown_text = log.getvalue().replace("\r\n", "\n")  # the pty turns \n into \r\n
    assert reply["content"] and reply["content"] in shown_text  # kept what was shown


def test_pty_stdout_redirected_gets_only_replies(ckpt_h: Path, tmp_path: Path) -> None:
    """Terminal on stdin, stdout to a file: the prompt and notes stay on the terminal (stderr)."""
    pexpect = pytest.importorskip("pexpect")
    out = tmp_path / "replies.txt"
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1"}
    command = f"'{GPT2_BIN}' repl -m '{ckpt_h}' -t 0 -n 5 > '{out}'"
    child = pexpect.spawn("/bin/sh", ["-c", command], env=env, encoding="utf-8", timeout=HANG_GUARD)
    try:
        child.expect(">>>")
        child.sendline("hi")
        child.expect_exact("\x1b[?2004l")  # the line was read
        child.sendline("/show")
        child.expect_exact("context:  ")  # command output on the terminal
        child.expect(">>>")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    text = out.read_text()
    assert text.strip() and ">>>" not in text and "context" not in text and "/help" not in text


# --- issue 14: blocks in scripts and history, failing commands, /save, completion, echo -------


def test_piped_script_blocks_are_one_turn(ckpt_h: Path, lm_h, repl) -> None:
    script = b'"""\nWrite a haiku\nabout the sea.\n"""\nnext\n'
    result = repl(["-m", str(ckpt_h), "-t", "0", "-n", "6"], stdin=script)
    assert result.code == 0, result.err
    session = make_session(lm_h, GREEDY)
    expected = ["".join(session.respond(text)).lstrip() for text in ("Write a haiku\nabout the sea.", "next")]
    assert result.out == "".join(e + "\n" for e in expected)  # two turns, not five


def test_piped_script_stops_at_a_failing_command(ckpt_h: Path, repl, tmp_path: Path) -> None:
    result = repl(["-m", str(ckpt_h), "-t", "0", "-n", "4"], stdin=b"hi\n/set temperature hot\nnever\n")
    assert_one_line_error(result, 2, "line 2: /set temperature hot", "temperature must be a number")
    assert result.out.count("\n") == 1  # the reply before it is out; nothing after
    existing = tmp_path / "t.json"
    existing.write_text("keep")
    saved = repl(["-m", str(ckpt_h), "-n", "2"], stdin=f"/save {existing}\n".encode())
    assert_one_line_error(saved, 2, "exists", f"/save! {existing}")
    assert existing.read_text() == "keep"
    forced = repl(["-m", str(ckpt_h), "-n", "2"], stdin=f"/save! {existing}\n".encode())
    assert forced.code == 0 and json.loads(existing.read_text())["turns"] == []


def test_ui_block_is_one_history_entry(lm_h) -> None:
    from prompt_toolkit.history import InMemoryHistory

    session = make_session(lm_h, GREEDY)
    history = InMemoryHistory()
    out = io.StringIO()
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        ui = TerminalUI(session, console=Console(file=out, width=300, no_color=True), history=history)
        pipe.send_text('"""\rline one\rline two\r"""\r\x04')
        ui.run()
    assert [t.content for t in session.turns if t.role == "user"] == ["line one\nline two"]
    assert list(history.get_strings()) == ['"""\nline one\nline two\n"""']


def test_ui_save_asks_before_overwriting(lm_h, tmp_path: Path) -> None:
    existing = tmp_path / "chat.json"
    existing.write_text("keep")
    session = make_session(lm_h, GREEDY)
    declined = drive(session, f"/save {existing}\rn\r\x04")
    assert "nothing saved" in declined and existing.read_text() == "keep"
    agreed = drive(session, f"/save {existing}\ry\r\x04")
    assert "saved 0 turns" in agreed
    assert json.loads(existing.read_text())["format"] == "gpt2cli-repl-transcript"


@pytest.mark.parametrize("key", ["\x03", "\x04"], ids=["ctrl-c", "ctrl-d"])
def test_ui_ctrl_c_or_d_at_the_overwrite_question_answers_no(lm_h, tmp_path: Path, key: str) -> None:
    existing = tmp_path / "chat.json"
    existing.write_text("keep")
    session = make_session(lm_h, GREEDY)
    replied = (lambda ui: len(session.turns) == 2, f"/save {existing}\r{key}after\r\x04")
    out = drive(session, "Hello\r", [replied])  # after the reply: typed during it, Ctrl-C would stop it
    assert "nothing saved" in out and existing.read_text() == "keep"
    users = [t.content for t in session.turns if t.role == "user"]
    assert users == ["Hello", "after"]  # the session went on, the conversation kept


def test_completer_completes_file_names(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "chat-one.json").write_text("{}")
    (tmp_path / "chat-two.json").write_text("{}")
    monkeypatch.chdir(tmp_path)

    def complete(text: str) -> list[str]:
        word = text.rsplit(" ", 1)[1]
        return sorted(word + c.text for c in SlashCompleter().get_completions(Document(text), None))

    assert complete("/load chat-") == ["chat-one.json", "chat-two.json"]
    assert complete("/save chat-o") == ["chat-one.json"]
    assert complete("/save! chat-t") == ["chat-two.json"]


def test_no_echo_while_a_reply_streams() -> None:
    import pty
    import termios

    from gpt2cli.repl.ui import no_echo

    master, slave = pty.openpty()
    try:
        with open(slave, "rb", buffering=0, closefd=False) as tty:
            before = termios.tcgetattr(slave)
            assert before[3] & termios.ECHO
            with no_echo(tty):
                inside = termios.tcgetattr(slave)
                assert not inside[3] & termios.ECHO and not inside[3] & termios.ICANON
                assert inside[3] & termios.ISIG  # Ctrl-C still stops the reply
            assert termios.tcgetattr(slave) == before
        with no_echo(io.StringIO()):  # not a terminal: nothing to do, nothing fails
            pass
    finally:
        os.close(master)
        os.close(slave)


def test_keys_typed_on_a_terminal_are_read_without_waiting() -> None:
    import pty
    import tty as ttymode

    from prompt_toolkit.keys import Keys

    from gpt2cli.repl.ui import after_last_ctrl_c, pending_keys

    master, slave = pty.openpty()
    try:
        ttymode.setraw(slave)  # as the prompt holds it: Ctrl-C is a key, not a signal
        with open(slave, "rb", buffering=0, closefd=False) as term:
            assert pending_keys(term) == []  # nothing typed: returns at once
            os.write(master, "ab\x03cé\x1b[A".encode())
            keys = pending_keys(term)
        assert [k.data for k in keys] == ["a", "b", "\x03", "c", "é", "\x1b[A"]
        assert keys[2].key == Keys.ControlC and keys[5].key == Keys.Up
        kept = after_last_ctrl_c(keys)
        assert kept is not None and [k.data for k in kept] == ["c", "é", "\x1b[A"]
        assert after_last_ctrl_c(keys[:2]) is None
        assert pending_keys(io.StringIO()) == []  # not a terminal
    finally:
        os.close(master)
        os.close(slave)


def test_ctrl_c_typed_right_after_enter_stops_the_reply(lm_h) -> None:
    """Keys the prompt read past the Enter (a Ctrl-C among them) reach the reply as keys, not as
    a signal: the Ctrl-C stops it at once, the keys after it make the next turn."""
    session = make_session(lm_h, GenerationConfig(max_new_tokens=200, temperature=0))
    drive(session, "Tell me a long story\r\x03Go on\r/exit\r")
    # Stopped before its first token, the first exchange left nothing in the context.
    assert [(t.role, bool(t.content)) for t in session.turns] == [("user", True), ("assistant", True)]
    assert session.turns[0].content == "Go on"
