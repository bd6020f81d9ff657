"""Every request admitted to an upstream model is in flight at the upstream at once.

An upstream's own batching (vLLM's) is what makes it fast at 64 or 200 concurrent
requests, so tcserve must not hold them back below `max_in_flight`. httpx's default
pool did: 100 connections at most, and the 101st stream waited for a free one and
failed with a PoolTimeout once `connect_timeout` had passed. Here a real HTTP server
stands in for the upstream and holds every completion until all of them have arrived;
the requests come through tcserve's upstream engine, on real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from support import serve_app
from tcserve.config import UpstreamModel
from tcserve.core.request import Finished, GenerationRequest, TextDelta
from tcserve.engines.factory import upstream_settings
from tcserve.engines.upstream.engine import UpstreamEngine

STREAMS = 120
"""More than httpx's default pool of 100 connections."""
GUARD_S = 30
"""How long the fake upstream waits for all the streams before it answers anyway: a
guard against hanging the suite, not a measurement (all arrive within a second)."""


class HoldingUpstream:
    """An OpenAI-compatible server that answers no completion until `expected` of them
    are in flight together, and records the most that ever were."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.in_flight = 0
        self.most = 0
        self._all_here: asyncio.Event | None = None
        self.app = FastAPI()
        self.app.get("/health")(self.health)
        self.app.post("/v1/completions")(self.complete)

    async def health(self) -> JSONResponse:
        return JSONResponse({})

    async def complete(self, request: Request) -> StreamingResponse:
        assert json.loads(await request.body())["stream"] is True
        if self._all_here is None:
            self._all_here = asyncio.Event()
        self.in_flight += 1  # one event loop serves every request: no lock
        self.most = max(self.most, self.in_flight)
        if self.in_flight >= self.expected:
            self._all_here.set()
        return StreamingResponse(self._answer(self._all_here), media_type="text/event-stream")

    async def _answer(self, all_here: asyncio.Event) -> AsyncIterator[bytes]:
        with contextlib.suppress(TimeoutError):  # answer anyway: the test sees they never were all in flight
            await asyncio.wait_for(all_here.wait(), GUARD_S)
        self.in_flight -= 1
        body = {"choices": [{"index": 0, "text": "done", "finish_reason": "length"}]}
        yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


async def test_streams_beyond_httpx_s_default_pool_are_all_in_flight_at_the_upstream() -> None:
    upstream = HoldingUpstream(STREAMS)
    with serve_app(upstream.app, wait_ready=False) as url:
        model = UpstreamModel.model_validate({
            "name": "m", "engine": "upstream", "urls": [url], "context_size": 512,
            "max_in_flight": STREAMS, "health_interval": 60,
        })  # fmt: skip
        engine = UpstreamEngine(upstream_settings(model))
        await engine.start()
        try:

            async def one(index: int) -> list[object]:
                stream = await engine.generate(GenerationRequest(f"req_{index}", "Hello", 8))
                return [event async for event in stream]

            answers = await asyncio.gather(*(one(i) for i in range(STREAMS)))
        finally:
            await engine.aclose()
    assert upstream.most == STREAMS  # each on a connection of its own: HTTP/1.1 streams one response at a time
    for events in answers:
        assert [e.text for e in events if isinstance(e, TextDelta)] == ["done"]
        assert isinstance(events[-1], Finished) and events[-1].reason == "max_tokens"
