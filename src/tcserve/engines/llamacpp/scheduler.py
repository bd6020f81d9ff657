"""Continuous batching over one llama.cpp context with N sequence slots.

The scheduler runs on one worker thread and owns the context. Each step decodes
the next token of every sequence that is generating in one batch, then prompt
pieces of newcomers within a budget (`_pieces_to_prefill`), so a long prompt never
stalls the running streams for more than a few chunks. After each `llama_decode`,
every sequence that got logits samples its next token with its own sampler. The
running streams' tokens go to the event loop before the step computes prompts, the
newcomers' first tokens at the end of the step: a stream then goes on at the pace
of the steps from its first token, without a pause after it while the step's
other prompts are computed.

Determinism. Prompts are prefilled in pieces cut by the tokens alone (`chunks.py`:
whole chunks from the start of each turn, then the turn's tail), each piece in a
llama_decode of its own, and a cached prefix is
reused only where its chunks are the newcomer's own. With `loose` shapes (the
engine's CPU backend), a tail is computed in pieces padded to shapes whose rows get
the same numbers however the text is cut, so a cached tail is reused up to any
token. So a prompt always gets the same numbers: the same greedy request on an
otherwise idle server gives the same text, with or without prefix reuse, even when
the prefix was computed while other sequences generated. (llama.cpp's
numbers for a token depend on the pass that computed it: in a batch shared with
other sequences its kernels take other paths, so generated tokens under load can
change slightly, as with any batching server.)

Prefix reuse. A finished sequence leaves its cache in its slot. A newcomer
takes the free slot whose cache shares the most chunks with its prompt;
when that prefix sits in a running sequence, the cache is copied whole (a
partial copy asserts on a split cache) and trimmed.

Conversations. A finished answer's tokens were computed one step at a time (or
in speculative batches), so their numbers differ slightly from the same tokens
in prompt pieces, and reusing them would make a greedy text depend on what the
cache held before. Two things make them prompt-like. A lone stream catches up as
it goes (`_catching_up`): every 8 tokens, its step computes the tokens since its
last exact one again, with its next token, as one loose piece (and a drafting step
whose rows make a loose shape with them, padded by at most 3 rows, computes them
with its draft that way), so a turn sent right after the answer reuses all but its
last few tokens. And once the engine has
been idle for `IDLE_BEFORE_RECOMPUTE`, it computes the latest answer again as
prompt pieces, up to where the next turn's marker would start, one piece a step
(`canonicalize`): the next turn then reuses it exactly as if it had been prompt,
and computes only its own new text. With `reuse_generated`, any shared prefix
is reused as it is, generated tokens included (a conversation's next turn
computes only its new text at once, as llama-server does), at the price of that
determinism.

Speculation (`speculation.py`). A greedy sequence may verify a draft of tokens
looked up in its own prompt and text: its step carries the sampled token plus the
draft, each row with logits; the agreed prefix of the draft is kept, the rest
trimmed from the cache, and the model's token after the last agreed one is
decoded next step.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from tcserve.core.request import EngineEvent, Finished, FinishReason, GenerationRequest, TextDelta
from tcserve.core.stops import StopMatch, StopMatcher
from tcserve.engines.llamacpp.chunks import (
    Loose,
    Segment,
    add_piece,
    answer_end,
    cut_at,
    exact_end,
    piece_end,
    segments,
    shared_end,
    tail_start,
)
from tcserve.engines.llamacpp.model import Model
from tcserve.engines.llamacpp.sampling import Sampler
from tcserve.engines.llamacpp.speculation import (
    CALIBRATION_ROWS,
    MAX_DRAFT,
    Acceptance,
    NgramDrafts,
    Pass,
    StepCosts,
    agreeing,
    plan_drafts,
    predicted_seconds,
    ubatches,
)
from tcserve.errors import EngineFailure, Overloaded

log = logging.getLogger("tcserve.llamacpp")

IDLE_BEFORE_RECOMPUTE = 0.2
"""Seconds the engine waits idle before it recomputes cached answers (`canonicalize`):
a request that arrives while a chunk is computed waits for that chunk."""

LOOSE_PROBE = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 4
"""The text `check_loose` computes in three cuts."""

FEWEST_DRAFT_ROWS = 9
"""Logit rows a step's drafts and sampled tokens may take when the slots are fewer: a
lone stream of the 8-slot default drafts up to 8 tokens; with 16 slots, up to
`MAX_DRAFT` (the rows llama.cpp holds for the slots anyway)."""

CATCH_UP_AFTER = 7
"""Answer tokens a lone stream computes as it goes before it computes them again as
one loose piece (with its next token: 8 rows, the fewest of a loose shape)."""
DRAFT_PADDING = 3
"""Throwaway rows a lone stream's drafting step may take to make a loose shape: a row
without logits costs less than half a drafted row (Gemma 3 270M, 2 threads: about 3
ms against 7), and the step then makes the tokens behind and its agreed drafts
exact (`Scheduler._catching_up`)."""
BURST_BUDGET = 4
"""How many times its budget a step may prefill when newcomers outnumber the
generating streams (`Scheduler._pieces_to_prefill`)."""
CATCH_UP_AT_MOST = 24
"""A stream that fell further behind (drafts of shapes that are not loose were
accepted) stops catching up: a long piece in a step costs the stream's next token,
and the idle recompute remains."""

Outcome = EngineEvent | BaseException
Deliver = Callable[[list[tuple["Job", Outcome]]], None]
"""Hands one step's events to the event loop; must be thread-safe."""


