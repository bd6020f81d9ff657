"""Speculative decoding on the real Gemma 3 270M: the text is the model's greedy text.

The same prompts are generated plain (one token a step) and speculatively (drafts
verified in one batch). llama.cpp computes a token in a batch of several rows with
other kernels than a lone row, so its logits move slightly, as batching has always
moved them. So the texts must agree token for token, except where the model was
nearly tied: at the first token where they differ, the two best logits of the plain
run must lie within `NEAR_TIE` of each other, and so must the speculative run's.
A wrong draft kept in the cache, a trim at the wrong position or a verification that
accepts a token the model did not choose gives a text that differs where the model
was sure, and fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from tcserve.core.request import GenerationRequest, SamplingParams, TextDelta
from tcserve.engines.llamacpp.engine import PREFILL_CHUNK, default_model_path
from tcserve.engines.llamacpp.native import ContextParams, Model
from tcserve.engines.llamacpp.scheduler import Job, Outcome, Scheduler

pytestmark = pytest.mark.model

NEAR_TIE = 0.5
"""Logits; the gaps between the two best logits at the divergences seen while writing
this test were 0.07 to 0.2 (a sure token's gap is several logits)."""
TOKENS = 48

PASSAGE = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, the "
    "members agreed to fund the children's section, the reading room and the archive, but postponed the "
    "decision on the cafe until the spring."
)
CODE = "def total(items):\n    result = 0\n    for item in itmes:\n        result += item.price\n    return result\n"
RECORD = "Name: Ada Lovelace\nBorn: 10 December 1815\nCity: London\nKnown for: the first published algorithm\n"
PROMPTS = [
    f"Human: Repeat this text exactly.\n\n{PASSAGE}\n\nAssistant: {PASSAGE[:40]}",
    f"Human: Copy the following paragraph word for word:\n\n{PASSAGE}\n\nAssistant: Here is the paragraph:\n\n",
    f"Human: Fix the typo in this code and give the whole code again.\n\n{CODE}\nAssistant: Here is the fixed "
    "code:\n\ndef total(items):\n",
    f"Human: Extract the fields of this record as key: value lines.\n\n{RECORD}\nAssistant: Name:",
    f'Human: Quote the second sentence of this text.\n\n{PASSAGE}\n\nAssistant: "After',
    f"Human: Rewrite the code with `items` renamed to `orders`.\n\n{CODE}\nAssistant: def total(orders):\n",
    f"{RECORD}{RECORD}Name:",
    "Human: Write a long essay about the history of bread.\n\nAssistant:",
    "Human: List the planets of the solar system, one per line.\n\nAssistant:",
    "Human: Tell me a story about a fox and a crow.\n\nAssistant: Once upon a time",
]


@dataclass
class Choice:
    token: int
    gap: float
    """The best logit minus the second best."""


class RecordingGreedy:
    """A greedy sampler that remembers what it chose and how sure the model was."""

    def __init__(self) -> None:
        self.choices: list[Choice] = []

    def __call__(self, logits: npt.NDArray[np.float32]) -> int:
        second, best = np.partition(logits, -2)[-2:]
        token = int(np.argmax(logits))
        self.choices.append(Choice(token, float(best - second)))
        return token


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    model = Model(default_model_path(), ContextParams(slots=1, slot_context=1024, batch_tokens=257, threads=2))
    yield model
    model.close()


class Generator:
    """One scheduler over the model (no prefix reuse, so every prompt is computed whole)."""

    def __init__(self, model: Model, *, speculative: bool) -> None:
        self.handoffs: list[tuple[Job, Outcome]] = []
        self.scheduler = Scheduler(model, self.handoffs.extend, slots=1, chunk=PREFILL_CHUNK, prefill_budget=256,
                                   prefix_cache=False, speculative=speculative)  # fmt: skip
        self.scheduler.calibrate()

    def __call__(self, prompt: str) -> tuple[str, list[Choice]]:
        self.handoffs.clear()
        sampler = RecordingGreedy()
        request = GenerationRequest("req_spec", prompt, TOKENS, SamplingParams(temperature=0.0))
        self.scheduler.submit(Job(request, sampler, channel=None))
        for _ in range(10 * TOKENS):
            if not self.scheduler.step():
                break
        text = "".join(outcome.text for _, outcome in self.handoffs if isinstance(outcome, TextDelta))
        return text, sampler.choices


def test_speculative_greedy_text_is_the_plain_greedy_text_up_to_near_ties(model: Model) -> None:
    same = 0
    near_ties: list[tuple[float, float]] = []
    plain_generator, fast_generator = Generator(model, speculative=False), Generator(model, speculative=True)
    for prompt in PROMPTS:
        plain_text, plain = plain_generator(prompt)
        fast_text, fast = fast_generator(prompt)
        tokens = ([c.token for c in plain], [c.token for c in fast])
        first = next((i for i, (a, b) in enumerate(zip(*tokens, strict=False)) if a != b), None)
        if first is None:  # one choice list may go on: a step samples its drafted rows past a stop sequence
            assert plain_text == fast_text
            same += 1
            continue
        gaps = (plain[first].gap, fast[first].gap)
        assert max(gaps) < NEAR_TIE, (
            f"speculation changed a token the model was sure of: {prompt!r} at token {first}, gaps {gaps}\n"
            f"plain: {plain_text!r}\nspeculative: {fast_text!r}"
        )
        near_ties.append(gaps)
    print(f"\n{same} of {len(PROMPTS)} texts identical; near ties at the first difference: {near_ties}")
    stats = fast_generator.scheduler.stats
    print(f"drafted {stats.drafted_tokens} tokens, accepted {stats.accepted_tokens}")
    assert stats.accepted_tokens > len(PROMPTS) * TOKENS / 4  # speculation really ran, and was mostly right
    assert same >= len(PROMPTS) // 2
