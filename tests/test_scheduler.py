"""The batching scheduler on a fake model (tests/fake_model.py): its policies, without weights.

Most tests call `Scheduler.step` themselves, one step at a time, and look at what
each `decode` got; a few run `Scheduler.run` on a thread, as the engine does, and
wait on events with a bound. The fake's next token is a hash of its sequence's whole
cache, so "the text equals `reference(...)`" means the cache held exactly the prompt
and the generated tokens, whatever was reused or copied.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from fake_model import EOS, Entry, FakeModel, FakeVocab, NextToken, hashed, replying, token_of, tokens_of
from tcserve.core.request import Finished, GenerationRequest, SamplingParams, TextDelta
from tcserve.engines.llamacpp.chunks import CPU_LOOSE
from tcserve.engines.llamacpp.sampling import Sampler
from tcserve.engines.llamacpp.scheduler import BURST_BUDGET, CATCH_UP_AFTER, Job, Outcome, Scheduler
from tcserve.errors import EngineFailure, Overloaded

CHUNK = 4
MARKER = " Q:"
"""The fake conversations' turn marker."""
GREEDY = SamplingParams(temperature=0.0)
WAIT = 10.0
"""Bound on any wait for the scheduler's thread (it needs milliseconds)."""


def ending(outcomes: Sequence[Outcome], job: Job) -> tuple[str, int, int]:
    *deltas, last = outcomes
    assert isinstance(last, Finished), last
    return last.reason, len(job.prompt), sum(d.tokens for d in deltas if isinstance(d, TextDelta))


class Harness:
    """A scheduler over a fake model, with every hand-off it made."""

    def __init__(
        self,
        *,
        slots: int = 2,
        slot_context: int = 64,
        prefill_budget: int = 4 * CHUNK,
        next_token: NextToken = hashed,
        step_seconds: Callable[[int], float] = lambda rows: 0.01,
        window: int = 0,
        cells: int | None = None,
        chunk: int = CHUNK,
        **options: Any,
    ) -> None:
        self.model = FakeModel(
            slots=slots, slot_context=slot_context, next_token=next_token, step_seconds=step_seconds,
            window=window, cells=cells,
        )  # fmt: skip
        self.handoffs: list[list[tuple[Job, Outcome]]] = []
        self.scheduler = Scheduler(
            self.model, self.handoffs.append, slots=slots, chunk=chunk, prefill_budget=prefill_budget,
            clock=lambda: self.model.seconds, **options,
        )  # fmt: skip

    def submit(self, prompt: str, max_tokens: int = 6, sampling: SamplingParams = GREEDY) -> Job:
        job = Job(GenerationRequest("req_test", prompt, max_tokens, sampling), Sampler(sampling), channel=None)
        self.scheduler.submit(job)
        return job

    def run_until_idle(self, limit: int = 1000) -> None:
        for _ in range(limit):
            if not self.scheduler.step():
                return
        raise AssertionError(f"still busy after {limit} steps")

    def outcomes(self, job: Job) -> list[Outcome]:
        return [outcome for handoff in self.handoffs for owner, outcome in handoff if owner is job]

    def text(self, job: Job) -> str:
        return "".join(o.text for o in self.outcomes(job) if isinstance(o, TextDelta))

    def finished(self, job: Job) -> Finished:
        last = self.outcomes(job)[-1]
        assert isinstance(last, Finished), last
        return last

    def ending(self, job: Job) -> tuple[str, int, int]:
        """(finish reason, prompt tokens, output tokens: one per TextDelta token)."""
        return ending(self.outcomes(job), job)

    def positions(self, slot: int, batches: Sequence[list[Entry]] | None = None) -> list[int]:
        """Positions decoded for `slot`, in order."""
        batches = self.model.decoded if batches is None else batches
        return [entry.position for batch in batches for entry in batch if entry.slot == slot]


def reference(prompt: str, max_tokens: int, next_token: NextToken = hashed) -> str:
    """The text a fake model gives for `prompt` alone, computed without the scheduler."""
    vocab = FakeVocab()
    context, out = vocab.tokenize(prompt), b""
    for _ in range(max_tokens):
        token = next_token(context)
        if token == EOS:
            break
        out += vocab.piece(token)
        context.append(token)
    return out.decode("utf-8", errors="replace")


def prompt_length(prompt: str) -> int:
    return len(FakeVocab().tokenize(prompt))


# -- one sequence ---------------------------------------------------------------------


