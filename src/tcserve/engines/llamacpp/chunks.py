"""How a prompt is cut into prefill chunks, so that a cached prefix can be reused exactly.

llama.cpp's numbers for a token depend on the batch that computed it, so a cached
prefix gives a newcomer exactly the numbers it would compute itself only when both
were cut the same way. The cut is a function of the tokens alone: each turn (a
position where the turn marker starts, "\\n\\nHuman:" for raw prompts) begins a
segment, and each segment is cut in whole chunks from its start, the last one
shorter. A conversation's next turn shares every chunk of the earlier turns, up to
the start of the last answer's successor turn, and computes only what is new.

Turn markers matter for answers: an answer is generated a token at a time, so it is
reused only after an idle engine computed it again as prompt chunks
(`Scheduler.canonicalize`), ending where the next turn's marker will start. Without
turn segments, the next turn would still compute the last partial chunk before it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import pairwise


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


def chunk_ends(tokens: Sequence[int], chunk: int, marker: Sequence[int] = ()) -> list[int]:
    """Where each prefill chunk of `tokens` ends: whole chunks from each segment's start."""
    bounds = [0, *turn_starts(tokens, marker), len(tokens)]
    ends: list[int] = []
    for start, end in pairwise(bounds):
        ends.extend(range(start + chunk, end, chunk))
        ends.append(end)
    return ends


def shared_end(cached: Sequence[int], wanted: Sequence[int], limit: int) -> int:
    """The furthest chunk end, at most `limit`, up to which two cuts agree chunk for chunk."""
    agreed = 0
    for have, want in zip(cached, wanted, strict=False):
        if have != want or want > limit:
            break
        agreed = want
    return agreed


def next_end(ends: Sequence[int], position: int) -> int:
    """The end of the chunk that starts at `position` (a chunk end itself, or 0)."""
    return ends[bisect_right(ends, position)]


def answer_end(tokens: Sequence[int], start: int, marker: Sequence[int]) -> int:
    """Where the text that follows an answer would start: the first marker at or after
    `start`, or its beginning cut off by the end of `tokens` (a stop sequence ends a
    request before all of it is cached), else the end of `tokens`."""
    for i in range(start, len(tokens)):
        if marker and list(tokens[i : i + len(marker)]) == list(marker[: len(tokens) - i]):
            return i
    return len(tokens)
