"""How a prompt is cut into prefill pieces, so that a cached prefix can be reused exactly.

llama.cpp's numbers for a token depend on the llama_decode that computed it, so a
cached prefix gives a newcomer exactly the numbers it would compute itself only
when both were computed alike. The cut is a function of the tokens alone: each
turn (a position where the turn marker starts, "\\n\\nHuman:" for raw prompts)
begins a segment, and each segment is cut in whole chunks from its start. What
is left of a turn after its whole chunks, its tail, is one more segment:

- without `Loose` shapes, the tail is one chunk like the others, computed alone;
- with them, the tail is loose: computed in pieces of any cut, each of a shape
  whose rows get the same numbers whatever the cut (`Loose`), so a cached tail is
  reused up to any token, and an answer's tokens can be made exact while it is
  generated (`Scheduler`, catching up).

Whole chunks are kept (128 tokens, computed alone): on long prompts they are about
20% faster than loose pieces, whose shapes must stay under 64 rows.

A conversation's next turn shares every segment of the earlier turns, so it
computes only what is new. Turn markers matter for answers: an answer is generated
a token at a time, so it is reused only once it was computed again in prompt
pieces (`Scheduler.canonicalize`, or catching up), ending where the next turn's
marker will start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple


class Segment(NamedTuple):
    """Positions [start, end) of a prompt, computed as one chunk or as loose pieces."""

    start: int
    end: int
    loose: bool = False


@dataclass(frozen=True)
class Loose:
    """llama.cpp batch shapes whose rows' numbers do not depend on how a text is cut.

    Measured on llama.cpp's CPU backend (Gemma 3 270M Q4_K_M, AVX-512; by the source,
    AVX2 takes the same paths): a row gets the same numbers in any llama_decode of one sequence
    of `fewest` to `most` rows whose row count is a multiple of `group`. Below 8
    rows the K-quant matmul takes its vec_dot path instead of the tiled one; from 64
    query rows on, flash attention takes its tiled path; rows after the last whole
    group of 4 go through the repacked Q4_K GEMV instead of the GEMM. The scheduler
    pads a piece with throwaway rows after it to a multiple of `group` (at least
    `fewest` rows) and drops them after the decode.
    """

    fewest: int = 8
    most: int = 60
    group: int = 4

    def rows(self, real: int) -> int:
        """The rows a piece of `real` tokens is padded to."""
        return max(self.fewest, -(-real // self.group) * self.group)

    @property
    def piece(self) -> int:
        """The most real tokens in one piece, so that its padded shape fits."""
        return self.most - self.most % self.group


CPU_LOOSE = Loose()
"""The shapes of llama.cpp's CPU backend (`tests/test_reuse_model.py` checks them)."""


def turn_starts(tokens: Sequence[int], marker: Sequence[int]) -> list[int]:
    """Positions where a whole `marker` starts a turn after the prompt's first chunk
    began: a marker at the very start, or right after BOS (a raw prompt's first
    "\\n\\nHuman:"), belongs to the first chunk, which would otherwise be BOS alone."""
    if not marker:
        return []
    first, size = marker[0], len(marker)
    return [
        i for i in range(2, len(tokens) - size + 1) if tokens[i] == first and list(tokens[i : i + size]) == list(marker)
    ]


def last_turn_start(tokens: Sequence[int], marker: Sequence[int]) -> int:
    """Where the last turn of `tokens` starts (0: the first)."""
    size = len(marker)
    for i in range(len(tokens) - size, 1, -1):
        if size and list(tokens[i : i + size]) == list(marker):
            return i
    return 0


def segments(tokens: Sequence[int], chunk: int, marker: Sequence[int] = (), loose: bool = False) -> list[Segment]:
    """How `tokens` are computed: whole chunks from each turn's start, then its tail
    (a loose segment when `loose`, joined with the tails right before it: a short
    turn's rows are computed in the same pieces as the turns around it)."""
    bounds = [0, *turn_starts(tokens, marker), len(tokens)]
    out: list[Segment] = []
    for start, end in pairwise(bounds):
        whole = start + (end - start) // chunk * chunk
        out.extend(Segment(s, s + chunk) for s in range(start, whole, chunk))
        if whole == end:
            continue
        if loose and out and out[-1].loose:  # loose rows do not care where a turn starts
            out[-1] = Segment(out[-1].start, end, True)
        else:
            out.append(Segment(whole, end, loose))
    return out


def tail_start(tokens: Sequence[int], chunk: int, marker: Sequence[int]) -> int:
    """Where the tail of the last turn starts: what follows it stays in that tail until
    the turn grows to its next whole chunk."""
    start = last_turn_start(tokens, marker)
    return start + (len(tokens) - start) // chunk * chunk


def piece_end(plan: Sequence[Segment], position: int, loose: Loose | None) -> int:
    """The end of the piece that starts at `position`: a chunk's end, or as far into a
    loose segment as one piece goes (never leaving a last piece of fewer than
    `loose.fewest` tokens when a longer cut avoids it)."""
    segment = next(s for s in plan if s.start <= position < s.end)
    if not segment.loose or loose is None:
        return segment.end
    left = segment.end - position
    if left <= loose.piece:
        return segment.end
    step = loose.piece if left - loose.piece >= loose.fewest else loose.piece - loose.fewest
    return position + step


def add_piece(done: list[Segment], piece: Segment) -> None:
    """Record a computed piece after the ones before it (a loose piece joins a loose one)."""
    if done and piece.loose and done[-1].loose and done[-1].end == piece.start:
        done[-1] = Segment(done[-1].start, piece.end, True)
    else:
        done.append(piece)


def cut_at(done: Sequence[Segment], position: int) -> list[Segment]:
    """The computed pieces before `position` (a loose one cut there: its rows stay exact)."""
    kept = [piece for piece in done if piece.end <= position]
    partial = next((p for p in done if p.start < position < p.end), None)
    if partial is not None and partial.loose:
        kept.append(Segment(partial.start, position, True))
    return kept


def exact_end(done: Sequence[Segment]) -> int:
    return done[-1].end if done else 0


def shared_end(done: Sequence[Segment], plan: Sequence[Segment], limit: int) -> int:
    """How far, at most `limit`, a cache computed as `done` holds exactly the numbers that
    computing `plan` would give: chunk for chunk, and any loose rows within its loose
    segments."""
    position, index = 0, 0
    for segment in plan:
        while index < len(done) and done[index].end <= position:
            index += 1
        if index == len(done) or position >= limit:
            break
        have = done[index]
        if not segment.loose:
            if have != segment or segment.end > limit:
                break
            position = segment.end
            continue
        if not have.loose:
            break
        position = min(segment.end, have.end, limit)
        if position < segment.end:
            break
    return position


def answer_end(tokens: Sequence[int], start: int, marker: Sequence[int]) -> int:
    """Where the text that follows an answer would start: the first marker at or after
    `start`, or its beginning cut off by the end of `tokens` (a stop sequence ends a
    request before all of it is cached), else the end of `tokens`."""
    for i in range(start, len(tokens)):
        if marker and list(tokens[i : i + len(marker)]) == list(marker[: len(tokens) - i]):
            return i
    return len(tokens)
