"""Speculative decoding from the text itself: drafts are looked up in the prompt and
the tokens generated so far (no draft model), and the scheduler verifies them in its
ordinary batch.

Why it pays: a step's fixed cost is one pass over the weights (18-30 ms for Gemma 3
270M on 2 threads, on the two machines measured), while a drafted row costs what its
logits cost (5-10 ms over Gemma's 262,144-token vocabulary), and work that repeats
its input (quoting, extracting, editing code) has long stretches a lookup predicts.
The model's greedy token is checked at every drafted position: the accepted prefix of a
draft plus the model's own next token come out of one step, and the output is the
model's greedy output (up to llama.cpp's batch-shape rounding, which batching has
always had; see the scheduler's docstring). Sampled requests are never speculated:
the drafts are greedy guesses, and checking them against a sampled token would need
rejection sampling against a draft distribution that a lookup does not have.

Whether a step speculates is decided from measured costs (`StepCosts`, one figure
per llama.cpp pass: `ubatches`) and from how likely each drafted token is
(`Acceptance`): drafts are added only while the expected tokens per second of the
step rise. A batch of many sequences gets few or none; a lone stream copying its
prompt gets a long draft (up to 15 tokens), a stream whose lookups keep missing none.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

LONGEST_MATCH = 4
"""Longest n-gram looked up; the longest one found wins (the likeliest continuation)."""
SHORTEST_MATCH = 2
MAX_DRAFT = 15
"""Tokens one sequence may draft in a step. A lone stream's step costs less a token
the more rows it has while its drafts are right (Gemma 3 270M, 2 threads: 26 ms for
one row, 75-80 for 8, 101-110 for 12, 126-137 for 16, from
bench/probes/draft_policy.py), and copied text has long right runs. Each row wants
a logit row, 1 MiB on Gemma's 262,144-token vocabulary: the scheduler keeps drafts
within the rows llama.cpp already holds."""


class NgramDrafts:
    """Where each n-gram of a sequence ended, so that the sequence's latest n tokens can
    be looked up and what followed them proposed as a draft.

    Copying with edits. Work that repeats its input often changes it as it goes
    ("name = Aiko" rewritten as "name: Aiko", a misspelt name fixed at each use), and a
    plain lookup stops at the change: the suffix that holds the model's new token was
    never seen. Two things carry a draft over it. A lookup that finds no suffix
    realigns: it takes the n-gram just before the latest token, where it last occurred
    before, and assumes the latest token replaced the one that followed it there
    (`_realign`). And a replacement the model made twice where a draft had the same
    token (" =" by ":") is made in later drafts (`_learn`). Replayed on the bench's
    grounded answers (36, greedy; bench/probes/draft_policy.py, two runs) the two made
    tcserve's drafting 9-11% faster, free-text answers 0.3-1.1% slower (realigned
    drafts that miss)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self._tokens: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}
        self._earlier: dict[tuple[int, ...], int] = {}
        """Where each n-gram ended the time before its latest (`_realign`)."""
        self._replacements: dict[int, int] = {}
        """A token the model put twice where a draft had the key: drafts put it there."""
        self._seen_once: dict[int, int] = {}
        self._unchecked: list[tuple[int, int]] = []
        """The latest draft's tokens not yet checked, each (drafted, what the text had)."""
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self._learn(token)
            self._register_suffix()
            self._tokens.append(token)

    def propose(self, limit: int) -> list[int]:
        """`limit` tokens that followed the latest earlier occurrence of the sequence's
        longest matching suffix (or, without one, of the realigned n-gram), with the
        learned replacements made; [] when neither occurred before. Where what followed
        runs into the end of the text, the text is repeating itself with the period
        between the two occurrences, and the draft goes on repeating it (what looking
        up again after each drafted token would give): a loop of one token ("0000")
        drafts `limit` zeros, not one."""
        copied = self._copy(limit) if limit > 0 else []
        draft = [self._replacements.get(token, token) for token in copied]
        self._unchecked = list(zip(draft, copied, strict=True))[::-1]
        return draft

    def _copy(self, limit: int) -> list[int]:
        tokens, size = self._tokens, len(self._tokens)
        for n in range(min(LONGEST_MATCH, size), SHORTEST_MATCH - 1, -1):
            end = self._ends.get(tuple(tokens[size - n :]))
            if end is not None:
                period = size - end
                return [tokens[end + offset % period] for offset in range(limit)]
        start = self._realign()
        return tokens[start : start + limit] if start is not None else []

    def _realign(self) -> int | None:
        """Where copying goes on when the latest token replaced the one that followed the
        n-gram before it, the last time that n-gram occurred (past the token after that
        one, when that token is the latest: the model left one out); None when the
        n-gram never occurred before."""
        tokens, latest = self._tokens, len(self._tokens) - 1
        for n in range(min(LONGEST_MATCH, latest), SHORTEST_MATCH - 1, -1):
            key = tuple(tokens[latest - n : latest])
            end = self._ends.get(key)
            if end == latest:  # that is this very occurrence
                end = self._earlier.get(key)
            if end is not None:
                skipped = end + 1 < latest and tokens[end + 1] == tokens[latest]
                return end + 2 if skipped else end + 1
        return None

    def _learn(self, token: int) -> None:
        """Check `token` against the latest draft: where the model put another token than
        the draft's, that replacement, seen twice, is made from then on; where the draft
        had made a replacement and the model kept the text's token, it is not."""
        if not self._unchecked:
            return
        drafted, original = self._unchecked.pop()
        if token == drafted:
            return
        self._unchecked = []
        if token == original:
            self._replacements.pop(original, None)
        elif self._seen_once.get(original) == token:
            self._replacements[original] = token
        else:
            self._seen_once[original] = token

    def _register_suffix(self) -> None:
        """Record the n-grams that end at the current end, before a token follows them
        (so a lookup never finds the suffix it is looking for)."""
        tokens, size = self._tokens, len(self._tokens)
        for n in range(SHORTEST_MATCH, min(LONGEST_MATCH, size) + 1):
            key = tuple(tokens[size - n :])
            if key in self._ends:
                self._earlier[key] = self._ends[key]
            self._ends[key] = size


