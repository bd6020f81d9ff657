"""Prefix reuse on the real Gemma 3 270M: a reused prefix holds exactly the numbers
the prompt computes on its own.

llama.cpp's results for a token depend on the pass that computed it (how many rows,
whose). So a cached prefix may be reused only if it was computed as a lone prompt
would compute it: whole aligned chunks, each in a llama_decode of its own, even when
other sequences were generating beside it, and loose pieces (`chunks.Loose`), whose
rows get the same numbers however the text is cut. Then the same greedy request
gives the same logits, bit for bit, whatever the cache held before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tcserve.core.request import Finished, GenerationRequest, SamplingParams, TextDelta
from tcserve.core.transcript import HUMAN_TURN
from tcserve.engines.llamacpp.chunks import CPU_LOOSE, Loose
from tcserve.engines.llamacpp.engine import PREFILL_CHUNK, default_model_path
from tcserve.engines.llamacpp.native import ContextParams, Model
from tcserve.engines.llamacpp.scheduler import CATCH_UP_AFTER, Job, Outcome, Scheduler

pytestmark = pytest.mark.model

PASSAGE = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, the "
    "members agreed to fund the children's section, the reading room and the archive, but postponed the "
    "decision on the cafe until the spring. "
)


class FirstLogits:
    """A greedy sampler that keeps a copy of the first logit row it is given."""

    def __init__(self) -> None:
        self.first: npt.NDArray[np.float32] | None = None

    def __call__(self, logits: npt.NDArray[np.float32]) -> int:
        if self.first is None:
            self.first = np.array(logits, copy=True)
        return int(np.argmax(logits))


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    model = Model(default_model_path(), ContextParams(slots=2, slot_context=1024, batch_tokens=256, threads=2))
    yield model
    model.close()


def submit(scheduler: Scheduler, prompt: str, max_tokens: int) -> tuple[Job, FirstLogits]:
    sampler = FirstLogits()
    job = Job(GenerationRequest("req_reuse", prompt, max_tokens, SamplingParams(temperature=0.0)), sampler, None)
    scheduler.submit(job)
    return job, sampler


def run_until_done(scheduler: Scheduler, outcomes: list[tuple[Job, Outcome]], job: Job) -> None:
    for _ in range(500):
        if any(owner is job and isinstance(outcome, Finished) for owner, outcome in outcomes):
            return
        scheduler.step()
    raise AssertionError("the job did not finish")


def assert_logits_of_a_cold_engine(model: Model, prompt: str, reusing: FirstLogits, **options: Any) -> None:
    """The first logits of `prompt` on a fresh scheduler that reuses nothing are `reusing`'s, bit for bit."""
    model.forget(0)
    model.forget(1)
    outcomes: list[tuple[Job, Outcome]] = []
    cold = Scheduler(
        model, outcomes.extend, slots=2, chunk=PREFILL_CHUNK, prefill_budget=240, prefix_cache=False, **options
    )
    job, fresh = submit(cold, prompt, max_tokens=1)
    run_until_done(cold, outcomes, job)
    assert reusing.first is not None and fresh.first is not None
    assert np.array_equal(reusing.first, fresh.first), f"max difference {np.abs(reusing.first - fresh.first).max()}"


def logits_after(
    model: Model, tokens: list[int], pieces: list[int], rows: Callable[[int], int]
) -> npt.NDArray[np.float32]:
    """The logits after `tokens`, computed in llama_decodes of `pieces` tokens each, each
    padded with throwaway rows to `rows(piece)` rows, then the last token alone in a
    padded piece of its own."""
    model.forget(0)
    position = 0
    for size in [*pieces, 1]:
        model.batch.clear()
        for offset in range(rows(size)):
            token = tokens[position + offset] if offset < size else tokens[0]
            index = model.batch.add(token, position + offset, 0, position + offset == len(tokens) - 1)
            if position + offset == len(tokens) - 1:
                last = index
        assert model.decode() == 0
        position += size
        model.forget(0, position)
    logits = np.array(model.logits(last), copy=True)
    model.forget(0)
    model.batch.clear()
    return logits


