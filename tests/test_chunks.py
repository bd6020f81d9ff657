"""How prompts are cut into prefill pieces (`engines/llamacpp/chunks.py`)."""

from __future__ import annotations

from tcserve.engines.llamacpp.chunks import (
    Loose,
    Segment,
    add_piece,
    answer_end,
    cut_at,
    piece_end,
    segments,
    shared_end,
    tail_start,
)

M = (7, 8)
"""A two-token turn marker."""


def ends(plan: list[Segment]) -> list[int]:
    return [segment.end for segment in plan]


def test_without_a_marker_a_prompt_is_cut_in_whole_chunks_from_its_start() -> None:
    assert ends(segments(list(range(10)), 4)) == [4, 8, 10]
    assert ends(segments(list(range(8)), 4)) == [4, 8]


def test_each_turn_is_cut_from_its_own_start() -> None:
    tokens = [1, 2, 3, 7, 8, 4, 5, 6, 1, 2, 7, 8, 9]  # turns start at 3 and 10
    assert ends(segments(tokens, 4, M)) == [3, 7, 10, 13]
    assert ends(segments([7, 8, 1, 7], 4, M)) == [4]  # a marker at the start, or cut off by the end, starts nothing
    assert ends(segments([0, 7, 8, 1, 2, 3], 4, M)) == [4, 6]  # nor one right after BOS: BOS is no chunk of its own


def test_with_loose_shapes_each_turns_tail_is_loose_and_joins_the_tails_before_it() -> None:
    tokens = [1, 2, 3, 7, 8, 4, 5, 6, 1, 2, 7, 8, 9]
    assert segments(tokens, 4, M, loose=True) == [Segment(0, 3, True), Segment(3, 7), Segment(7, 13, True)]
    assert tail_start(tokens, 4, M) == 10
    assert tail_start([*tokens, 1, 2, 3], 4, M) == 14  # the last turn grew into a whole chunk
    assert tail_start([*range(7), 9, 10], 4, M) == 8  # no turn: whole chunks from the start


def test_a_loose_segment_is_cut_in_pieces_that_fit_the_shape_and_leave_no_short_last_one() -> None:
    loose = Loose(fewest=8, most=60, group=4)
    assert (loose.rows(1), loose.rows(9), loose.rows(56), loose.piece) == (8, 12, 56, 60)
    plan = [Segment(0, 128), Segment(128, 250, True)]
    assert piece_end(plan, 0, loose) == 128
    assert piece_end(plan, 128, loose) == 188  # a whole piece of 60: 62 are left
    assert piece_end(plan, 188, loose) == 240  # 60 would leave 2, fewer than 8: 52, leaving 10
    assert piece_end(plan, 240, loose) == 250
    assert piece_end(plan, 128, None) == 250  # without loose shapes a tail is one chunk


def test_a_cache_is_reused_chunk_for_chunk_and_loose_rows_up_to_any_token() -> None:
    plan = [Segment(0, 4), Segment(4, 8), Segment(8, 11, True), Segment(11, 13, True)]
    done: list[Segment] = []
    for piece in (Segment(0, 4), Segment(4, 8), Segment(8, 10, True), Segment(10, 12, True)):
        add_piece(done, piece)
    assert done == [Segment(0, 4), Segment(4, 8), Segment(8, 12, True)]  # loose runs join
    assert shared_end(done, plan, limit=13) == 12  # through the loose tail, across the turn
    assert shared_end(done, plan, limit=9) == 9  # never past the limit, loose or not
    assert shared_end(done, plan, limit=7) == 4  # a chunk is reused whole or not at all
    assert shared_end(done, [Segment(0, 4), Segment(4, 8, True)], limit=13) == 4  # chunk rows are not loose
    assert shared_end(done, [Segment(0, 4), Segment(4, 8), Segment(8, 12)], limit=13) == 8  # nor loose ones a chunk
    assert shared_end([Segment(0, 3)], [Segment(0, 4)], limit=8) == 0
    assert cut_at(done, 10) == [Segment(0, 4), Segment(4, 8), Segment(8, 10, True)]
    assert cut_at(done, 6) == [Segment(0, 4)]


def test_an_answer_ends_where_the_next_turns_marker_starts_even_cut_off() -> None:
    assert answer_end([1, 2, 3, 7, 8, 9], 2, M) == 3
    assert answer_end([1, 2, 3, 7], 2, M) == 3  # a stop ended the request inside the marker
    assert answer_end([1, 2, 3, 4], 2, M) == 4
    assert answer_end([1, 7, 8, 3], 2, M) == 4  # a marker in the prompt is not the answer's end
    assert answer_end([1, 2, 3], 1, ()) == 3
