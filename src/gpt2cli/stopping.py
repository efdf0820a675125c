"""Stop strings: cut generated text at the first stop string, streaming or all at once.

The cut is at the earliest *starting* occurrence of any stop string in the whole text, so a
streamed result never depends on how the text was split into pieces, and always equals
``truncate_at_stop(full_text, stops)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpt2cli.errors import BadInputError


def _validated(stops: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stops, str):
        raise BadInputError(f"stop strings must be a list, not the string {stops!r}")
    if any(stop == "" for stop in stops):
        raise BadInputError("a stop string cannot be empty", hint="drop the empty --stop value")
    return tuple(dict.fromkeys(stops))


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Start index of the earliest complete stop string in ``text``, or None."""
    hits = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(hits, default=None)


def _pending_start(text: str, stops: Sequence[str]) -> int:
    """Start of the longest suffix of ``text`` that is a proper prefix of some stop string.

    Returns ``len(text)`` when no suffix could still grow into a stop string.
    """
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return len(text) - longest


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Return (text before the earliest stop string, whether one was found)."""
    cut = _first_stop(text, _validated(stops))
    return (text, False) if cut is None else (text[:cut], True)


class StopMatcher:
    """Filter streamed text so nothing at or after the first stop string is ever emitted.

    ``push`` holds back any tail that could still become (part of) a stop string and releases it
    once it cannot; ``flush`` releases the held-back tail at the end of the stream. With no stop
    strings everything passes straight through.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = _validated(stops)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once a stop string has been seen; every later push returns ``("", True)``."""
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Add streamed ``text``; return (text safe to emit now, whether generation should stop)."""
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        held = self._held + text
        cut = _first_stop(held, self._stops)
        pending = _pending_start(held, self._stops)
        if cut is not None and cut <= pending:
            return self._stop(held[:cut]), True
        # A stop string that starts before `pending` may still complete and would win over `cut`.
        self._held = held[pending:]
        return held[:pending], False

    def flush(self) -> str:
        """End of stream: return the held-back text (up to a stop string it contains)."""
        if self._stopped:
            return ""
        text, found = truncate_at_stop(self._held, self._stops)
        self._held = ""
        return self._stop(text) if found else text

    def _stop(self, text: str) -> str:
        self._stopped = True
        self._held = ""
        return text