def test_a_prompt_is_prefilled_in_aligned_chunks_then_decoded_a_token_a_step() -> None:
    harness = Harness()
    job = harness.submit("hello world", max_tokens=3)  # BOS + 11 bytes = 12 tokens
    harness.run_until_idle()
    batches = [[(e.position, e.wants_logits) for e in batch] for batch in harness.model.decoded]
    assert batches == [
        [(0, False), (1, False), (2, False), (3, False)],
        [(4, False), (5, False), (6, False), (7, False)],
        [(8, False), (9, False), (10, False), (11, True)],  # logits for the prompt's last token only
        [(12, True)],
        [(13, True)],  # the third token is sampled but never decoded
    ]
    assert harness.text(job) == reference("hello world", 3)
    assert harness.ending(job) == ("max_tokens", 12, 3)


def test_the_end_of_sequence_token_ends_the_generation_unseen() -> None:
    harness = Harness(next_token=replying("hi"))
    job = harness.submit("Q: hello A:", max_tokens=10)
    harness.run_until_idle()
    assert [o.text for o in harness.outcomes(job) if isinstance(o, TextDelta) and o.text] == ["h", "i"]
    assert harness.ending(job) == ("end_of_sequence", prompt_length("Q: hello A:"), 2)


def test_a_character_split_across_tokens_arrives_whole() -> None:
    harness = Harness(next_token=replying("né€"))  # 1 + 2 + 3 bytes, one token each
    job = harness.submit("Q: A:", max_tokens=10)
    harness.run_until_idle()
    assert [o.text for o in harness.outcomes(job) if isinstance(o, TextDelta) and o.text] == ["n", "é", "€"]
    assert harness.ending(job)[2] == 6


def test_a_character_cut_by_max_tokens_ends_as_a_replacement_character() -> None:
    harness = Harness(next_token=replying("né€"))
    job = harness.submit("Q: A:", max_tokens=4)  # n, é, and the first byte of €
    harness.run_until_idle()
    assert [o.text for o in harness.outcomes(job) if isinstance(o, TextDelta) and o.text] == ["n", "é", "\ufffd"]
    assert harness.ending(job) == ("max_tokens", prompt_length("Q: A:"), 4)


# -- slot choice and prefix reuse -----------------------------------------------------


def test_a_newcomer_without_a_shared_prefix_takes_the_lowest_free_slot() -> None:
    harness = Harness(slots=3)
    jobs = [harness.submit(prompt, max_tokens=2 + 4 * i) for i, prompt in enumerate(("apple", "banana", "cherry"))]
    harness.run_until_idle()
    assert [job.slot.index for job in jobs if job.slot] == [0, 1, 2]
    first = harness.submit("date", max_tokens=30)
    harness.scheduler.step()
    second = harness.submit("elder", max_tokens=2)
    harness.run_until_idle()
    assert first.slot is not None and second.slot is not None
    assert (first.slot.index, second.slot.index) == (0, 1)  # consecutive: one pass over the weights a step
    for job, prompt in zip([*jobs, first, second], ("apple", "banana", "cherry", "date", "elder"), strict=True):
        assert harness.text(job) == reference(prompt, job.request.max_tokens)
    assert harness.scheduler.stats.reused_tokens == 0


def test_a_newcomer_takes_the_slot_that_shares_the_most_whole_chunks() -> None:
    harness = Harness(slots=3)
    harness.submit("abcdefgh-zero", max_tokens=2)  # together, so neither reuses the other: slot 0
    harness.submit("abcdefghijkl-one", max_tokens=6)  # slot 1
    harness.submit("zzzz", max_tokens=1)  # slot 2
    harness.run_until_idle()
    assert [len(tokens) for tokens in harness.model.caches] == [15, 22, 5]
    decoded_before = len(harness.model.decoded)
    # Shares BOS + "abcdefgh" (2 chunks) with slot 0, the lowest free slot, and
    # BOS + "abcdefghijkl-" (3 whole chunks of 14 tokens) with slot 1.
    job = harness.submit("abcdefghijkl-new")
    harness.run_until_idle()
    assert job.slot is not None and job.slot.index == 1
    assert harness.scheduler.stats.reused_tokens == 12
    assert harness.positions(1, harness.model.decoded[decoded_before:])[0] == 12
    assert harness.model.copies == []  # reused in place
    assert harness.text(job) == reference("abcdefghijkl-new", 6)


def test_the_same_prompt_again_computes_at_least_its_last_token() -> None:
    harness = Harness(slots=1)
    prompt = "abcdefghijk"  # 12 tokens: three whole chunks, all reusable
    first = harness.submit(prompt)
    harness.run_until_idle()
    decoded_before = len(harness.model.decoded)
    second = harness.submit(prompt)
    harness.run_until_idle()
    # Its last token's logits are needed, so the last chunk is computed again.
    assert harness.positions(0, harness.model.decoded[decoded_before:])[:4] == [8, 9, 10, 11]
    assert harness.scheduler.stats.reused_tokens == 8
    assert harness.text(second) == harness.text(first) == reference(prompt, 6)


