"""A scripted engine for fast tests: no model, same protocol.

It answers `reply` split into words (each word with its leading space is one
"token"), counts one token per character of the prompt, and can be told to
load slowly, to pace its tokens, to fail part-way, or to refuse work beyond
`capacity` requests at once (529). `active` counts running generations so that
tests can observe cancellation. Like every engine, it counts the completion's
tokens, not the end-of-sequence token.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from tcserve.core.request import EngineEvent, Finished, GenerationRequest, PromptTokens, TextDelta
from tcserve.engines.base import Admission, EngineStats, EngineStream, PromptFormat
from tcserve.errors import EngineFailure, EngineNotReady, Overloaded

EOS = "<eos>"
"""Put this in `reply` to make the fake model end there on its own."""


@dataclass(frozen=True, slots=True)
class FakeSettings:
    reply: str
    context_size: int
    token_delay: float
    """Seconds to wait before each token."""
    load_delay: float
    """Seconds `start` takes."""
    fail_after: int | None
    """Raise `EngineFailure` after this many tokens."""
    capacity: int
    """Requests it holds at once; more are `Overloaded`."""


class FakeEngine:
    def __init__(self, settings: FakeSettings) -> None:
        self._tokens = re.findall(r"\s*\S+|\s+$", settings.reply)
        self._context_size = settings.context_size
        self._token_delay = settings.token_delay
        self._load_delay = settings.load_delay
        self._fail_after = settings.fail_after
        self._ready = False
        self._admission = Admission(settings.capacity, 0)
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

    @property
    def prompt_format(self) -> PromptFormat:
        return "raw"

    async def tokenize(self, request: GenerationRequest) -> PromptTokens:
        return PromptTokens(len(request.prompt) + 1)  # one per character, plus BOS

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        if not self._ready:
            raise EngineNotReady()
        self._admission.admit()
        self.requests.append(request)

        async def release() -> None:
            self._admission.release()

        return EngineStream(self._run(request), if_never_started=release)

    def stats(self) -> EngineStats:
        # The fake runs every admitted request at once: nothing waits.
        return EngineStats(waiting=0, running=self.active, generated_tokens=self._generated)

    def warnings(self) -> list[str]:
        return []

    async def _run(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        self.active += 1
        try:
            for produced, token in enumerate(self._tokens):
                if produced == request.max_tokens:
                    yield Finished("max_tokens")
                    return
                if produced == self._fail_after:
                    raise EngineFailure(f"scripted failure after {produced} tokens")
                if self._token_delay:
                    await asyncio.sleep(self._token_delay)
                if not self._ready:
                    raise Overloaded("The server is shutting down")
                if token.strip() == EOS:
                    yield Finished("end_of_sequence")
                    return
                self._generated += 1
                yield TextDelta(token)
            yield Finished("end_of_sequence")
        finally:
            self.active -= 1
            self._admission.release()

    async def aclose(self) -> None:
        self._ready = False
