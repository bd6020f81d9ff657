"""Speculative decoding from the text itself: drafts are looked up in the prompt and
the tokens generated so far (no draft model), and the scheduler verifies them in its
ordinary batch.

Why it pays: a step's fixed cost is one pass over the weights (about 18 ms for Gemma
3 270M on 2 threads), while a drafted row costs what its logits cost (5-6 ms over
Gemma's 262,144-token vocabulary), and work that repeats its input (quoting,
extracting, editing code) has long stretches a lookup predicts. The
model's greedy token is checked at every drafted position: the accepted prefix of a
draft plus the model's own next token come out of one step, and the output is the
model's greedy output (up to llama.cpp's batch-shape rounding, which batching has
always had; see the scheduler's docstring). Sampled requests are never speculated:
the drafts are greedy guesses, and checking them against a sampled token would need
rejection sampling against a draft distribution that a lookup does not have.

Whether a step speculates is decided from measured costs (`StepCosts`, one figure
per llama.cpp pass: `ubatches`): drafts are added only while the expected tokens per
second of the step rise. A batch of many sequences gets few or none; a lone stream
gets as many as its acceptance rate makes worth it (a handful at 90%).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

LONGEST_MATCH = 4
"""Longest n-gram looked up; the longest one found wins (the likeliest continuation)."""
SHORTEST_MATCH = 2
MAX_DRAFT = 16
"""Tokens one sequence may draft in a step."""
MAX_STEP_DRAFTS = 32
"""Drafted rows one step may carry in all: each wants a logit row (1 MiB on Gemma's
262,144-token vocabulary), and llama.cpp keeps its output buffer at the largest
number of rows it ever had to return."""


class NgramDrafts:
    """Where each n-gram of a sequence last ended, so that the sequence's latest n
    tokens can be looked up and what followed them proposed as a draft."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self._tokens: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self._register_suffix()
            self._tokens.append(token)

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the
        sequence's longest matching suffix; [] when no suffix occurred before."""
        tokens, size = self._tokens, len(self._tokens)
        if limit <= 0:
            return []
        for n in range(min(LONGEST_MATCH, size), SHORTEST_MATCH - 1, -1):
            end = self._ends.get(tuple(tokens[size - n :]))
            if end is not None:
                return tokens[end : min(end + limit, size)]
        return []

    def _register_suffix(self) -> None:
        """Record the n-grams that end at the current end, before a token follows them
        (so a lookup never finds the suffix it is looking for)."""
        tokens, size = self._tokens, len(self._tokens)
        for n in range(SHORTEST_MATCH, min(LONGEST_MATCH, size) + 1):
            self._ends[tuple(tokens[size - n :])] = size


@dataclass
class Acceptance:
    """How often one sequence's drafted tokens were right, as the chance that the next
    drafted token is (a Beta(1, 1) prior: 1/2 before any evidence)."""

    accepted: int = 0
    tried: int = 0
    """Drafted tokens that were checked: up to and including the first wrong one."""

    @property
    def rate(self) -> float:
        return (self.accepted + 1) / (self.tried + 2)

    def record(self, accepted: int, tried: int) -> None:
        self.accepted += accepted
        self.tried += tried


CALIBRATION_ROWS = (1, 2, 3, 4, 5, 8, 12, MAX_DRAFT + 1)
"""Batch sizes timed when a model loads: one sequence with up to a whole draft (the
sizes between are interpolated). llama.cpp's kernels change at 4 and 8 rows, so
those and their neighbours are timed."""