RUN_PRIOR = 2.0
"""The weight, in tokens, of a sequence's overall rate in the chance of its next
drafted token; the current run of right guesses is added to it (`Acceptance`)."""


@dataclass
class Acceptance:
    """How likely one sequence's next drafted tokens are right.

    Copying comes in runs: a lookup that was right for the last tokens is likely right
    for the next one, and a miss means the text left what was copied. On the bench's
    grounded answers (36 prompts, 128 tokens each, plain greedy: see
    bench/probes/draft_policy.py), the next lookup token was right 66% of the time
    after a miss, 90% after 2 right ones and 99% after 16.
    So a drafted token's chance is a Beta prior centred on the sequence's rate so far
    (`rate`, from a Beta(1, 1)), of weight `RUN_PRIOR` tokens, updated with the current
    run of right guesses, the drafted tokens before it counted as right (it counts only
    if they are). Only the request's own history enters: the plan for a lone greedy
    request depends on the request alone (see `StepCosts`)."""

    accepted: int = 0
    tried: int = 0
    """Drafted tokens that were checked: up to and including the first wrong one."""
    run: int = 0
    """Right guesses since the last wrong one (or since a step with no lookup)."""

    @property
    def rate(self) -> float:
        return (self.accepted + 1) / (self.tried + 2)

    def chances(self, available: int) -> list[float]:
        """For drafted tokens 1 to `available`: the chance that the token counts (it
        and every drafted token before it are right); decreasing."""
        rate, chance, chances = self.rate, 1.0, []
        for before in range(available):
            right = self.run + before
            chance *= (right + RUN_PRIOR * rate) / (right + RUN_PRIOR)
            chances.append(chance)
        return chances

    def record(self, accepted: int, tried: int) -> None:
        """`tried` drafted tokens were checked, the first `accepted` right (one more is a miss)."""
        self.accepted += accepted
        self.tried += tried
        self.run = self.run + accepted if accepted == tried else 0

    def learn(self, proposed: int, verified: int, right: int) -> None:
        """What one step showed: its lookup proposed `proposed` tokens, the step verified
        the first `verified`, and the first `right` were the model's. A step without a
        lookup ends the run (the text is not what the lookups know). A lookup the step
        did not verify is checked on its first token all the same, so that the rate is
        learned while the sequence is not drafting, and drafting starts once it would
        pay (at the 1/2 prior, four sequences side by side never drafted)."""
        if proposed == 0:
            self.run = 0
            return
        checked = max(verified, 1)
        right = min(right, checked)
        self.record(right, min(checked, right + 1))