def test_without_the_prefix_cache_nothing_is_reused() -> None:
    harness = Harness(slots=1, prefix_cache=False)
    prompt = "abcdefghijk"
    for _ in range(2):
        job = harness.submit(prompt)
        harness.run_until_idle()
        assert harness.text(job) == reference(prompt, 6)
    assert harness.scheduler.stats.reused_tokens == 0
    assert harness.positions(0).count(0) == 2


@pytest.mark.parametrize("reuse_generated", [False, True])
def test_a_conversation_reuses_whole_prompt_chunks_or_with_reuse_generated_everything(reuse_generated: bool) -> None:
    harness = Harness(slots=1, reuse_generated=reuse_generated)
    turn_1 = "Q: hi A:"  # 9 tokens: two whole chunks
    first = harness.submit(turn_1, max_tokens=6)
    harness.run_until_idle()
    turn_2 = f"{turn_1}{harness.text(first)} Q: more A:"
    second = harness.submit(turn_2, max_tokens=6)
    harness.run_until_idle()
    # The cache holds turn 1 and its answer but the last answer token (sampled, never decoded).
    expected = prompt_length(turn_1) + 6 - 1 if reuse_generated else 8
    assert harness.scheduler.stats.reused_tokens == expected
    assert harness.text(second) == reference(turn_2, 6)


def test_a_prefix_held_by_a_running_sequence_is_copied_then_trimmed() -> None:
    harness = Harness(slots=2)
    runner = harness.submit("abcdefghijklmnop-A", max_tokens=30)  # 19 tokens, 16 reusable
    while not harness.text(runner):
        harness.scheduler.step()
    newcomer = harness.submit("abcdefghijklmnop-B", max_tokens=6)
    harness.scheduler.step()
    assert newcomer.slot is not None and newcomer.slot.index == 1
    assert harness.model.copies == [(0, 1)]
    assert harness.positions(1)[0] == 16  # the copied cache, runner's generated tokens trimmed off
    harness.run_until_idle()
    assert harness.text(newcomer) == reference("abcdefghijklmnop-B", 6)
    assert harness.text(runner) == reference("abcdefghijklmnop-A", 30)  # undisturbed


# -- the prefill budget ---------------------------------------------------------------


def slots_and_positions(batches: Sequence[list[Entry]]) -> list[dict[int, list[int]]]:
    steps: list[dict[int, list[int]]] = []
    for batch in batches:
        step: dict[int, list[int]] = {}
        for entry in batch:
            step.setdefault(entry.slot, []).append(entry.position)
        steps.append(step)
    return steps


def test_a_budget_below_one_chunk_is_refused() -> None:
    """The engine raises a smaller budget to one chunk (once); the scheduler insists on it."""
    with pytest.raises(ValueError, match="whole chunk"):
        Harness(prefill_budget=CHUNK - 1)


def test_newcomers_are_prefilled_first_come_first_served_within_the_budget() -> None:
    """Beside two generating streams, two newcomers: the older prompt's pieces come
    first, several in one step as the budget allows (each a llama_decode of its own),
    and the younger prompt never overtakes it, even where it would fit."""
    harness = Harness(slots=4, prefill_budget=10)
    for prompt in ("xy", "uv"):
        harness.submit(prompt, max_tokens=20)
    harness.scheduler.step()  # both prompts (3 tokens each)
    harness.submit("abcdefghijklm", max_tokens=2)  # 14 tokens: chunks of 4, 4, 4 and 2
    harness.submit("z", max_tokens=2)  # 2 tokens
    before = len(harness.model.decoded)
    harness.scheduler.step()
    harness.scheduler.step()
    assert slots_and_positions(harness.model.decoded[before:]) == [
        {0: [3], 1: [3]},  # the running streams first: generated tokens do not count
        {2: [0, 1, 2, 3]},
        {2: [4, 5, 6, 7]},  # 2 tokens of the budget are left: "z" would fit, but waits
        {0: [4], 1: [4]},
        {2: [8, 9, 10, 11]},
        {2: [12, 13]},
        {3: [0, 1]},
    ]


def first_handoffs(harness: Harness, jobs: Sequence[Job]) -> list[int]:
    """The index of the hand-off that brought each job's first event."""
    return [
        next(n for n, handoff in enumerate(harness.handoffs) if any(owner is job for owner, _ in handoff))
        for job in jobs
    ]


