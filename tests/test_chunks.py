"""How prompts are cut into prefill chunks (`engines/llamacpp/chunks.py`)."""

from __future__ import annotations

from tcserve.engines.llamacpp.chunks import answer_end, chunk_ends, next_end, shared_end

M = (7, 8)
"""A two-token turn marker."""


def test_without_a_marker_a_prompt_is_cut_in_whole_chunks_from_its_start() -> None:
    assert chunk_ends(list(range(10)), 4) == [4, 8, 10]
    assert chunk_ends(list(range(8)), 4) == [4, 8]


def test_each_turn_is_cut_from_its_own_start() -> None:
    tokens = [1, 2, 3, 7, 8, 4, 5, 6, 1, 2, 7, 8, 9]  # turns start at 3 and 10
    assert chunk_ends(tokens, 4, M) == [3, 7, 10, 13]
    assert chunk_ends([7, 8, 1, 7], 4, M) == [4]  # a marker at the start, or cut off by the end, starts nothing
    assert chunk_ends([0, 7, 8, 1, 2, 3], 4, M) == [4, 6]  # nor one right after BOS: BOS is no chunk of its own


def test_two_cuts_agree_up_to_the_last_chunk_they_share() -> None:
    assert shared_end([4, 8, 10], [4, 8, 12], limit=12) == 8
    assert shared_end([4, 8, 12], [4, 8, 12, 14], limit=11) == 8  # never past the limit
    assert shared_end([3, 7], [4, 8], limit=8) == 0
    assert next_end([4, 8, 10], 8) == 10
    assert next_end([4, 8, 10], 0) == 4


def test_an_answer_ends_where_the_next_turns_marker_starts_even_cut_off() -> None:
    assert answer_end([1, 2, 3, 7, 8, 9], 2, M) == 3
    assert answer_end([1, 2, 3, 7], 2, M) == 3  # a stop ended the request inside the marker
    assert answer_end([1, 2, 3, 4], 2, M) == 4
    assert answer_end([1, 7, 8, 3], 2, M) == 4  # a marker in the prompt is not the answer's end
    assert answer_end([1, 2, 3], 1, ()) == 3