def agreeing(draft: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens of the two agree."""
    return next(
        (at for at, (a, b) in enumerate(zip(draft, tokens, strict=False)) if a != b), min(len(draft), len(tokens))
    )


CALIBRATION_ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 15, MAX_DRAFT + 1)
"""Batch sizes timed when a model loads: one sequence with up to a whole draft (the
sizes between are interpolated). llama.cpp's kernels change at multiples of 4 and at
8 rows (4 rows 44 ms, 5 rows 69 ms, 8 rows 75 ms), so those and their neighbours are
timed, up to the most rows a step of the context can hold (`Scheduler.calibrate`).
With the loose check, the calibration took 1.2-1.3 s with the 8-slot default (8
sizes, up to 9 rows) and 2.2-2.4 s with 16 slots (all 13), on 2 threads."""


class Pass(NamedTuple):
    """One pass of llama.cpp over the weights: its rows, and how many sequences they belong to."""

    rows: int
    sequences: int


class _Curve:
    """Measured seconds by row count, for passes of one number of sequences."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.seconds: list[float] = []

    def set(self, rows: int, seconds: float, smoothing: float) -> None:
        at = bisect.bisect_left(self.rows, rows)
        if at < len(self.rows) and self.rows[at] == rows:
            self.seconds[at] += smoothing * (seconds - self.seconds[at])
        else:
            self.rows.insert(at, rows)
            self.seconds.insert(at, seconds)

    def slope(self) -> float:
        """Seconds per row from the smallest measured count to the largest (never below
        0): two neighbouring counts one row apart differ by less than their noise."""
        if len(self.rows) < 2:
            return 0.0
        return max(0.0, (self.seconds[-1] - self.seconds[0]) / (self.rows[-1] - self.rows[0]))

    def predict(self, rows: int, slope: float) -> float | None:
        """Measured, interpolated, or (above the largest count) extended by `slope` a
        row; None below the smallest count."""
        at = bisect.bisect_left(self.rows, rows)
        if at < len(self.rows) and self.rows[at] == rows:
            return self.seconds[at]
        if at == 0:
            return None
        if at == len(self.rows):
            return self.seconds[-1] + slope * (rows - self.rows[-1])
        (r0, s0), (r1, s1) = (self.rows[at - 1], self.seconds[at - 1]), (self.rows[at], self.seconds[at])
        return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)


class StepCosts:
    """Seconds a llama.cpp pass takes, by its rows and by the sequences they belong
    to: several sequences cost more than one sequence with as many rows (each has its
    own attention; measured on 2 threads: 4 rows 42 ms in one sequence, 57 ms in four).

    A lone sequence's passes, up to one whole draft, are timed once when the model
    loads (`calibrate`), and those figures stay: so the plan for a lone greedy request
    depends only on the request, and the same request on an idle server is computed
    in the same batch shapes, giving the same text. Every other pass is learned from
    the steps the scheduler runs (an exponential moving average per row count and
    number of sequences): a plain step of n sequences is one such pass.

    A pass not measured yet is predicted by interpolating its measured neighbours of
    the same number of sequences; above the largest, by extending that curve by its
    cost a row (from its smallest count to its largest; the lone sequence's, when it
    has one count); for a number of sequences never measured, as a lone sequence of
    as many rows. Predicting an unmeasured large pass as cheap instead, to have it tried
    once, made every larger size a slow step for every running sequence, and those
    steps were the c=16 ITL tail."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self._smoothing = smoothing
        self._curves: dict[int, _Curve] = {}
        self._calibrated = 0
        """A lone sequence's row counts up to this one keep their calibrated figures."""
        self.shared_drafts = 1.0
        """What drafts have cost, over what their passes were predicted to cost, in
        steps of several sequences. Their extra passes are predicted from a lone
        sequence's calibrated figures, timed at the start of a context, and beside other
        sequences, later in long contexts, they cost more (a 4-row pass of one sequence
        inside a 4-sequence step: about 66 ms, against 42 calibrated). A lone
        sequence's plan never uses it (see above)."""

    def calibrate(self, seconds: dict[int, float]) -> None:
        """Fix the cost of these row counts of a lone sequence (and of every count up to the largest)."""
        for rows, value in seconds.items():
            self._curve(1).set(rows, value, smoothing=1.0)
        self._calibrated = max(seconds, default=0)

    def record(self, rows: int, sequences: int, seconds: float) -> None:
        if sequences > 1 or rows > self._calibrated:
            self._curve(sequences).set(rows, seconds, smoothing=self._smoothing)

    def record_shared_drafts(self, predicted: float, measured: float) -> None:
        """The extra seconds that a step of several sequences' drafts were predicted to add, and did add."""
        if predicted > 0:
            ratio = min(max(measured / predicted, 0.5), 10.0)
            self.shared_drafts += self._smoothing * (ratio - self.shared_drafts)

    def predict(self, rows: int, sequences: int = 1) -> float | None:
        """Predicted seconds of a pass; None until a lone sequence's pass of at most `rows` rows was measured."""
        lone = self._curves.get(1)
        curve = self._curves.get(sequences)
        if sequences > 1 and curve is not None:
            seconds = curve.predict(rows, curve.slope() or (lone.slope() if lone else 0.0))
            if seconds is not None:
                return seconds
        return lone.predict(rows, lone.slope()) if lone else None

    def _curve(self, sequences: int) -> _Curve:
        return self._curves.setdefault(sequences, _Curve())