def test_a_burst_beside_one_stream_is_prefilled_in_one_step_up_to_a_few_budgets() -> None:
    """Newcomers that outnumber the generating streams get a budget that grows with
    the ratio, up to BURST_BUDGET times: a burst that arrives beside one stream is
    not cut, where its last prompts would wait a step more. The running stream's
    token is handed off before the prompts are computed, their first tokens after."""
    harness = Harness(slots=10, prefill_budget=CHUNK)
    runner = harness.submit("ab", max_tokens=20)
    harness.scheduler.step()
    burst = [harness.submit(prompt, max_tokens=3) for prompt in ("cd", "ef", "gh", "ij", "kl", "mn", "op", "qr")]
    handed = len(harness.handoffs)
    harness.scheduler.step()  # 8 newcomers, 1 stream: BURST_BUDGET x 4 tokens = 16, five 3-token prompts
    assert [[owner for owner, _ in handoff] for handoff in harness.handoffs[handed:]] == [[runner], burst[:5]]
    for _ in range(3):  # the rest: 3 newcomers beside 6 streams, one budget (4 tokens) a step
        harness.scheduler.step()
    assert first_handoffs(harness, burst) == [handed + 1] * 5 + [handed + 3, handed + 5, handed + 7]
    harness.run_until_idle()
    assert all(harness.ending(job)[2] == 3 for job in burst)
    assert BURST_BUDGET == 4  # the arithmetic above


def test_a_burst_on_an_idle_engine_is_prefilled_in_one_step() -> None:
    """Nothing generates: the budget grows with the number of newcomers (up to
    BURST_BUDGET times)."""
    harness = Harness(slots=4, prefill_budget=CHUNK)
    jobs = [harness.submit(prompt, max_tokens=3) for prompt in ("ab", "cd", "ef", "gh")]  # 3 tokens each
    harness.scheduler.step()
    assert first_handoffs(harness, jobs) == [0, 0, 0, 0]
    assert len(harness.model.decoded) == 4
    harness.run_until_idle()
    assert all(harness.ending(job)[2] == 3 for job in jobs)


@pytest.mark.parametrize("seed", range(4))
def test_a_prompt_chunk_never_shares_a_batch_with_another_sequence(seed: int) -> None:
    """llama.cpp would compute a chunk's first rows in one pass with its neighbours' rows,
    and a cached prefix would then hold numbers that depend on what ran beside it."""
    rng = random.Random(seed)
    harness = Harness(slots=4, prefill_budget=3 * CHUNK)
    jobs = []
    for _ in range(12):
        prompt = "".join(rng.choice("abc") for _ in range(rng.randint(1, 5 * CHUNK)))
        jobs.append(harness.submit(prompt, max_tokens=rng.randint(1, 12)))
        for _ in range(rng.randint(0, 3)):
            harness.scheduler.step()
    harness.run_until_idle()
    prompt_rows = [batch for batch in harness.model.decoded if any(not entry.wants_logits for entry in batch)]
    assert len(prompt_rows) > 12  # the test does build batches with chunks
    assert all(len({entry.slot for entry in batch}) == 1 for batch in prompt_rows)
    for job in jobs:
        assert harness.text(job) == reference(job.request.prompt, job.request.max_tokens)


# -- cancellation ---------------------------------------------------------------------


def test_a_cancelled_sequence_frees_its_slot_at_the_next_step() -> None:
    harness = Harness(slots=1)
    runner = harness.submit("abcdefgh", max_tokens=40)
    waiting = harness.submit("abcdefgh and more", max_tokens=4)
    while not harness.text(runner):
        harness.scheduler.step()
    assert waiting.slot is None
    seen = len(harness.outcomes(runner))
    harness.scheduler.cancel(runner)
    harness.scheduler.step()
    assert waiting.slot is not None and waiting.slot.index == 0 and runner.slot is not None
    assert runner.slot.job is waiting
    harness.run_until_idle()
    assert len(harness.outcomes(runner)) == seen  # nothing more, not even a Finished
    assert harness.scheduler.stats.reused_tokens == 8  # a cancelled sequence's cache stays reusable
    assert harness.text(waiting) == reference("abcdefgh and more", 4)


def test_a_cancelled_newcomer_never_reaches_a_batch() -> None:
    harness = Harness(slots=1)
    runner = harness.submit("abc", max_tokens=5)
    queued = harness.submit("xyz", max_tokens=5)
    harness.scheduler.step()
    harness.scheduler.cancel(queued)
    harness.run_until_idle()
    assert harness.outcomes(queued) == []
    assert token_of(ord("x")) not in [e.token for batch in harness.model.decoded for e in batch]
    assert harness.ending(runner)[2] == 5
    assert harness.scheduler.stats.running == harness.scheduler.stats.waiting == 0


