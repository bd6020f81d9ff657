"""The engine protocol: a validated request in, typed events out.

An engine knows nothing of HTTP, pydantic or the wire format: it is built from
plain settings (a dataclass of its own module, filled by `engines/factory.py`
from the config, where every default is defined). Awaiting
`generate` admits the request (raising `Overloaded` when its queue is full, or
when an upstream refuses it, so that the HTTP edge can still answer 529 before
anything is streamed) and returns an async iterator of `TextDelta`s that ends with one `Finished`. Closing that
iterator early (`aclose()`, which the caller does on a stop sequence or when
the client went away) must stop the work behind it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from tcserve.core.request import EngineEvent, GenerationRequest, PromptTokens
from tcserve.errors import Overloaded

PromptFormat = Literal["raw", "chat"]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics."""

    waiting: int
    """Admitted requests that wait for a slot."""
    running: int
    """Sequences being prefilled or generated."""
    generated_tokens: int
    """Tokens generated since start (a counter)."""
    drafted_tokens: int = 0
    """Speculative drafted tokens verified since start (a counter; engines that do not speculate: 0)."""
    accepted_tokens: int = 0
    """Of those, the ones the model agreed with."""


class Engine(Protocol):
    @property
    def context_size(self) -> int:
        """Tokens a request may use in all: prompt plus completion."""
        ...

    @property
    def ready(self) -> bool:
        """True once `start()` has finished loading the model."""
        ...

    async def start(self) -> None:
        """Load the model. Runs in the background while /health says 503."""
        ...

    @property
    def prompt_format(self) -> PromptFormat:
        """How the engine feeds a transcript: "raw" (the Human/Assistant text as it is)
        or "chat" (the conversation in the model's own turn format). Logged at start,
        shown by /health."""
        ...

    async def tokenize(self, request: GenerationRequest) -> PromptTokens:
        """The request's prompt as `generate` will feed it (for a chat model, the
        rendered conversation; BOS included): its count, and its ids when the engine
        can reuse them (then `generate` does not tokenize again). `count` is None when
        the engine cannot count (its `warnings` say so)."""
        ...

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Admit the request and return its stream. Raises `Overloaded` when the
        queue is full and `EngineNotReady` before `start()` is done; the stream
        raises `EngineFailure` when the engine breaks."""
        ...

    def stats(self) -> EngineStats: ...

    def warnings(self) -> list[str]:
        """What this engine cannot do that a user would assume (logged at start, in /health)."""
        ...

    async def aclose(self) -> None:
        """Free the model; pending and later calls fail."""
        ...


class EngineStream:
    """An engine's events from an async generator, whose `aclose()` frees what the
    request holds even if it was never read: an async generator that never started
    runs no `finally`, and a client can leave before its first event is asked for.
    `if_never_started` frees what `generate` took before the generator ran."""

    def __init__(
        self, events: AsyncGenerator[EngineEvent, None], if_never_started: Callable[[], Awaitable[None]]
    ) -> None:
        self._events = events
        self._if_never_started = if_never_started
        self._started = False
        self._closed = False

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> EngineEvent:
        self._started = True
        return await self._events.__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._events.aclose()  # runs the generator's own `finally` if it started
        if not self._started:
            await self._if_never_started()


class Admission:
    """Bounds the requests an engine holds: `slots` running plus `max_queue` waiting.

    Used on the event loop only, so a plain counter is enough.
    """

    def __init__(self, slots: int, max_queue: int, retry_after: float = 1.0) -> None:
        self.limit = slots + max_queue
        self.held = 0
        self._retry_after = retry_after

    def admit(self) -> None:
        if self.held >= self.limit:
            raise Overloaded("Overloaded: the request queue is full", retry_after=self._retry_after)
        self.held += 1

    def release(self) -> None:
        self.held -= 1
