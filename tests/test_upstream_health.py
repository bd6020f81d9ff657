"""The upstream engine's health rules against scripted replicas (httpx.MockTransport):
when a replica's silent streams are ended, and when they are left alone.

The real-server versions of these faults (a SIGKILLed and a SIGSTOPped
llama-cpp-python replica) are in test_upstream.py; here the replica's answers are
scripted so that each rule is shown on its own, fast. Nothing asserts on time:
each test checks how a stream ended.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tcserve.config import UpstreamModel
from tcserve.core.request import EngineEvent, Finished, GenerationRequest, TextDelta
from tcserve.engines.factory import upstream_settings
from tcserve.engines.upstream.engine import UpstreamEngine
from tcserve.errors import EngineFailure

URL = "http://replica-a:8000"


def chunk(text: str, finish: str | None = None) -> bytes:
    body = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()


class Replica:
    """A scripted OpenAI-compatible server: `stream` makes the completion's body;
    `health` answers /health while a completion is in flight."""

    def __init__(self, stream: Callable[[], AsyncIterator[bytes]], health: Callable[[httpx.Request], object]) -> None:
        self.stream = stream
        self.health = health
        self.busy = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            if self.busy:
                outcome = self.health(request)
                if asyncio.iscoroutine(outcome):
                    outcome = await outcome
                assert isinstance(outcome, httpx.Response)
                return outcome
            return httpx.Response(200)
        if request.url.path in ("/tokenize", "/extras/tokenize"):
            return httpx.Response(404)  # a server that cannot count tokens for us
        assert request.url.path == "/v1/completions"
        return httpx.Response(200, content=self._tracked(), headers={"content-type": "text/event-stream"})

    async def _tracked(self) -> AsyncIterator[bytes]:
        self.busy += 1
        try:
            async for part in self.stream():
                yield part
        finally:
            self.busy -= 1


async def generate(replica: Replica) -> tuple[list[EngineEvent], BaseException | None]:
    model = UpstreamModel.model_validate({
        "name": "m", "engine": "upstream", "urls": [URL], "context_size": 512,
        "health_interval": 0.1, "connect_timeout": 0.3, "read_timeout": 3600,
    })  # fmt: skip
    engine = UpstreamEngine(upstream_settings(model), transport=httpx.MockTransport(replica))
    await engine.start()
    events: list[EngineEvent] = []
    try:
        while not engine.replicas()[URL][0]:  # the first health check brings it up
            await asyncio.sleep(0.02)
        stream = await engine.generate(GenerationRequest("req_test", "Hello", 8))
        try:
            async with asyncio.timeout(60):  # a guard against hanging the suite, not a measurement
                async for event in stream:
                    events.append(event)
        except EngineFailure as error:
            return events, error
        return events, None
    finally:
        await engine.aclose()


async def test_a_replica_answering_503_ends_its_silent_stream() -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield chunk(" Hi")
        await asyncio.sleep(3600)  # the engine behind it died; the connection stays open

    events, error = await generate(Replica(stream, lambda _: httpx.Response(503)))
    assert events == [TextDelta(" Hi")]
    assert error is not None and "is down and its stream has been silent" in str(error)


async def test_health_timeouts_in_a_row_end_a_silent_stream() -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield chunk(" Hi")
        await asyncio.sleep(3600)

    def hang(request: httpx.Request) -> object:
        raise httpx.ReadTimeout("no answer", request=request)

    events, error = await generate(Replica(stream, hang))
    assert events == [TextDelta(" Hi")]
    assert error is not None and "is down and its stream has been silent" in str(error)


@pytest.mark.parametrize("silence", [0.2, 0.6])
async def test_a_slow_prompt_survives_a_health_check_that_times_out(silence: float) -> None:
    """llama-cpp-python's /v1/models waits while a long prompt is processed: that alone
    (fewer than STALL_CHECKS timeouts in a row, each taking connect_timeout) must not
    end the stream that is waiting for its first token."""

    async def stream() -> AsyncIterator[bytes]:
        await asyncio.sleep(silence)  # processing the prompt: nothing to send yet
        yield chunk(" Hi")
        yield chunk(" there", "length")
        yield b"data: [DONE]\n\n"

    async def slow(request: httpx.Request) -> object:
        await asyncio.sleep(0.3)  # as long as connect_timeout, then the client gives up
        raise httpx.ReadTimeout("busy", request=request)

    events, error = await generate(Replica(stream, slow))
    assert error is None
    assert events == [TextDelta(" Hi"), TextDelta(" there"), Finished("max_tokens")]