@dataclass(eq=False)
class Job:
    """One request inside the scheduler."""

    request: GenerationRequest
    sampler: Sampler
    channel: Any
    """Where the engine facade delivers this job's events (opaque here)."""
    cancelled: bool = False
    """Set from the event loop when the consumer is gone; read at the next step."""
    prompt: list[int] = field(default_factory=list)
    plan: list[Segment] = field(default_factory=list)
    """How the prompt is computed (`chunks.segments`)."""
    slot: Slot | None = None
    position: int = 0
    """Tokens of this job in its slot's cache (prefill progress, then n_past)."""
    pending: int | None = None
    """The sampled token that the next step decodes."""
    produced: int = 0
    last: int | None = None
    """The last token streamed."""
    admitted: int = 0
    """Order of arrival in a slot: the oldest prompt is prefilled first."""
    utf8: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    drafts: NgramDrafts | None = None
    """The prompt's and the text's n-grams, for speculation (greedy requests only)."""
    acceptance: Acceptance = field(default_factory=Acceptance)
    catching_up: bool = True
    """Whether the answer's tokens are still computed again as loose pieces as it goes."""
    stops: StopMatcher = field(init=False)
    """The request's stop sequences, found in the text as it is streamed."""

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.request.stop_sequences)


class Lookup(NamedTuple):
    """A generating job's n-gram proposal for one step, and how many of its tokens the
    step verifies as a draft (often none: drafting did not pay)."""

    proposal: list[int]
    verified: int = 0

    @property
    def draft(self) -> list[int]:
        return self.proposal[: self.verified]


@dataclass(eq=False)
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)
    """What this sequence's cache holds, position by position."""
    done: list[Segment] = field(default_factory=list)
    """How the leading cached tokens were computed as prompt pieces: whole chunks,
    each alone in its batch after the ones before, and loose runs (not used with
    `reuse_generated`: then every cached token counts)."""
    job: Job | None = None
    recompute: list[int] = field(default_factory=list)
    """The latest finished sequence's prompt and answer, up to where a next turn would
    start: computed again as prompt chunks when the engine is idle, so that a
    conversation's next turn reuses the answer too (`canonicalize`)."""

    @property
    def reusable(self) -> int:
        """Leading tokens computed as prompt pieces."""
        return exact_end(self.done)