def test_a_row_gets_the_same_numbers_in_any_loose_piece_and_other_numbers_in_other_shapes(model: Model) -> None:
    """What `CPU_LOOSE` claims of llama.cpp's CPU kernels: in pieces of 8 to 60 rows,
    padded to a multiple of 4, a token's numbers do not depend on where the text is
    cut. The other shapes are there to show that the comparison can tell."""
    tokens = model.vocab.tokenize(PASSAGE * 3)[:101]
    assert len(tokens) == 101
    loose = CPU_LOOSE.rows
    reference = logits_after(model, tokens, [56, 44], loose)
    for pieces in ([7, 5, 33, 55], [1] * 100, [13, 40, 47], [4] * 25):
        logits = logits_after(model, tokens, pieces, loose)
        assert np.array_equal(logits, reference), f"{pieces[:4]}: {np.abs(logits - reference).max()}"
    for pieces, rows in (([1] * 100, lambda n: n), ([4] * 25, lambda n: n), ([100], loose), ([50, 50], lambda n: n)):
        assert not np.array_equal(logits_after(model, tokens, pieces, rows), reference), pieces[:4]


@pytest.mark.parametrize("loose", [None, CPU_LOOSE], ids=["chunks", "loose-tails"])
def test_a_prefix_prefilled_beside_a_generating_sequence_is_reused_with_the_numbers_of_a_lone_prompt(
    model: Model, loose: Loose | None
) -> None:
    prompt = "Human: Summarise these notes.\n\n" + PASSAGE * 9
    follow_up = prompt + "\n\nAssistant: The committee"
    outcomes: list[tuple[Job, Outcome]] = []
    busy = Scheduler(model, outcomes.extend, slots=2, chunk=PREFILL_CHUNK, prefill_budget=240, loose=loose)
    runner, _ = submit(busy, "Human: Write a long essay about the sea.\n\nAssistant:", max_tokens=60)
    busy.step()
    busy.step()  # the runner is generating in slot 0
    first, _ = submit(busy, prompt, max_tokens=1)  # prefilled in slot 1, chunk by chunk, beside it
    run_until_done(busy, outcomes, first)
    run_until_done(busy, outcomes, runner)
    reused = busy.stats.reused_tokens
    second, reusing = submit(busy, follow_up, max_tokens=1)
    run_until_done(busy, outcomes, second)
    assert busy.stats.reused_tokens - reused >= 3 * PREFILL_CHUNK

    assert_logits_of_a_cold_engine(model, follow_up, reusing, loose=loose)


@pytest.mark.parametrize("loose", [None, CPU_LOOSE], ids=["chunks", "loose-tails"])
def test_a_conversations_next_turn_reuses_the_recomputed_answer_with_the_numbers_of_a_lone_prompt(
    model: Model, loose: Loose | None
) -> None:
    """Each turn is cut from its own start (`chunks.py`), and the idle engine computes
    an answer again up to where the next turn starts: the next turn then reuses the
    whole earlier transcript, partial chunks included, and its logits are those of
    the same prompt on an engine that reuses nothing."""
    marker = model.vocab.tokenize(HUMAN_TURN, False)
    turn_1 = "Notes for the meeting.\n\nHuman: Summarise these notes.\n\n" + PASSAGE * 2 + "\n\nAssistant:"
    outcomes: list[tuple[Job, Outcome]] = []
    warm = Scheduler(
        model, outcomes.extend, slots=2, chunk=PREFILL_CHUNK, prefill_budget=240, turn_marker=marker, loose=loose
    )
    first, _ = submit(warm, turn_1, max_tokens=40)
    run_until_done(warm, outcomes, first)
    answer = "".join(o.text for owner, o in outcomes if owner is first and isinstance(o, TextDelta))
    while warm.canonicalize():
        pass
    turn_2 = f"{turn_1}{answer}{HUMAN_TURN} And the cafe?\n\nAssistant:"
    reused = warm.stats.reused_tokens
    second, reusing = submit(warm, turn_2, max_tokens=1)
    run_until_done(warm, outcomes, second)
    assert warm.stats.recomputed_tokens > 0
    # Everything up to the new turn's marker: turn 1 and all of its answer.
    assert warm.stats.reused_tokens - reused == len(model.vocab.tokenize(f"{turn_1}{answer}"))

    assert_logits_of_a_cold_engine(model, turn_2, reusing, turn_marker=marker, loose=loose)


