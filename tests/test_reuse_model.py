"""Prefix reuse on the real Gemma 3 270M: a reused prefix holds exactly the numbers
the prompt computes on its own.

llama.cpp's results for a token depend on the pass that computed it (how many rows,
whose). So a cached prefix may be reused only if it was computed as a lone prompt
would compute it: whole aligned chunks, each in a llama_decode of its own, even when
other sequences were generating beside it. Then the same greedy request gives the
same logits, bit for bit, whatever the cache held before.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest

from tcserve.core.request import Finished, GenerationRequest, SamplingParams, TextDelta
from tcserve.core.transcript import HUMAN_TURN
from tcserve.engines.llamacpp.engine import PREFILL_CHUNK, default_model_path
from tcserve.engines.llamacpp.native import ContextParams, Model
from tcserve.engines.llamacpp.scheduler import Job, Outcome, Scheduler

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


def test_a_prefix_prefilled_beside_a_generating_sequence_is_reused_with_the_numbers_of_a_lone_prompt(
    model: Model,
) -> None:
    prompt = "Human: Summarise these notes.\n\n" + PASSAGE * 9
    follow_up = prompt + "\n\nAssistant: The committee"
    outcomes: list[tuple[Job, Outcome]] = []
    busy = Scheduler(model, outcomes.extend, slots=2, chunk=PREFILL_CHUNK, prefill_budget=240)
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

    model.forget(0)
    model.forget(1)
    alone = Scheduler(model, outcomes.extend, slots=2, chunk=PREFILL_CHUNK, prefill_budget=240, prefix_cache=False)
    third, fresh = submit(alone, follow_up, max_tokens=1)
    run_until_done(alone, outcomes, third)
    assert reusing.first is not None and fresh.first is not None
    assert np.array_equal(reusing.first, fresh.first), f"max difference {np.abs(reusing.first - fresh.first).max()}"


def test_a_conversations_next_turn_reuses_the_recomputed_answer_with_the_numbers_of_a_lone_prompt(
    model: Model,
) -> None:
    """Each turn is cut from its own start (`chunks.py`), and the idle engine computes
    an answer again up to where the next turn starts: the next turn then reuses the
    whole earlier transcript, partial chunks included, and its logits are those of
    the same prompt on an engine that reuses nothing."""
    marker = model.vocab.tokenize(HUMAN_TURN, False)
    turn_1 = "Notes for the meeting.\n\nHuman: Summarise these notes.\n\n" + PASSAGE * 2 + "\n\nAssistant:"
    outcomes: list[tuple[Job, Outcome]] = []
    warm = Scheduler(model, outcomes.extend, slots=2, chunk=PREFILL_CHUNK, prefill_budget=240, turn_marker=marker)
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

    model.forget(0)
    model.forget(1)
    cold = Scheduler(
        model, outcomes.extend, slots=2, chunk=PREFILL_CHUNK, prefill_budget=240, prefix_cache=False,
        turn_marker=marker,
    )  # fmt: skip
    third, fresh = submit(cold, turn_2, max_tokens=1)
    run_until_done(cold, outcomes, third)
    assert reusing.first is not None and fresh.first is not None
    assert np.array_equal(reusing.first, fresh.first), f"max difference {np.abs(reusing.first - fresh.first).max()}"