@dataclass
class Stats:
    waiting: int = 0
    running: int = 0
    generated_tokens: int = 0
    reused_tokens: int = 0
    steps: int = 0
    recomputed_tokens: int = 0
    """Cached tokens computed again as prompt pieces: while the engine was idle, or
    catching up with a lone stream's answer."""
    drafted_tokens: int = 0
    accepted_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        model: Model,
        deliver: Deliver,
        *,
        slots: int,
        chunk: int,
        prefill_budget: int,
        prefix_cache: bool = True,
        reuse_generated: bool = False,
        turn_marker: Sequence[int] = (),
        loose: Loose | None = None,
        speculative: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._model = model
        self._deliver = deliver
        self._chunk = chunk
        self._marker = tuple(turn_marker)
        """The tokens that open a turn; each turn's prompt chunks start at its marker."""
        self._loose = loose
        """Batch shapes whose numbers do not depend on the cut: each turn's tail is then
        computed in loose pieces, and a lone stream's answer catches up as it goes."""
        if prefill_budget < chunk:
            raise ValueError("the prefill budget must hold a whole chunk: a chunk must always fit in a step")
        self._prefill_budget = prefill_budget
        self._prefix_cache = prefix_cache
        self._reuse_generated = reuse_generated
        self._speculative = speculative
        self._costs = StepCosts()
        self._clock = clock
        """Times decode steps, for the cost model (tests give the fake model's own clock)."""
        self._slots = [Slot(i) for i in range(slots)]
        self._inbox: deque[Job] = deque()
        self._waiting: deque[Job] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._outbox: list[tuple[Job, Outcome]] = []
        self._admitted = 0
        self.stats = Stats()

    # -- called from the event loop -------------------------------------------------

    def submit(self, job: Job) -> None:
        self._inbox.append(job)  # deque.append is atomic
        self._wake.set()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    # -- the worker thread ------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                if self.step() or self._wake.wait(IDLE_BEFORE_RECOMPUTE):
                    continue
                if not self.canonicalize():
                    self._wake.wait()
        except BaseException as error:  # a bug here must not leave requests hanging
            log.exception("the batching scheduler stopped")
            self._fail_everyone(error)
            raise
        self._fail_everyone(Overloaded("The server is shutting down", retry_after=1.0))

    def calibrate(self, rounds: int = 2) -> None:
        """Before any request, on slot 0: check the loose shapes (`check_loose`), and time
        the small batches that speculation chooses between (`StepCosts`): the fastest of
        `rounds` timings of each size, after one decode that pages the weights in."""
        self.check_loose()
        if not self._speculative:
            return
        model, token = self._model, self._model.vocab.tokenize("a")[-1]

        def timed(rows: int) -> float:
            model.batch.clear()
            for position in range(rows):
                model.batch.add(token, position, 0, True)
            started = self._clock()
            status = model.decode()
            elapsed = self._clock() - started
            model.forget(0)
            model.batch.clear()
            if status != 0:
                raise EngineFailure(f"llama_decode returned {status} while timing a {rows}-row batch")
            return elapsed

        timed(1)
        sizes = [rows for rows in CALIBRATION_ROWS if rows <= self._step_rows]  # no step has more
        self._costs.calibrate({rows: min(timed(rows) for _ in range(rounds)) for rows in sizes})

    def check_loose(self) -> None:
        """Check that this build of llama.cpp gives a token the same numbers in loose
        pieces however a text is cut (three cuts of a short text, compared bit for
        bit); if not, tails are computed as chunks, as without loose shapes."""
        loose = self._loose
        if loose is None:
            return
        model = self._model
        tokens = model.vocab.tokenize(LOOSE_PROBE)[: 3 * loose.fewest + 1]
        if len(tokens) + loose.fewest > model.slot_context:
            self._loose = None  # no room for a padded piece: tails are computed as chunks
            return

        def logits_after(pieces: list[int]) -> bytes:
            """A digest of the last token's logits (a copy of Gemma's would be 1 MiB)."""
            position = 0
            for size in [*pieces, 1]:  # the last token alone, its logits at batch index 0
                model.batch.clear()
                for offset in range(loose.rows(size)):
                    at = position + offset
                    model.batch.add(tokens[at] if offset < size else tokens[0], at, 0, at == len(tokens) - 1)
                status = model.decode()
                position += size
                model.forget(0, position)
                if status != 0:
                    raise EngineFailure(f"llama_decode returned {status} while checking the loose shapes")
            digest = hashlib.blake2b(np.ascontiguousarray(model.logits(0)).data).digest()
            model.forget(0)
            model.batch.clear()
            return digest

        if len(tokens) != 3 * loose.fewest + 1:
            return  # a vocabulary whose tokens are long: keep the shapes, nothing to compare
        cuts = [[3 * loose.fewest], [loose.fewest] * 3, [1, 3 * loose.fewest - 1]]
        reference, *others = (logits_after(cut) for cut in cuts)
        if any(other != reference for other in others):
            log.warning(
                "this llama.cpp build gives a token other numbers in differently cut pieces: turn tails are "
                "computed as chunks, and answers are reused only after the idle recompute"
            )
            self._loose = None

    def step(self) -> bool:
        """One round of the worker loop: take newcomers, drop the cancelled, fill free
        slots and decode one batch. False when no slot had work (nothing was decoded).
        Only `run` calls it in the server; tests call it directly, one step at a time."""
        self._take_inbox()
        self._drop_cancelled()
        self._assign_slots()
        self._update_stats()
        if not any(slot.job for slot in self._slots):
            return False
        self._decode_step()
        return True

    def canonicalize(self) -> bool:
        """On an idle engine, compute the next chunk of a free slot's cached answer
        again as a prompt chunk: cut as a prompt that holds the answer is cut, alone
        in its batch, after a prefix that was computed the same way. A prompt that
        contains the answer then reuses those tokens and gets exactly the numbers it
        would have computed itself, so the same greedy request gives the same text
        whatever the cache held before. False when there is nothing to do (or the
        engine is not idle)."""
        if self._inbox or self._waiting or any(slot.job for slot in self._slots):
            return False
        slot = next((s for s in self._slots if s.recompute), None)
        return slot is not None and self._recompute_chunk(slot)

    def _recompute_chunk(self, slot: Slot) -> bool:
        """Compute the slot's next chunk to recompute; False when it has none."""
        wanted = self._plan(slot.recompute)
        start = shared_end(slot.done, wanted, len(slot.recompute))
        if start == len(slot.recompute) or not self._can_go_on_from(slot, start):
            slot.recompute = []  # done, or the answer outgrew the sliding window
            return False
        end = piece_end(wanted, start, self._loose)
        loose = next(s for s in wanted if s.start <= start < s.end).loose
        chunk = slot.recompute[start:end]
        model = self._model
        model.forget(slot.index, start)
        del slot.tokens[start:]
        slot.done = cut_at(slot.done, start)
        model.batch.clear()
        for offset, token in enumerate(chunk):
            model.batch.add(token, start + offset, slot.index, False)
        padded = loose and self._pad(slot, end, len(chunk), chunk[-1])
        status = model.decode()
        self.stats.steps += 1
        if status != 0:
            log.warning("llama_decode returned %d while recomputing a cached answer; its cache is dropped", status)
            self._release(slot, forget=True)
            return True
        model.forget(slot.index, end)  # the padding rows
        slot.tokens.extend(chunk)
        if not loose or padded:
            add_piece(slot.done, Segment(start, end, loose))
        self.stats.recomputed_tokens += len(chunk)
        return True

    def _plan(self, tokens: Sequence[int]) -> list[Segment]:
        return segments(tokens, self._chunk, self._marker, loose=self._loose is not None)

    def _pad(self, slot: Slot, end: int, rows: int, token: int) -> bool:
        """Add throwaway rows (of `token`) at `end` on, after the `rows` rows of the slot's
        piece, so that the piece has a loose shape; False when the context has no room.
        The caller drops them from the cache after the decode."""
        assert self._loose is not None
        extra = self._loose.rows(rows) - rows
        if end + extra > self._model.slot_context:
            return False
        for offset in range(extra):
            self._model.batch.add(token, end + offset, slot.index, False)
        return True

    def _take_inbox(self) -> None:
        while self._inbox:
            job = self._inbox.popleft()
            ids = job.request.tokens.ids  # tokenized once, by the engine's `tokenize`
            job.prompt = list(ids) if ids is not None else self._model.vocab.tokenize(job.request.prompt)
            job.plan = self._plan(job.prompt)
            if 0 < len(job.prompt) < self._model.slot_context:
                if self._speculative and job.request.sampling.greedy:
                    job.drafts = NgramDrafts(job.prompt)
                self._waiting.append(job)
            else:  # the API checks this first; a batch must never carry an impossible sequence
                self._fail(job, EngineFailure(f"a prompt of {len(job.prompt)} tokens cannot be decoded"))
        self._flush()

    def _drop_cancelled(self) -> None:
        self._waiting = deque(job for job in self._waiting if not job.cancelled)
        for slot in self._slots:
            if slot.job is not None and slot.job.cancelled:
                self._release(slot)

    def _assign_slots(self) -> None:
        while self._waiting and any(slot.job is None for slot in self._slots):
            job = self._waiting.popleft()
            slot, keep = self._choose_slot(job)
            slot.job, job.slot, job.position = job, slot, keep
            self._admitted += 1
            job.admitted = self._admitted
            self.stats.reused_tokens += keep

    def _choose_slot(self, job: Job) -> tuple[Slot, int]:
        """The slot for a newcomer and how many cached prompt tokens it keeps."""
        # The lowest free slot: running sequences then sit in consecutive slots, and
        # llama.cpp decodes a batch of a split cache in one pass over the weights per run
        # of consecutive sequence ids (`speculation.ubatches`; measured on 2 threads,
        # Gemma 3 270M: 4 sequences decode in 29 ms a step in slots 0-3, in 74 ms in
        # slots 0, 4, 8 and 12).
        target = next(slot for slot in self._slots if slot.job is None)
        source, keep = target, 0
        if self._prefix_cache:
            best, most = max(((s, self._reusable(s, job)) for s in self._slots), key=lambda pair: pair[1])
            if most and best.job is None:
                source = target = best
            elif most:
                source = best
                self._model.copy(source.index, target.index)
            keep = most
        self._model.forget(target.index, keep)
        target.tokens = source.tokens[:keep]
        target.done = cut_at(source.done, keep)
        target.recompute = []
        return target, keep

    def _reusable(self, slot: Slot, job: Job) -> int:
        # At least the prompt's last token must be computed again: its logits are needed.
        prompt = job.prompt
        cached = len(slot.tokens) if self._reuse_generated else slot.reusable
        limit = min(cached, len(prompt) - 1)
        same = 0
        while same < limit and slot.tokens[same] == prompt[same]:
            same += 1
        keep = same if self._reuse_generated else shared_end(slot.done, job.plan, same)
        return keep if self._can_go_on_from(slot, keep) else 0

    def _can_go_on_from(self, slot: Slot, position: int) -> bool:
        """Whether the slot's cache still holds the window a token at `position` attends
        to (sliding-window layers drop older tokens as a sequence grows)."""
        window = self._model.window
        return not window or position == 0 or max(0, position - window) >= self._model.earliest(slot.index)

    def _decode_step(self) -> None:
        running = [slot.job for slot in self._slots if slot.job is not None]
        generating = [job for job in running if job.pending is not None]
        pieces = self._pieces_to_prefill(running, len(generating))
        # Speculate only in steps that decode generated tokens alone: a step that
        # prefills is compute-bound already.
        lookups = self._plan_drafts(generating) if not pieces else [Lookup([]) for _ in generating]
        started = self._clock()
        passes = self._decode_generated(generating, lookups) if generating else []
        self._flush()  # the running streams' tokens go out while the prompts are computed
        # Each prompt piece is a llama_decode of its own. In a shared batch llama.cpp puts
        # a piece's first rows in one pass with the neighbouring slots' rows, and a
        # token's numbers depend on the pass that computed it: a cached prefix would then
        # depend on what ran beside it, and a later request reusing it would not get
        # the text it gets on an idle server (measured: logits apart by up to 1.35).
        for job, _ in pieces:
            if job.slot is not None and job.slot.job is job:  # not failed at an earlier piece
                self._decode_chunk(job)
        self.stats.steps += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "step %d: %d generating with %d drafted (passes %s), %d prompt tokens in %d pieces, %.1f ms",
                self.stats.steps,
                len(generating),
                sum(lookup.verified for lookup in lookups),
                passes,
                sum(size for _, size in pieces),
                len(pieces),
                (self._clock() - started) * 1000,
            )
        self._flush()

    def _pieces_to_prefill(self, running: list[Job], generating: int) -> list[tuple[Job, int]]:
        """The prompt pieces this step computes, in order, with their sizes: the oldest
        prompt's pieces first, as many as the budget holds, then the next prompt's.

        The budget bounds how long the step makes the generating streams wait. When
        newcomers outnumber them, it grows with the ratio, up to `BURST_BUDGET` times:
        a burst that arrives while one stream runs is then taken in one step, where
        splitting it would keep its last prompts waiting a whole step more, with
        every stream's next token (measured at 16 clients, 17-token prompts, budget
        240: 15 prompts in one step and the 16th 170-250 ms later, which made the
        c=16 TTFT p99)."""
        prefilling = sorted((job for job in running if job.position < len(job.prompt)), key=lambda j: j.admitted)
        ratio = len(prefilling) // max(generating, 1)
        budget = self._prefill_budget * min(BURST_BUDGET, max(ratio, 1))
        pieces: list[tuple[Job, int]] = []
        for job in prefilling:
            position = job.position
            while position < len(job.prompt):
                size = piece_end(job.plan, position, self._loose) - position
                if size > budget:
                    return pieces  # first come, first served: no overtaking by shorter prompts
                pieces.append((job, size))
                budget -= size
                position += size
        return pieces

    def _decode_generated(self, generating: list[Job], lookups: list[Lookup]) -> list[Pass]:
        """Decode every generating job's sampled token (and its draft) in one batch and
        take the tokens that come out. Returns the rows of llama.cpp's passes."""
        self._model.batch.clear()
        exact_from = self._catching_up(generating, lookups)
        if exact_from is not None:
            self._add_catch_up(generating[0], exact_from)
        pairs = zip(generating, lookups, strict=True)
        verifying = [(job, lookup, self._add_generated(job, lookup.draft)) for job, lookup in pairs]
        if exact_from is not None:
            job = generating[0]
            assert job.slot is not None
            fed = job.position
            self._pad(job.slot, fed, fed - exact_from, job.slot.tokens[-1])  # `_catching_up` checked the room
        rows = [(self._slot_of(job), len(indexes)) for job, _, indexes in verifying]
        passes = ubatches(rows)
        plain = planned = None
        if len(generating) > 1 and any(lookup.verified for lookup in lookups):  # what the drafts were to add
            plain = predicted_seconds([(slot, 1) for slot, _ in rows], self._costs)
            planned = predicted_seconds(rows, self._costs)
        started = self._clock()
        status = self._model.decode()
        if status != 0:
            self._fail_batch(generating, status)
            return passes
        elapsed = self._clock() - started
        if exact_from is not None:
            slot = generating[0].slot
            assert slot is not None
            self._model.forget(slot.index, fed)  # the padding rows
            add_piece(slot.done, Segment(exact_from, fed, True))  # `_verify` cuts it where a draft went wrong
            self.stats.recomputed_tokens += fed - exact_from - rows[0][1]  # the rows before the sampled token
        for job, lookup, indexes in verifying:
            self._verify(job, lookup, indexes)
        if len(passes) == 1 and exact_from is None:  # what one pass of that shape costs
            self._costs.record(passes[0].rows, passes[0].sequences, elapsed)
        if plain is not None and planned is not None:
            self._costs.record_shared_drafts(planned - plain, elapsed - plain)
        return passes

    def _catching_up(self, generating: list[Job], lookups: list[Lookup]) -> int | None:
        """Where this step makes a lone stream's answer exact (computes it as a loose
        piece, from the slot's last exact token on), or None.

        An answer's tokens come out of steps of one row (or a few), shapes whose numbers
        differ from a prompt's. A lone stream that fell `CATCH_UP_AFTER` tokens behind its
        last exact one computes them again in this step, with its next token, as one
        loose piece (the cache drops them first: llama.cpp wants a sequence's positions
        in order), so a conversation's next turn sent right after the answer reuses it
        as if it had been prompt. A step that verifies a draft has rows enough already:
        when the tokens behind (at most `CATCH_UP_AFTER`), its sampled token and its draft
        make a loose shape with at most `DRAFT_PADDING` throwaway rows, they are computed
        as one loose piece, and the draft's agreed tokens are exact as they come. A
        stream beside others is not caught up (its rows would share llama.cpp's passes
        with theirs), nor an answer whose turn grew into whole chunks."""
        loose = self._loose
        if loose is None or not self._prefix_cache or self._reuse_generated:
            return None
        if len(generating) != 1 or not generating[0].catching_up:
            return None
        job = generating[0]
        slot = job.slot
        assert slot is not None and job.pending is not None
        start = slot.reusable
        behind = job.position - start
        drafted = lookups[0].verified
        rows = behind + 1 + drafted
        padding = loose.rows(rows) - rows
        if drafted:
            if behind > CATCH_UP_AFTER or padding > DRAFT_PADDING or rows + padding > loose.most:
                return None
        elif behind < CATCH_UP_AFTER:
            return None
        elif behind > CATCH_UP_AT_MOST:
            job.catching_up = False
            return None
        if job.position + 1 + drafted + padding > self._model.slot_context:
            return None
        if start < tail_start([*slot.tokens, job.pending], self._chunk, self._marker):
            job.catching_up = False
            return None
        return start

    def _add_catch_up(self, job: Job, start: int) -> None:
        """Add the job's cached tokens from `start` on again, without logits."""
        slot = job.slot
        assert slot is not None
        self._model.forget(slot.index, start)
        for position in range(start, job.position):
            self._model.batch.add(slot.tokens[position], position, slot.index, False)

    def _decode_chunk(self, job: Job) -> None:
        self._model.batch.clear()
        indexes = self._add_chunk(job)
        status = self._model.decode()
        if status != 0:
            self._fail_batch([job], status)
            return
        assert job.slot is not None
        self._model.forget(job.slot.index, job.position)  # the padding rows of a loose piece
        for index in indexes:
            self._accept(job, self._sample(job, index))

    def _plan_drafts(self, generating: list[Job]) -> list[Lookup]:
        """Each generating job's lookup for this step, verified as far as the measured
        step costs say it pays (most steps: not at all)."""
        proposals = [job.drafts.propose(self._draft_limit(job)) if job.drafts else [] for job in generating]
        if not any(proposals):
            return [Lookup(proposal) for proposal in proposals]
        offers = [job.acceptance.chances(len(draft)) for job, draft in zip(generating, proposals, strict=True)]
        # llama.cpp keeps a logit row for each of its sequences, and a step that wants more
        # grows that buffer for good (1 MiB a row on Gemma): drafts fill the rows of the
        # sequences that are not generating (and at least FEWEST_DRAFT_ROWS with few slots).
        room = self._step_rows - len(generating)
        plan = plan_drafts([self._slot_of(job) for job in generating], offers, self._costs, room)
        return [Lookup(proposal, count) for proposal, count in zip(proposals, plan, strict=True)]

    @property
    def _step_rows(self) -> int:
        """The most logit rows a step of generated tokens (and their drafts) takes."""
        return max(len(self._slots), FEWEST_DRAFT_ROWS)

    def _draft_limit(self, job: Job) -> int:
        return min(
            MAX_DRAFT,
            job.request.max_tokens - job.produced - 1,  # the step yields drafts + 1 tokens
            self._model.slot_context - 1 - job.position,  # the drafts' positions must fit the slot
        )

    @staticmethod
    def _slot_of(job: Job) -> int:
        assert job.slot is not None
        return job.slot.index

    def _add_generated(self, job: Job, draft: list[int]) -> list[int]:
        """Add the job's sampled token and its draft; every row wants logits. Returns their batch indexes."""
        assert job.slot is not None and job.pending is not None
        feed = [job.pending, *draft]
        indexes = [
            self._model.batch.add(token, job.position + offset, job.slot.index, True)
            for offset, token in enumerate(feed)
        ]
        job.slot.tokens.extend(feed)
        job.position += len(feed)
        job.pending = None
        return indexes

    def _verify(self, job: Job, lookup: Lookup, indexes: list[int]) -> None:
        """Take the model's token at each drafted position while the draft agrees with
        it: the agreed draft tokens are in the cache already, the rest is dropped, and
        the model's token after the last agreed one is decoded next step."""
        draft = lookup.draft
        tokens = []
        for offset, index in enumerate(indexes):
            token = self._sample(job, index)
            tokens.append(token)
            if offset == len(draft) or token != draft[offset]:
                break
        job.acceptance.learn(len(lookup.proposal), len(draft), agreeing(lookup.proposal, tokens))
        if draft:
            agreed = len(tokens) - 1
            self.stats.drafted_tokens += len(draft)
            self.stats.accepted_tokens += agreed
            if agreed < len(draft):
                assert job.slot is not None
                kept = job.position - len(draft) + agreed  # the sampled token and the agreed drafts
                self._model.forget(job.slot.index, kept)
                del job.slot.tokens[kept:]
                job.slot.done = cut_at(job.slot.done, kept)
                job.position = kept
        for token in tokens[:-1]:
            if not self._emit(job, token):
                return
        self._accept(job, tokens[-1])

    def _next_chunk_size(self, job: Job) -> int:
        return piece_end(job.plan, job.position, self._loose) - job.position

    def _add_chunk(self, job: Job) -> list[int]:
        """Add the job's next prompt piece (a loose one padded to its shape). Returns
        the batch index of the prompt's last token when this piece ends the prompt
        (its logits give the first generated token), else nothing."""
        slot = job.slot
        assert slot is not None
        start = job.position
        end = start + self._next_chunk_size(job)
        last = len(job.prompt) - 1
        indexes = [
            self._model.batch.add(job.prompt[position], position, slot.index, position == last)
            for position in range(start, end)
        ]
        loose = next(s for s in job.plan if s.start <= start < s.end).loose and self._loose is not None
        exact = not loose or self._pad(slot, end, end - start, job.prompt[end - 1])
        slot.tokens.extend(job.prompt[start:end])
        if exact and slot.reusable == start:
            add_piece(slot.done, Segment(start, end, loose))
        job.position = end
        return [indexes[-1]] if end == len(job.prompt) else []

    def _sample(self, job: Job, index: int) -> int:
        return job.sampler(self._model.logits(index))

    def _accept(self, job: Job, token: int) -> None:
        """Emit the token, and decode it next step unless the job ended."""
        if not self._emit(job, token):
            return
        if job.position >= self._model.slot_context:
            # Never reached when the API checked prompt + max_tokens against the context.
            self._fail(job, EngineFailure(f"sequence reached the end of its {job.position}-token context"))
        else:
            job.pending = token

    def _emit(self, job: Job, token: int) -> bool:
        """Stream one generated token; False when it ended the job."""
        vocab = self._model.vocab
        if vocab.is_end(token):
            self._finish(job, "end_of_sequence")
            return False
        job.produced += 1
        job.last = token
        self.stats.generated_tokens += 1
        if job.drafts is not None:
            job.drafts.extend((token,))
        # One delta per token, even while its text is an incomplete UTF-8 character: the
        # deltas' count is the request's output tokens.
        text = job.utf8.decode(vocab.piece(token))
        self._outbox.append((job, TextDelta(text)))
        if isinstance(stop := job.stops.feed(text), StopMatch):
            # The service's own matcher finds the same stop in the same text and ends the
            # response there; stopping here spares the step it would take to cancel the
            # job, which a conversation's next turn, sent at once, would wait for.
            self._finish(job, "stop_sequence", stop.stop)
            return False
        if job.produced >= job.request.max_tokens:
            self._finish(job, "max_tokens")
            return False
        return True

    def _finish(self, job: Job, reason: FinishReason, stop: str | None = None) -> None:
        if tail := job.utf8.decode(b"", final=True):
            self._outbox.append((job, TextDelta(tail, tokens=0)))
        self._outbox.append((job, Finished(reason, stop)))
        assert job.slot is not None
        self._release(job.slot)

    def _fail(self, job: Job, error: BaseException) -> None:
        self._outbox.append((job, error))
        if job.slot is not None:
            self._release(job.slot, forget=True)

    def _fail_batch(self, jobs: list[Job], status: int) -> None:
        log.error("llama_decode failed with status %d; failing the %d sequences of the batch", status, len(jobs))
        for job in jobs:
            self._fail(job, EngineFailure(f"llama_decode returned {status}"))

    def _release(self, slot: Slot, *, forget: bool = False) -> None:
        """Free the slot for the next request; its cache stays for prefix reuse
        unless it can no longer be trusted."""
        job, slot.job = slot.job, None
        if forget:
            self._model.forget(slot.index)
            slot.tokens, slot.done, slot.recompute = [], [], []
        elif self._prefix_cache and not self._reuse_generated and job is not None and job.produced:
            # Only the latest answer waits for the idle engine: after a burst, recomputing
            # every answer kept the engine busy for seconds, and each request arriving
            # meanwhile waited for a chunk (measured after a c=16 burst, a conversation's
            # turn 5 after a 1 s pause: 193 ms to the first token, 81 with this).
            for other in self._slots:
                other.recompute = []
            slot.recompute = self._turn_so_far(slot, job)

    def _turn_so_far(self, slot: Slot, job: Job) -> list[int]:
        """The job's prompt and the tokens it streamed, up to where a next turn's
        marker would start: what a conversation's next prompt begins with. The cache
        holds a little more after speculation (drafts past a stop) and lacks the last
        streamed token when nothing decoded it."""
        size = len(job.prompt)
        turn = slot.tokens[:size]
        if job.produced and job.last is not None:
            turn += [*slot.tokens[size:], job.last][: job.produced]
        return turn[: answer_end(turn, size, self._marker)]

    def _fail_everyone(self, error: BaseException) -> None:
        jobs = [*self._inbox, *self._waiting, *(s.job for s in self._slots if s.job is not None)]
        self._inbox.clear()
        self._waiting.clear()
        for job in jobs:
            self._outbox.append((job, error))
        for slot in self._slots:
            slot.job = None
        self._flush()

    def _flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self._deliver(outbox)

    def _update_stats(self) -> None:
        self.stats.waiting = len(self._waiting) + len(self._inbox)
        self.stats.running = sum(1 for slot in self._slots if slot.job is not None)
