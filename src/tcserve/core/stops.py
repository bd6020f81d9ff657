"""Streaming stop-sequence matching with hold-back.

Text is fed in pieces as the engine produces it. The matcher releases text as
soon as it can no longer become part of a stop sequence, holds back only the
longest tail that is still a prefix of some stop, and reports the first stop
that completes. Because a match is reported as soon as its last character
arrives, the result does not depend on how the text was split: feeding the
whole text at once gives exactly the concatenation of the streamed pieces.

Tie-break (ours, the reference is silent): the match that *ends* first wins;
at the same end, the longer stop wins.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StopMatch:
    text_before: str
    """Released text that precedes the stop (may be empty)."""
    stop: str


class StopMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(sorted({s for s in stops if s}, key=len, reverse=True))
        self._prefixes = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._longest_prefix = max((len(s) - 1 for s in self._stops), default=0)
        self._held = ""

    def feed(self, text: str) -> str | StopMatch:
        """Add generated text. Returns the text now safe to release, or the
        match that ends the completion (after which the matcher is spent)."""
        buffer = self._held + text
        match = self._first_match(buffer)
        if match is not None:
            self._held = ""
            return match
        hold = self._hold_length(buffer)
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """Generation ended without a stop: held-back text belongs to the completion."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> StopMatch | None:
        best: tuple[int, str, int] | None = None  # (end, stop, start)
        for stop in self._stops:  # longest first, so a tie on `end` keeps the longer
            start = buffer.find(stop)
            if start >= 0 and (best is None or start + len(stop) < best[0]):
                best = (start + len(stop), stop, start)
        if best is None:
            return None
        return StopMatch(text_before=buffer[: best[2]], stop=best[1])

    def _hold_length(self, buffer: str) -> int:
        for length in range(min(len(buffer), self._longest_prefix), 0, -1):
            if buffer[-length:] in self._prefixes:
                return length
        return 0