# -- context and failures -------------------------------------------------------------


def test_a_prompt_that_fills_the_context_fails_before_any_batch() -> None:
    harness = Harness(slots=2, slot_context=16)
    impossible = harness.submit("x" * 15)  # 16 tokens: no room for the prompt's logits
    largest = harness.submit("y" * 14, max_tokens=2)  # 15 tokens + 1 generated token decoded
    harness.run_until_idle()
    (failure,) = harness.outcomes(impossible)
    assert isinstance(failure, EngineFailure) and "16 tokens" in str(failure)
    assert impossible.slot is None
    assert token_of(ord("x")) not in [e.token for batch in harness.model.decoded for e in batch]
    assert harness.ending(largest) == ("max_tokens", 15, 2)


def test_a_sequence_that_runs_out_of_context_fails_alone() -> None:
    harness = Harness(slots=2, slot_context=16)
    overrun = harness.submit("abcdefghi", max_tokens=100)  # 10 tokens
    bystander = harness.submit("jkl", max_tokens=5)
    harness.run_until_idle()
    *deltas, failure = harness.outcomes(overrun)
    assert isinstance(failure, EngineFailure) and "context" in str(failure)
    assert len(deltas) == 16 - 10 + 1  # the token sampled at the last position is still sent
    assert max(harness.positions(0)) == 15  # never past the context (the fake would raise)
    assert harness.model.caches[0] == [] and overrun.slot is not None and overrun.slot.tokens == []
    assert harness.text(bystander) == reference("jkl", 5)


def test_a_failed_decode_fails_the_whole_batch_and_forgets_its_caches() -> None:
    harness = Harness(slots=2)
    first = harness.submit("abcdefgh one", max_tokens=20)
    second = harness.submit("abcdefgh two", max_tokens=20)
    queued = harness.submit("abcdefgh three", max_tokens=4)
    for _ in range(5):
        harness.scheduler.step()
    harness.model.fail_next = -3
    harness.scheduler.step()
    for job in (first, second):
        failure = harness.outcomes(job)[-1]
        assert isinstance(failure, EngineFailure) and "returned -3" in str(failure)
    assert harness.model.caches == [[], []]
    harness.run_until_idle()
    # The queued job shares two chunks with both, but nothing of a failed batch is trusted.
    assert harness.scheduler.stats.reused_tokens == 0
    assert harness.text(queued) == reference("abcdefgh three", 4)


# -- on its own thread, as in the engine ----------------------------------------------


class Recorder:
    """A thread-safe `deliver` that tells when a job's last outcome has arrived."""

    def __init__(self) -> None:
        self.outcomes: dict[int, list[Outcome]] = {}
        self._lock = threading.Lock()
        self._ended: dict[int, threading.Event] = {}
        self._started: dict[int, threading.Event] = {}

    def watch(self, job: Job) -> Job:
        self._ended[id(job)], self._started[id(job)] = threading.Event(), threading.Event()
        self.outcomes[id(job)] = []
        return job

    def __call__(self, outbox: list[tuple[Job, Outcome]]) -> None:
        with self._lock:
            for job, outcome in outbox:
                self.outcomes[id(job)].append(outcome)
                self._started[id(job)].set()
                if not isinstance(outcome, TextDelta):
                    self._ended[id(job)].set()

    def started(self, job: Job) -> bool:
        return self._started[id(job)].wait(WAIT)

    def ended(self, job: Job) -> bool:
        return self._ended[id(job)].wait(WAIT)


def threaded(model: FakeModel, recorder: Recorder, slots: int) -> tuple[Scheduler, threading.Thread]:
    scheduler = Scheduler(model, recorder, slots=slots, chunk=CHUNK, prefill_budget=CHUNK)
    thread = threading.Thread(target=scheduler.run, name="test-scheduler")
    thread.start()
    return scheduler, thread


def new_job(prompt: str, max_tokens: int) -> Job:
    return Job(GenerationRequest("req_test", prompt, max_tokens, GREEDY), Sampler(GREEDY), channel=None)


def test_the_worker_loop_serves_jobs_submitted_while_it_waits() -> None:
    recorder = Recorder()
    scheduler, thread = threaded(FakeModel(slots=2), recorder, slots=2)
    try:
        jobs = [recorder.watch(new_job(prompt, 5)) for prompt in ("one", "two", "three")]
        for job in jobs:
            scheduler.submit(job)
        assert all(recorder.ended(job) for job in jobs)
    finally:
        scheduler.stop()
        thread.join(WAIT)
    assert not thread.is_alive()
    for job, prompt in zip(jobs, ("one", "two", "three"), strict=True):
        *deltas, _ = recorder.outcomes[id(job)]
        assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == reference(prompt, 5)
        assert ending(recorder.outcomes[id(job)], job) == ("max_tokens", prompt_length(prompt), 5)


