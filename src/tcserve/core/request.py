"""The engine-facing vocabulary: what an engine is asked for and what it says back.

Nothing here knows about HTTP, pydantic or llama.cpp. The HTTP edge turns a
wire request into a `GenerationRequest` once ("parse, don't validate"), and an
engine only ever accepts that type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

HUMAN_STOP = "\n\nHuman:"
"""The stop that every Text Completions request has, before the user's own."""

GREEDY_BELOW = 1e-5
"""Temperatures under this are sampled greedily, the T -> 0 limit (vLLM's threshold
too). At T = 1e-5 a token whose logit is more than 50 T = 5e-4 below the best has a
probability under e^-50 (times a 262,144-token vocabulary, still under 2^-53, below
what a float64 draw resolves), so tempered sampling could differ from greedy only
between tokens closer than llama.cpp's own run-to-run noise in the logits. Tiny
temperatures also underflow: float32(1e-46) is 0, and the softmax was NaN."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token. `temperature < GREEDY_BELOW` (0 included) means greedy."""

    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated completion request, ready for an engine.

    `prompt` is the exact text to feed the model. `stop_sequences` are enforced
    by the caller's stop matcher (engines may also use them as a hint).
    """

    request_id: str
    prompt: str
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_sequences: tuple[str, ...] = (HUMAN_STOP,)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New generated text: always whole UTF-8 characters, possibly empty."""

    text: str


FinishReason = Literal["end_of_sequence", "max_tokens", "stop_sequence"]


@dataclass(frozen=True, slots=True)
class Finished:
    """The engine stopped: the model's end-of-sequence token, the token budget,
    or (engines that apply stop sequences themselves, such as an upstream
    server) one of the request's stop sequences, named in `stop`. The stop
    matcher above every engine finds stops in the text as well."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stop: str | None = None


EngineEvent = TextDelta | Finished
