"""The serving core's vocabulary: what a caller asks for, what an engine is asked
for and says back, and what the caller gets.

    CompletionCall      a wire-free request, as the HTTP edge (or the CLI) parsed it
        |  core.validate
    GenerationRequest   validated: the exact prompt, its tokens, sampling, stops
        |  Engine.generate
    EngineEvent         TextDelta ... Finished (each delta says how many tokens it took)
        |  core.service (stop matcher, accounting)
    CompletionEvent     Chunk ... Done (free of stop text; Done carries the usage)

Nothing here knows about HTTP, pydantic or llama.cpp. An engine only ever
accepts a `GenerationRequest` ("parse, don't validate").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tcserve.core.transcript import HUMAN_TURN, Conversation

HUMAN_STOP = HUMAN_TURN
"""The stop that every Text Completions request has, before the user's own."""

GREEDY_BELOW = 1e-5
"""Temperatures under this are sampled greedily, the T -> 0 limit (vLLM's threshold
too). At T = 1e-5 a token whose logit is more than 50 T = 5e-4 below the best has a
probability under e^-50 (times a 262,144-token vocabulary, still under 2^-53, below
what a float64 draw resolves), so tempered sampling could differ from greedy only
between tokens closer than llama.cpp's own run-to-run noise in the logits. Tiny
temperatures also underflow: float32(1e-46) is 0, and the softmax was NaN."""

StopReason = Literal["stop_sequence", "max_tokens"]
"""The wire's stop reasons."""


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """A completion request as the caller sent it, free of the wire format: the
    wire's types and bounds are checked, nothing else is yet."""

    request_id: str
    model: str
    prompt: str
    max_tokens: int
    stop_sequences: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    user_id: str | None = None


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
class PromptTokens:
    """The prompt as the engine will feed it: its token ids when the engine has them
    (the embedded engine, so that it never tokenizes twice), and their count, or None
    when the engine cannot count them (an upstream without a tokenize route)."""

    count: int | None
    ids: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated completion request, ready for an engine.

    `prompt` is the checked transcript (or, for a raw model, the text as sent);
    `conversation` is the same transcript parsed into turns (None for a raw model),
    which a chat model renders with its own format instead of feeding `prompt`.
    `tokens` is what the engine's `tokenize` said of the prompt as it will feed it.
    `stop_sequences` are enforced by the service's stop matcher (engines may also use
    them as a hint). `model_id` is the id the caller asked for (an upstream may
    forward it as its own model name).
    """

    request_id: str
    prompt: str
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_sequences: tuple[str, ...] = (HUMAN_STOP,)
    tokens: PromptTokens = PromptTokens(None)
    user_id: str | None = None
    conversation: Conversation | None = None
    model_id: str = ""


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New generated text (whole UTF-8 characters, possibly empty) and the number of
    tokens the engine generated for it. Summing `tokens` over a stream is the one
    count of output tokens, whether the stream finishes or ends early."""

    text: str
    tokens: int = 1


FinishReason = Literal["end_of_sequence", "max_tokens", "stop_sequence"]


@dataclass(frozen=True, slots=True)
class Finished:
    """The engine stopped: the model's end-of-sequence token, the token budget,
    or (engines that apply stop sequences themselves, such as an upstream
    server) one of the request's stop sequences, named in `stop`. The stop
    matcher above every engine finds stops in the text as well.

    `prompt_tokens` / `completion_tokens` are the engine's own usage figures when it
    reports them (an upstream's `usage`); None when it does not, and then the
    service uses what it counted itself."""

    reason: FinishReason
    stop: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


EngineEvent = TextDelta | Finished


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens in and out of one request: the numbers that the ledger, the key's
    limits, /metrics and `tcserve usage` all show."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """Text released to the client, free of any stop sequence character."""

    text: str


@dataclass(frozen=True, slots=True)
class Done:
    """The end: `text` is the last released piece (held-back text or the part
    before the stop), `stop` the stop sequence that matched, if one did."""

    text: str
    stop_reason: StopReason
    stop: str | None
    usage: Usage


CompletionEvent = Chunk | Done