def test_cancelling_wakes_the_loop_and_the_slot_goes_to_the_next_job() -> None:
    endless = FakeModel(slots=1, slot_context=10**9, next_token=lambda _context: token_of(ord("a")))
    recorder = Recorder()
    scheduler, thread = threaded(endless, recorder, slots=1)
    try:
        runner = recorder.watch(new_job("go", 10**8))
        scheduler.submit(runner)
        assert recorder.started(runner)
        follower = recorder.watch(new_job("next", 3))
        scheduler.submit(follower)
        scheduler.cancel(runner)  # the only slot: the follower runs only once it is freed
        assert recorder.ended(follower)
    finally:
        scheduler.stop()
        thread.join(WAIT)
    assert ending(recorder.outcomes[id(follower)], follower) == ("max_tokens", prompt_length("next"), 3)
    assert all(isinstance(o, TextDelta) for o in recorder.outcomes[id(runner)])


def test_stopping_fails_running_and_waiting_jobs_as_overloaded() -> None:
    endless = FakeModel(slots=1, slot_context=10**9, next_token=lambda _context: token_of(ord("a")))
    recorder = Recorder()
    scheduler, thread = threaded(endless, recorder, slots=1)
    runner, queued = recorder.watch(new_job("go", 10**8)), recorder.watch(new_job("wait", 3))
    try:
        scheduler.submit(runner)
        scheduler.submit(queued)
        assert recorder.started(runner)
    finally:
        scheduler.stop()
        thread.join(WAIT)
    assert not thread.is_alive()
    for job in (runner, queued):
        assert isinstance(recorder.outcomes[id(job)][-1], Overloaded)


# -- recomputing cached answers as prompt chunks ---------------------------------------


def test_an_idle_engine_recomputes_a_cached_answer_as_prompt_chunks_up_to_the_next_turn() -> None:
    harness = Harness(slots=1, slot_context=128, turn_marker=tokens_of(MARKER))
    first = harness.submit("Q: tell me. A:", max_tokens=14)  # 15 + 14 tokens: the last chunk is partial
    assert not harness.scheduler.canonicalize()  # not idle: a request waits
    harness.run_until_idle()
    turn = len(first.prompt) + 14
    before = len(harness.model.decoded)
    while harness.scheduler.canonicalize():
        pass
    recomputed = harness.model.decoded[before:]
    # Cut as a prompt holding the answer is cut: whole chunks, then the rest, from the
    # last prompt chunk that was whole; the last streamed token (never decoded) included.
    assert [[(e.position, e.wants_logits) for e in batch] for batch in recomputed] == [
        [(p, False) for p in range(start, min(start + CHUNK, turn))] for start in range(12, turn, CHUNK)
    ]
    assert harness.model.caches[0] == [*first.prompt, *tokens_of(harness.text(first))]
    assert harness.scheduler.stats.recomputed_tokens == sum(len(batch) for batch in recomputed) > 0
    # The next turn reuses the whole answer, and its text is the one it computes alone.
    turn_2 = f"Q: tell me. A:{harness.text(first)}{MARKER} more. A:"
    reused = harness.scheduler.stats.reused_tokens
    second = harness.submit(turn_2, max_tokens=6)
    harness.run_until_idle()
    assert harness.scheduler.stats.reused_tokens - reused == turn
    assert harness.text(second) == reference(turn_2, 6)


def test_an_answer_that_wrote_the_next_turns_marker_is_recomputed_up_to_it() -> None:
    harness = Harness(slots=1, slot_context=128, turn_marker=tokens_of(MARKER), next_token=replying(f"sure{MARKER}"))
    first = harness.submit("Q: tell me. A:", max_tokens=20)
    harness.run_until_idle()
    while harness.scheduler.canonicalize():
        pass
    assert harness.text(first) == f"sure{MARKER}"  # a stop sequence would have cut it here
    assert harness.model.caches[0] == [*first.prompt, *tokens_of("sure")]
    reused = harness.scheduler.stats.reused_tokens
    harness.submit(f"Q: tell me. A:sure{MARKER} more. A:", max_tokens=3)
    harness.run_until_idle()
    assert harness.scheduler.stats.reused_tokens - reused == len(first.prompt) + len("sure")


