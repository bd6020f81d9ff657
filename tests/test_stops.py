from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from tcserve.core.stops import StopMatch, StopMatcher


def run_streaming(stops: list[str], pieces: list[str]) -> tuple[list[str], str | None]:
    """Feed pieces one by one; returns the released pieces and the matched stop."""
    matcher = StopMatcher(stops)
    released: list[str] = []
    for piece in pieces:
        out = matcher.feed(piece)
        if isinstance(out, StopMatch):
            released.append(out.text_before)
            return released, out.stop
        released.append(out)
    released.append(matcher.flush())
    return released, None


def run_whole(stops: list[str], text: str) -> tuple[str, str | None]:
    released, stop = run_streaming(stops, [text])
    return "".join(released), stop


def test_stop_split_over_pieces_never_leaks() -> None:
    released, stop = run_streaming(["\n\nHuman:"], [" Hi", "\n", "\nHu", "man:", " more"])
    assert stop == "\n\nHuman:"
    assert released == [" Hi", "", "", ""]


def test_held_text_is_released_once_it_cannot_be_a_stop() -> None:
    matcher = StopMatcher(["\n\nHuman:"])
    assert matcher.feed("a\n") == "a"
    assert matcher.feed("\nHx") == "\n\nHx"


def test_held_text_belongs_to_the_completion_at_the_end() -> None:
    released, stop = run_streaming(["STOP"], ["abc", "ST"])
    assert stop is None
    assert "".join(released) == "abcST"
    assert released[-1] == "ST"


def test_earliest_ending_match_wins() -> None:
    assert run_whole(["abcd", "bc"], "xabcd") == ("xa", "bc")


def test_same_end_prefers_the_longer_stop() -> None:
    assert run_whole(["c", "abc"], "xxabc") == ("xx", "abc")


def test_empty_stops_are_ignored() -> None:
    assert run_whole(["", "z"], "abc") == ("abc", None)


def test_stop_at_the_very_start() -> None:
    released, stop = run_streaming(["Hi"], ["H", "i there"])
    assert (released, stop) == (["", ""], "Hi")


ALPHABET = st.sampled_from(list("ab\nHu:man XY"))
texts = st.text(alphabet=ALPHABET, max_size=40)
stop_sets = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=6), max_size=4)


@st.composite
def splits(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(texts)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@given(splits(), stop_sets)
def test_any_split_gives_the_whole_text_result(split: tuple[str, list[str]], stops: list[str]) -> None:
    text, pieces = split
    released, stop = run_streaming(stops, pieces)
    whole, whole_stop = run_whole(stops, text)
    assert "".join(released) == whole
    assert stop == whole_stop


@given(splits(), stop_sets)
def test_released_text_never_contains_a_stop(split: tuple[str, list[str]], stops: list[str]) -> None:
    text, pieces = split
    released, stop = run_streaming(stops, pieces)
    completion = "".join(released)
    for s in stops:
        assert s not in completion
    if stop is None:
        assert completion == text
    else:
        # The completion is exactly the text before the first stop to end:
        # not one character of that stop was released.
        assert text.startswith(completion + stop)
        end = len(completion) + len(stop)
        assert all(text.find(s) < 0 or text.find(s) + len(s) >= end for s in stops if s)
