"""The engine protocol: a validated request in, typed events out.

An engine knows nothing of HTTP, pydantic or the wire format. `generate` is an
async iterator of `TextDelta`s that ends with one `Finished`; closing it early
(`aclose()`, which the caller does on a stop sequence or a client that went
away) must stop the work behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from tcserve.generation import EngineEvent, GenerationRequest


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

    async def count_tokens(self, text: str) -> int:
        """Tokens the prompt will take, as `generate` will feed it (BOS included)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Stream the completion. Raises `EngineNotReady` before `start()` is done,
        `EngineFailure` when the engine breaks."""
        ...

    async def aclose(self) -> None:
        """Free the model; pending and later calls fail."""
        ...