def ubatches(rows: Sequence[tuple[int, int]]) -> list[Pass]:
    """The passes llama.cpp makes over a batch of a split (non-unified) cache, given
    each sequence's (slot, rows) in the batch, slots ascending: a pass takes the
    longest run of consecutive slots from the first with rows left, and the same
    number of rows from each (llama_batch_allocr::split_equal, sequential). Each pass
    reads all the weights, so the passes, not the rows, make most of the cost."""
    left = [[slot, count] for slot, count in rows if count > 0]
    passes = []
    while left:
        run = 1
        while run < len(left) and left[run][0] == left[run - 1][0] + 1:
            run += 1
        each = min(count for _, count in left[:run])
        passes.append(Pass(each * run, run))
        for entry in left[:run]:
            entry[1] -= each
        left = [entry for entry in left if entry[1] > 0]
    return passes


def predicted_seconds(rows: Sequence[tuple[int, int]], costs: StepCosts) -> float | None:
    """A step's predicted seconds: the sum of its passes' (None if one cannot be predicted)."""
    total = 0.0
    for one in ubatches(rows):
        seconds = costs.predict(one.rows, one.sequences)
        if seconds is None:
            return None
        total += seconds
    return total


def plan_drafts(slots: Sequence[int], offers: Sequence[Sequence[float]], costs: StepCosts, room: int) -> list[int]:
    """How many drafted tokens each generating sequence should verify in a step.

    `slots` are the generating sequences' slots (ascending), each adding one row that
    yields one token; `offers` holds, for each, the chance that each of its available
    draft tokens counts, decreasing (`Acceptance.chances`): the tokens it is expected
    to add. The plan takes the most valuable drafted tokens first and keeps the number
    that maximises expected tokens per predicted second, at most `room` in all; 0
    everywhere when the plain step cannot be predicted yet, or when drafting does not
    pay. With several sequences, what drafts add to the plain step is scaled by what
    they were seen to cost (`StepCosts.shared_drafts`)."""
    counts = [1] * len(slots)
    baseline = predicted_seconds(list(zip(slots, counts, strict=True)), costs)
    plan = [0] * len(slots)
    if baseline is None or baseline <= 0:
        return plan
    ranked = sorted(((chance, index) for index, chances in enumerate(offers) for chance in chances), reverse=True)
    gains = ranked[: max(0, room)]
    best_count, best_speed, expected = 0, len(slots) / baseline, float(len(slots))
    for count, (gain, index) in enumerate(gains, start=1):
        expected += gain
        counts[index] += 1
        predicted = predicted_seconds(list(zip(slots, counts, strict=True)), costs)
        if predicted is not None and len(slots) > 1:
            predicted = baseline + costs.shared_drafts * (predicted - baseline)
        if predicted is not None and predicted > 0 and expected / predicted > best_speed:
            best_count, best_speed = count, expected / predicted
    for _, index in gains[:best_count]:
        plan[index] += 1
    return plan