def answer_alone(warm: Scheduler, outcomes: list[tuple[Job, Outcome]], prompt: str, max_tokens: int) -> tuple[Job, str]:
    """Generate a lone stream's answer with `step` only: the idle recompute never runs."""
    job, _ = submit(warm, prompt, max_tokens)
    run_until_done(warm, outcomes, job)
    return job, "".join(o.text for owner, o in outcomes if owner is job and isinstance(o, TextDelta))


def assert_a_turn_sent_at_once_reuses_the_answer(
    model: Model, warm: Scheduler, outcomes: list[tuple[Job, Outcome]], answered: str, marker: list[int]
) -> None:
    """The next turn after `answered` (a prompt and its answer) reuses all of it but the
    tokens streamed since the answer was last exact, with the logits of a cold engine."""
    turn_2 = f"{answered}{HUMAN_TURN} And the cafe?\n\nAssistant:"
    reused = warm.stats.reused_tokens
    second, reusing = submit(warm, turn_2, max_tokens=1)
    run_until_done(warm, outcomes, second)
    assert warm.stats.reused_tokens - reused >= len(model.vocab.tokenize(answered)) - (CATCH_UP_AFTER + 1)
    assert_logits_of_a_cold_engine(model, turn_2, reusing, turn_marker=marker, loose=CPU_LOOSE)


def test_a_turn_sent_right_after_the_answer_reuses_what_the_stream_caught_up_with_the_numbers_of_a_lone_prompt(
    model: Model,
) -> None:
    """A lone stream computes its answer again as loose pieces as it goes (`Scheduler`,
    catching up), so a next turn sent before the engine was ever idle reuses all but
    the answer's last few tokens, and its logits are still those of a cold engine."""
    marker = model.vocab.tokenize(HUMAN_TURN, False)
    turn_1 = "Notes for the meeting.\n\nHuman: Summarise these notes.\n\n" + PASSAGE + "\n\nAssistant:"
    outcomes: list[tuple[Job, Outcome]] = []
    warm = Scheduler(
        model, outcomes.extend, slots=2, chunk=PREFILL_CHUNK, prefill_budget=240, turn_marker=marker,
        loose=CPU_LOOSE,
    )  # fmt: skip
    first, answer = answer_alone(warm, outcomes, turn_1, max_tokens=40)
    assert first.produced >= 2 * (CATCH_UP_AFTER + 1)
    assert warm.stats.recomputed_tokens >= CATCH_UP_AFTER
    assert_a_turn_sent_at_once_reuses_the_answer(model, warm, outcomes, turn_1 + answer, marker)


def test_a_speculating_stream_s_answer_is_reused_right_after_with_the_numbers_of_a_lone_prompt(model: Model) -> None:
    """A lone stream copying its prompt verifies drafts; a drafting step whose rows make
    a loose shape computes them as a loose piece, so the drafted answer is exact as it
    comes, and a next turn sent at once reuses all but its last few tokens."""
    marker = model.vocab.tokenize(HUMAN_TURN, False)
    turn_1 = f"Copy the text.\n\nHuman: Copy this: {PASSAGE}\n\nAssistant: {PASSAGE[:40]}"
    outcomes: list[tuple[Job, Outcome]] = []
    warm = Scheduler(
        model, outcomes.extend, slots=2, chunk=PREFILL_CHUNK, prefill_budget=240, turn_marker=marker,
        loose=CPU_LOOSE, speculative=True,
    )  # fmt: skip
    model.forget(0)
    model.forget(1)
    warm.calibrate()  # times the batch sizes the drafts are planned from (on slot 0)
    _, answer = answer_alone(warm, outcomes, turn_1, max_tokens=48)
    assert warm.stats.accepted_tokens >= 24  # most of the answer came from drafts
    assert_a_turn_sent_at_once_reuses_the_answer(model, warm, outcomes, turn_1 + answer, marker)
