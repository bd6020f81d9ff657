"""A scripted engine for fast tests: no model, same protocol.

It answers `reply` split into words (each word with its leading space is one
"token"), counts one token per character of the prompt, and can be told to
load slowly, to pace its tokens, to fail part-way, or to refuse work beyond
`capacity` requests at once (529). `started` and `closed`
count generations so that tests can observe cancellation.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from tcserve.engines.base import Admission, EngineStats
from tcserve.errors import EngineFailure, EngineNotReady, Overloaded
from tcserve.core.request import EngineEvent, Finished, GenerationRequest, TextDelta

EOS = "<eos>"
"""Put this in `reply` to make the fake model end there on its own."""


class FakeEngine:
    def __init__(
        self,
        reply: str = " Hello! I am a scripted test model.",
        *,
        context_size: int = 8192,
        token_delay: float = 0.0,
        load_delay: float = 0.0,
        fail_after: int | None = None,
        capacity: int = 1000,
    ) -> None:
        self._tokens = re.findall(r"\s*\S+|\s+$", reply)
        self._context_size = context_size
        self._token_delay = token_delay
        self._load_delay = load_delay
        self._fail_after = fail_after
        self._ready = False
        self._admission = Admission(capacity, 0)
        self._generated = 0
        self.requests: list[GenerationRequest] = []
        self.active = 0
        """Generations running now: a test reads this to prove cancellation."""

    @property
    def context_size(self) -> int:
        return self._context_size

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        await asyncio.sleep(self._load_delay)
        self._ready = True

    async def count_tokens(self, text: str) -> int:
        return len(text) + 1  # one per character, plus BOS

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        if not self._ready:
            raise EngineNotReady()
        self._admission.admit()
        self.requests.append(request)
        return self._run(request)

    def stats(self) -> EngineStats:
        # The fake runs every admitted request at once: nothing waits.
        return EngineStats(waiting=0, running=self.active, generated_tokens=self._generated)

    async def _run(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        self.active += 1
        try:
            prompt_tokens = await self.count_tokens(request.prompt)
            for produced, token in enumerate(self._tokens):
                if produced == request.max_tokens:
                    yield Finished("max_tokens", prompt_tokens, produced)
                    return
                if produced == self._fail_after:
                    raise EngineFailure(f"scripted failure after {produced} tokens")
                if self._token_delay:
                    await asyncio.sleep(self._token_delay)
                if not self._ready:
                    raise Overloaded("The server is shutting down")
                if token.strip() == EOS:
                    yield Finished("end_of_sequence", prompt_tokens, produced + 1)
                    return
                self._generated += 1
                yield TextDelta(token)
            yield Finished("end_of_sequence", prompt_tokens, len(self._tokens))
        finally:
            self.active -= 1
            self._admission.release()

    async def aclose(self) -> None:
        self._ready = False