def test_a_prompt_is_cut_into_chunks_from_the_start_of_each_turn() -> None:
    harness = Harness(slots=1, slot_context=128, turn_marker=tokens_of(MARKER))
    prompt = f"abcdef{MARKER} ghij{MARKER} k"  # turns start at positions 7 and 15
    harness.submit(prompt, max_tokens=1)
    harness.run_until_idle()
    assert [[e.position for e in batch] for batch in harness.model.decoded] == [
        [0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18], [19]
    ]  # fmt: skip


def test_a_newcomer_takes_a_slot_before_its_answer_was_recomputed() -> None:
    harness = Harness(slots=1, slot_context=128)
    harness.submit("Q: tell me. A:", max_tokens=13)
    harness.run_until_idle()
    assert harness.scheduler.canonicalize()  # one chunk, then a request arrives
    job = harness.submit("something else entirely", max_tokens=3)
    harness.run_until_idle()
    assert harness.text(job) == reference("something else entirely", 3)
    assert harness.model.caches[0][: len(job.prompt)] == job.prompt


@pytest.mark.parametrize("options", [{"reuse_generated": True}, {"prefix_cache": False}])
def test_nothing_is_recomputed_when_the_cache_is_reused_as_it_is_or_not_at_all(options: dict[str, bool]) -> None:
    harness = Harness(slots=1, slot_context=128, **options)
    harness.submit("Q: tell me. A:", max_tokens=13)
    harness.run_until_idle()
    assert not harness.scheduler.canonicalize()


# -- sliding-window layers --------------------------------------------------------------


def test_a_prefix_whose_window_was_dropped_is_computed_again_not_reused() -> None:
    # A window of 8 and 16 cells held: after 41 tokens the slot holds positions 25-40 only.
    harness = Harness(slots=1, slot_context=128, window=8, cells=16)
    model = harness.model
    long_prompt = "abcdefgh" + "x" * 30
    harness.submit(long_prompt, max_tokens=2)
    harness.run_until_idle()
    assert model.earliest(0) > 8
    job = harness.submit("abcdefgh and then", max_tokens=4)  # shares 2 whole chunks, far behind the end
    harness.run_until_idle()
    assert harness.scheduler.stats.reused_tokens == 0
    assert harness.text(job) == reference("abcdefgh and then", 4)
    # A prefix that is still within reach is reused.
    again = harness.submit("abcdefgh and then some more", max_tokens=4)
    harness.run_until_idle()
    assert harness.scheduler.stats.reused_tokens == 16
    assert harness.text(again) == reference("abcdefgh and then some more", 4)


def test_only_the_latest_answer_waits_to_be_recomputed() -> None:
    """After a burst, recomputing every answer would keep an idle engine busy, and each
    newcomer would wait for a chunk: only the answer that finished last is recomputed."""
    harness = Harness(slots=2, slot_context=128)
    early = harness.submit("Q: tell me. A:", max_tokens=3)
    late = harness.submit("Q: tell me more. A:", max_tokens=9)
    harness.run_until_idle()
    before = len(harness.model.decoded)
    while harness.scheduler.canonicalize():
        pass
    recomputed = {entry.slot for batch in harness.model.decoded[before:] for entry in batch}
    assert early.slot is not None and late.slot is not None
    assert recomputed == {late.slot.index}


def test_a_request_cancelled_before_its_first_token_leaves_the_latest_answer_to_recompute() -> None:
    harness = Harness(slots=2, slot_context=128)
    harness.submit("Q: hi. A:", max_tokens=2)  # slot 0, done first: the next newcomer takes it
    answered = harness.submit("Q: tell me. A:", max_tokens=9)
    harness.run_until_idle()
    gone = harness.submit("something else entirely, and at some length", max_tokens=3)  # 44 tokens: 3 steps
    harness.scheduler.step()  # part of its prompt is prefilled
    harness.scheduler.cancel(gone)
    harness.run_until_idle()
    before = len(harness.model.decoded)
    while harness.scheduler.canonicalize():
        pass
    assert answered.slot is not None
    assert {e.slot for batch in harness.model.decoded[before:] for e in batch} == {answered.slot.index}


# -- loose pieces: shapes whose numbers do not depend on the cut --------------------------


