"""Stop strings: streamed output equals the one-shot cut, for every way of splitting the text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2cli.errors import BadInputError
from gpt2cli.stopping import StopMatcher, truncate_at_stop

SETTINGS = settings(deadline=None, max_examples=300)


def reference_cut(text: str, stops: list[str]) -> int | None:
    """Brute force: the earliest index where any stop string starts."""
    for i in range(len(text)):
        if any(text.startswith(stop, i) for stop in stops):
            return i
    return None


def reference_pending(text: str, stops: list[str]) -> int:
    """Brute force: earliest index whose suffix could still grow into a stop string."""
    for i in range(len(text)):
        tail = text[i:]
        if any(len(tail) < len(stop) and stop.startswith(tail) for stop in stops):
            return i
    return len(text)


def stream(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        emitted, stopped = matcher.push(piece)
        out += emitted
        if stopped:
            return out, True
    return out + matcher.flush(), matcher.stopped


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


small_text = st.text(alphabet="ab\nc", max_size=30)
stop_lists = st.lists(st.text(alphabet="ab\nc", min_size=1, max_size=5), max_size=3)


@SETTINGS
@given(text=small_text, stops=stop_lists, cuts=st.lists(st.integers(0, 100), max_size=12))
def test_streaming_equals_one_shot_for_any_split(text: str, stops: list[str], cuts: list[int]):
    cut = reference_cut(text, stops)
    expected = (text, False) if cut is None else (text[:cut], True)
    assert truncate_at_stop(text, stops) == expected
    assert stream(StopMatcher(stops), split(text, cuts)) == expected


@SETTINGS
@given(text=small_text, stops=stop_lists, cuts=st.lists(st.integers(0, 100), max_size=12))
def test_streaming_emits_as_early_as_possible(text: str, stops: list[str], cuts: list[int]):
    matcher = StopMatcher(stops)
    seen = emitted = ""
    for piece in split(text, cuts):
        out, stopped = matcher.push(piece)
        seen += piece
        emitted += out
        cut, pending = reference_cut(seen, stops), reference_pending(seen, stops)
        if cut is not None and cut <= pending:
            assert (emitted, stopped) == (seen[:cut], True)
            assert matcher.push("more text") == ("", True)
            assert matcher.flush() == ""
            return
        assert (emitted, stopped) == (seen[:pending], False)


def test_no_stops_is_passthrough() -> None:
    matcher = StopMatcher([])
    assert matcher.push("hello") == ("hello", False)
    assert matcher.push("") == ("", False)
    assert matcher.flush() == ""
    assert truncate_at_stop("abc", []) == ("abc", False)


@pytest.mark.parametrize("stops", [[""], ["ok", ""]])
def test_empty_stop_string_rejected(stops: list[str]) -> None:
    with pytest.raises(BadInputError):
        StopMatcher(stops)
    with pytest.raises(BadInputError):
        truncate_at_stop("text", stops)


def test_bare_string_rejected() -> None:
    with pytest.raises(BadInputError):
        StopMatcher("\n")  # a str is a Sequence[str] of characters; almost surely a mistake


def test_stop_spanning_many_pushes() -> None:
    matcher = StopMatcher(["\n\nUser:"])
    outputs = [matcher.push(ch) for ch in "Hi there.\n\nUser: next"]
    assert "".join(text for text, _ in outputs) == "Hi there."
    assert [stopped for _, stopped in outputs].index(True) == len("Hi there.\n\nUser:") - 1
    assert matcher.stopped
    assert matcher.push("x") == ("", True)


def test_partial_stop_is_held_then_released() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("the EN") == ("the ", False)
    assert matcher.push("D") == ("", True)

    matcher = StopMatcher(["END"])
    assert matcher.push("the EN") == ("the ", False)
    assert matcher.push("Ding") == ("", True)

    matcher = StopMatcher(["END"])
    assert matcher.push("the EN") == ("the ", False)
    assert matcher.push("Tity") == ("ENTity", False)

    matcher = StopMatcher(["END"])
    assert matcher.push("ends in E") == ("ends in ", False)
    assert matcher.flush() == "E"
    assert not matcher.stopped


def test_stop_at_the_very_start() -> None:
    assert StopMatcher(["abc"]).push("abcdef") == ("", True)
    assert truncate_at_stop("abcdef", ["abc"]) == ("", True)


def test_overlapping_stops_earliest_start_wins() -> None:
    assert truncate_at_stop("xabcd", ["bc", "abcd"]) == ("x", True)
    matcher = StopMatcher(["bc", "abcd"])
    # "bc" is complete but "abcd" started earlier and may still complete: wait.
    assert matcher.push("xabc") == ("x", False)
    assert matcher.push("d") == ("", True)

    matcher = StopMatcher(["bc", "abcd"])
    assert matcher.push("xabc") == ("x", False)
    assert matcher.push("e") == ("a", True)

    matcher = StopMatcher(["bc", "abcd"])
    assert matcher.push("xabc") == ("x", False)
    assert matcher.flush() == "a"  # stream ended: "bc" is the stop
    assert matcher.stopped


def test_repeated_prefix_characters() -> None:
    matcher = StopMatcher(["aab"])
    assert matcher.push("aaaa") == ("aa", False)
    assert matcher.push("ab") == ("a", True)  # "aaa" + stop