class StepCosts:
    """Seconds a decode step takes, by the number of rows in its batch.

    Small batches (up to one sequence with a whole draft) are timed once, when the
    model loads (`calibrate`), and those figures stay: so the plan for a lone greedy
    request depends only on the request, and the same request on an idle server is
    computed in the same batch shapes, giving the same text. Larger batches are
    learned from the steps the scheduler runs (an exponential moving average per
    row count).

    A row count not measured yet is predicted by interpolating its measured
    neighbours; above the largest measured count it is predicted to cost no more than
    that one, which is optimistic on purpose: the scheduler then tries the larger
    batch once and learns what it costs."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self._smoothing = smoothing
        self._rows: list[int] = []
        self._seconds: list[float] = []
        self._calibrated = 0
        """Row counts up to this one keep their calibrated figures."""

    def calibrate(self, seconds: dict[int, float]) -> None:
        """Fix the cost of these row counts (and of every count up to the largest)."""
        for rows, value in seconds.items():
            self._set(rows, value, smoothing=1.0)
        self._calibrated = max(seconds, default=0)

    def record(self, rows: int, seconds: float) -> None:
        if rows > self._calibrated:
            self._set(rows, seconds, smoothing=self._smoothing)

    def _set(self, rows: int, seconds: float, *, smoothing: float) -> None:
        at = bisect.bisect_left(self._rows, rows)
        if at < len(self._rows) and self._rows[at] == rows:
            self._seconds[at] += smoothing * (seconds - self._seconds[at])
        else:
            self._rows.insert(at, rows)
            self._seconds.insert(at, seconds)

    def predict(self, rows: int) -> float | None:
        """Predicted seconds for `rows`; None until a step of at most `rows` rows was measured."""
        at = bisect.bisect_left(self._rows, rows)
        if at < len(self._rows) and self._rows[at] == rows:
            return self._seconds[at]
        if at == 0:
            return None
        if at == len(self._rows):
            return self._seconds[-1]
        (r0, s0), (r1, s1) = (self._rows[at - 1], self._seconds[at - 1]), (self._rows[at], self._seconds[at])
        return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)


def ubatches(rows: Sequence[tuple[int, int]]) -> list[int]:
    """The rows of each pass llama.cpp makes over a batch of a split (non-unified)
    cache, given each sequence's (slot, rows) in the batch, slots ascending: a pass
    takes the longest run of consecutive slots from the first with rows left, and the
    same number of rows from each (llama_batch_allocr::split_equal, sequential). Each
    pass reads all the weights, so the passes, not the rows, make most of the cost."""
    left = [[slot, count] for slot, count in rows if count > 0]
    passes = []
    while left:
        run = 1
        while run < len(left) and left[run][0] == left[run - 1][0] + 1:
            run += 1
        each = min(count for _, count in left[:run])
        passes.append(each * run)
        for entry in left[:run]:
            entry[1] -= each
        left = [entry for entry in left if entry[1] > 0]
    return passes


def predicted_seconds(rows: Sequence[tuple[int, int]], costs: StepCosts) -> float | None:
    """A step's predicted seconds: the sum of its passes' (None if one cannot be predicted)."""
    total = 0.0
    for size in ubatches(rows):
        seconds = costs.predict(size)
        if seconds is None:
            return None
        total += seconds
    return total


def plan_drafts(slots: Sequence[int], offers: Sequence[tuple[int, float]], costs: StepCosts, room: int) -> list[int]:
    """How many drafted tokens each generating sequence should verify in a step.

    `slots` are the generating sequences' slots (ascending), each adding one row that
    yields one token; `offers` holds, for each, the draft tokens available and its
    acceptance rate. Drafted token j of a sequence with rate a is expected to add
    a**j tokens (it counts only if all before it were right). The plan takes the most
    valuable drafted tokens first and keeps the number that maximises expected
    tokens per predicted second, at most `room` and MAX_STEP_DRAFTS in all; 0
    everywhere when the plain step cannot be predicted yet, or when drafting does not
    pay."""
    counts = [1] * len(slots)
    baseline = predicted_seconds(list(zip(slots, counts, strict=True)), costs)
    plan = [0] * len(slots)
    if baseline is None or baseline <= 0:
        return plan
    gains = sorted(
        ((rate**j, index) for index, (available, rate) in enumerate(offers) for j in range(1, available + 1)),
        reverse=True,
    )[: max(0, min(room, MAX_STEP_DRAFTS))]
    best_count, best_speed, expected = 0, len(slots) / baseline, float(len(slots))
    for count, (gain, index) in enumerate(gains, start=1):
        expected += gain
        counts[index] += 1
        predicted = predicted_seconds(list(zip(slots, counts, strict=True)), costs)
        if predicted is not None and predicted > 0 and expected / predicted > best_speed:
            best_count, best_speed = count, expected / predicted
    for _, index in gains[:best_count]:
        plan[index] += 1
    return plan
