"""Engine events -> completion events: the stop matcher sits here, between the
engine and the wire, so that every engine gets the same stop semantics.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Literal

from tcserve.engines.base import Engine
from tcserve.errors import ContextOverflow, EngineFailure
from tcserve.core.request import EngineEvent, Finished, GenerationRequest, TextDelta
from tcserve.core.stops import StopMatch, StopMatcher

StopReason = Literal["stop_sequence", "max_tokens"]


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
    output_tokens: int = 0
    """Tokens the engine generated for this completion (for per-key output limits)."""


CompletionEvent = Chunk | Done


async def check_context(engine: Engine, request: GenerationRequest) -> int:
    """Raise `ContextOverflow` unless prompt + max_tokens fit; returns the prompt's tokens."""
    prompt_tokens = await engine.count_tokens(request.prompt)
    if prompt_tokens + request.max_tokens > engine.context_size:
        raise ContextOverflow(prompt_tokens, request.max_tokens, engine.context_size)
    return prompt_tokens


async def complete(engine: Engine, request: GenerationRequest) -> AsyncGenerator[CompletionEvent, None]:
    """Admit the request (raising `Overloaded` before anything is sent) and
    return its events: `Chunk`s, then exactly one `Done`.

    Closing the returned iterator early closes the engine's stream, which stops
    the engine's work for this request.
    """
    return _run(await engine.generate(request), StopMatcher(request.stop_sequences))


async def _run(events: AsyncIterator[EngineEvent], matcher: StopMatcher) -> AsyncGenerator[CompletionEvent, None]:
    pieces = 0
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                pieces += 1
                released = matcher.feed(event.text)
                if isinstance(released, StopMatch):
                    yield Done(released.text_before, "stop_sequence", released.stop, pieces)
                    return
                if released:
                    yield Chunk(released)
            elif isinstance(event, Finished):
                reason: StopReason = "max_tokens" if event.reason == "max_tokens" else "stop_sequence"
                stop = event.stop if event.reason == "stop_sequence" else None
                yield Done(matcher.flush(), reason, stop, max(event.completion_tokens, pieces))
                return
        raise EngineFailure("engine stream ended without a Finished event")
    finally:
        await _close(events)


async def _close(events: AsyncIterator[object]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
