"""Every check of a completion request, in one place and one error vocabulary
(`tcserve.errors`; the HTTP edge maps it to Anthropic's once).

The wire's types and bounds are checked where the wire is parsed (the edge's
pydantic models); what is checked here is what needs the server's limits, the
model's rules or the engine's tokens. The service calls these in the order
that decides which error a request with several mistakes gets (unchanged
from what the SDK tests pin down): caps, model, permission, prompt rules,
engine readiness, context fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from tcserve.core import transcript
from tcserve.core.request import HUMAN_STOP, CompletionCall, GenerationRequest, PromptTokens, SamplingParams
from tcserve.errors import ContextOverflow, InvalidRequest


@dataclass(frozen=True, slots=True)
class RequestCaps:
    """Caps that protect the process: a huge prompt costs CPU to tokenize before the
    context check can refuse it, and every stop sequence is matched at every token."""

    max_prompt_chars: int
    max_stop_sequences: int
    max_stop_chars: int


def check_caps(call: CompletionCall, caps: RequestCaps) -> None:
    if len(call.prompt) > caps.max_prompt_chars:
        raise InvalidRequest(f"prompt: at most {caps.max_prompt_chars} characters are accepted")
    if len(call.stop_sequences) > caps.max_stop_sequences:
        raise InvalidRequest(f"stop_sequences: at most {caps.max_stop_sequences} are accepted")
    if any(len(stop) > caps.max_stop_chars for stop in call.stop_sequences):
        raise InvalidRequest(f"stop_sequences: each may have at most {caps.max_stop_chars} characters")


def to_generation_request(call: CompletionCall, *, check_transcript: bool) -> GenerationRequest:
    """Parse, don't validate: the only way a caller's request reaches an engine.
    With `check_transcript` off (raw completion for base models) the prompt is
    passed through untouched and there is no conversation to render."""
    if any(stop == "" for stop in call.stop_sequences):
        raise InvalidRequest("stop_sequences: a stop sequence must not be empty")
    prompt = transcript.prepare(call.prompt) if check_transcript else call.prompt
    return GenerationRequest(
        request_id=call.request_id,
        prompt=prompt,
        conversation=transcript.parse_conversation(prompt) if check_transcript else None,
        model_id=call.model,
        max_tokens=call.max_tokens,
        sampling=SamplingParams(
            temperature=1.0 if call.temperature is None else call.temperature,
            top_p=call.top_p,
            top_k=call.top_k or None,  # the wire's 0 means "off"
        ),
        stop_sequences=(HUMAN_STOP, *call.stop_sequences),
        user_id=call.user_id,
    )


def check_context(tokens: PromptTokens, max_tokens: int, context_size: int) -> None:
    """Raise `ContextOverflow` unless prompt + max_tokens fit. An engine that cannot
    count the prompt (tokens.count is None) still gets max_tokens checked; the
    upstream behind it checks the rest and its 400 is passed on."""
    prompt_tokens = tokens.count or 0
    if prompt_tokens + max_tokens > context_size:
        raise ContextOverflow(prompt_tokens, max_tokens, context_size)