def test_a_loose_tail_is_padded_to_its_shape_and_a_lone_streams_answer_catches_up_every_eight_tokens() -> None:
    harness = Harness(
        slots=1, slot_context=128, chunk=64, prefill_budget=64, turn_marker=tokens_of(MARKER), loose=CPU_LOOSE
    )
    job = harness.submit("hello wor", max_tokens=20)  # BOS + 9 bytes: one loose tail of 10 tokens
    harness.run_until_idle()
    batches = [[(e.position, e.wants_logits) for e in batch] for batch in harness.model.decoded]
    # The prompt, padded with two throwaway rows to 12 (a multiple of 4), dropped after the decode.
    assert batches[0] == [*((p, p == 9) for p in range(10)), (10, False), (11, False)]
    caught_up = [batch for batch in batches[1:] if len(batch) > 1]
    # Seven tokens behind: those seven again, without logits, and the next token (8 rows).
    assert caught_up == [
        [*((p, False) for p in range(10, 17)), (17, True)],
        [*((p, False) for p in range(18, 25)), (25, True)],
    ]
    assert harness.scheduler.stats.recomputed_tokens == 2 * CATCH_UP_AFTER
    assert harness.scheduler._slots[0].reusable == 26
    assert harness.text(job) == reference("hello wor", 20)  # the fake's cache held the same tokens throughout


def test_a_stream_beside_another_does_not_catch_up() -> None:
    harness = Harness(slots=2, slot_context=128, chunk=64, prefill_budget=64, loose=CPU_LOOSE)
    first, second = harness.submit("hello wor", max_tokens=12), harness.submit("jello wor", max_tokens=12)
    harness.run_until_idle()
    assert harness.scheduler.stats.recomputed_tokens == 0
    assert harness.text(first) == reference("hello wor", 12)
    assert harness.text(second) == reference("jello wor", 12)


def test_a_next_turn_reuses_a_caught_up_answer_up_to_any_token_of_its_tail() -> None:
    harness = Harness(
        slots=1, slot_context=128, chunk=64, prefill_budget=64, turn_marker=tokens_of(MARKER), loose=CPU_LOOSE
    )
    first = harness.submit(f"{MARKER} hi A:", max_tokens=20)
    harness.run_until_idle()
    reused = harness.scheduler.stats.reused_tokens
    turn_2 = f"{MARKER} hi A:{harness.text(first)}{MARKER} and?"
    second = harness.submit(turn_2, max_tokens=4)
    harness.run_until_idle()
    # Everything the stream caught up with: the prompt and its answer up to the last catch-up.
    caught_up = prompt_length(f"{MARKER} hi A:") + 2 * (CATCH_UP_AFTER + 1)
    assert harness.scheduler.stats.reused_tokens - reused == caught_up
    assert harness.text(second) == reference(turn_2, 4)


def test_loose_shapes_are_dropped_when_the_model_gives_other_numbers_in_other_cuts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = Harness(slots=1, slot_context=128, chunk=64, prefill_budget=64, loose=CPU_LOOSE)
    harness.scheduler.calibrate()
    assert harness.scheduler._loose is CPU_LOOSE  # the fake's numbers depend on the tokens alone
    cramped = Harness(slots=1, slot_context=16, chunk=8, prefill_budget=8, loose=CPU_LOOSE)
    cramped.scheduler.calibrate()
    assert cramped.scheduler._loose is None  # no room for the check's padded pieces

    shaky = Harness(slots=1, slot_context=128, chunk=64, prefill_budget=64, loose=CPU_LOOSE)
    plain_decode = shaky.model.decode

    def decode_with_shape_noise() -> int:  # every logit row carries the count of decodes so far
        status = plain_decode()
        count = len(shaky.model.decoded)
        shaky.model._rows = {index: row + count for index, row in shaky.model._rows.items()}
        return status

    shaky.model.decode = decode_with_shape_noise  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="tcserve.llamacpp"):
        shaky.scheduler.calibrate()
    assert shaky.scheduler._loose is None
    assert "other numbers in differently cut pieces" in caplog.text
    job = shaky.submit("hello wor", max_tokens=3)
    shaky.run_until_idle()
    assert [len(batch) for batch in shaky.model.decoded[-3:]] == [10, 1, 1]  # the tail as one chunk, unpadded
    assert shaky.text(job) == reference("hello wor", 3)


def test_a_job_ends_at_the_token_that_completes_a_stop_sequence() -> None:
    """The service's matcher finds the stop too; ending here spares the step that the
    cancellation would cost (a next turn sent at once would wait for it)."""
    harness = Harness(slots=1, slot_context=128, next_token=replying("sure.\n\nHuman: and more"))
    job = harness.submit("Q: hi A:", max_tokens=30)
    harness.run_until_idle()
    assert harness.text(job) == "sure.\n\nHuman:"
    assert harness.finished(job) == Finished("stop_sequence", "\n\nHuman:")
    decoded = [entry.position for batch in harness.model.decoded for entry in batch]
    # The token that completed the stop was streamed but never decoded.
    assert max(decoded) == len(job.prompt) + len("sure.\n\nHuman:") - 2
