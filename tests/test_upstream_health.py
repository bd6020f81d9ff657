"""The upstream engine's health rules against scripted replicas (httpx.MockTransport):
when a replica's silent streams are ended, and when they are left alone.

The real-server versions of these faults (a SIGKILLed and a SIGSTOPped
llama-cpp-python replica) are in test_upstream.py; here the replica's answers are
scripted so that each rule is shown on its own, fast. Nothing asserts on time:
each test checks how a stream ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from tcserve.config import UpstreamModel
from tcserve.core.request import EngineEvent, Finished, GenerationRequest, TextDelta
from tcserve.engines.factory import upstream_settings
from tcserve.engines.upstream.engine import UpstreamEngine
from tcserve.errors import EngineFailure

URL = "http://replica-a:8000"
T = TypeVar("T")


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


def scripted_engine(urls: list[str], serve: Callable[[httpx.Request], Any]) -> UpstreamEngine:
    """An upstream engine whose replicas are `serve` (read_timeout an hour: only the health check ends a hang)."""
    model = UpstreamModel.model_validate({
        "name": "m", "engine": "upstream", "urls": urls, "context_size": 512,
        "health_interval": 0.1, "connect_timeout": 0.3, "read_timeout": 3600,
    })  # fmt: skip
    return UpstreamEngine(upstream_settings(model), transport=httpx.MockTransport(serve))


async def generate(replica: Replica) -> tuple[list[EngineEvent], BaseException | None]:
    events, error, _ = await generate_counted(replica)
    return events, error


async def generate_counted(replica: Replica) -> tuple[list[EngineEvent], BaseException | None, int]:
    """The events, the error that ended them, and the requests still counted in flight after."""
    engine = scripted_engine([URL], replica)
    await engine.start()
    events: list[EngineEvent] = []
    try:
        await wait_up(engine, 1)
        stream = await engine.generate(GenerationRequest("req_test", "Hello", 8))
        try:
            async with asyncio.timeout(60):  # a guard against hanging the suite, not a measurement
                async for event in stream:
                    events.append(event)
        except EngineFailure as error:
            return events, error, engine.stats().running
        return events, None, engine.stats().running
    finally:
        await engine.aclose()


async def wait_up(engine: UpstreamEngine, count: int) -> None:
    """Until the first health check brings `count` replicas up (bounded: a guard, not a measurement)."""
    async with asyncio.timeout(60):
        while sum(up for up, _ in engine.replicas().values()) < count:
            await asyncio.sleep(0.02)


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


async def test_a_finished_stream_is_no_longer_in_flight() -> None:
    """httpx closes a response once its body is read: the count must not depend on that
    (it did: every finished stream stayed "in flight", which skewed fewest-in-flight,
    /metrics and the drain on shutdown)."""

    async def stream() -> AsyncIterator[bytes]:
        yield chunk(" Hi", "length")
        yield b"data: [DONE]\n\n"

    for _ in range(3):
        events, error, in_flight = await generate_counted(Replica(stream, lambda _request: httpx.Response(200)))
        assert error is None and events[-1] == Finished("max_tokens") and in_flight == 0


STUCK, HEALTHY = "http://replica-stuck:8000", "http://replica-healthy:8000"


async def test_a_new_request_is_never_sent_to_a_replica_that_went_silent() -> None:
    """The hang of test_upstream.py's stuck-replica test, scripted: replica A serves a
    stream, then answers nothing at all (SIGSTOP). Once its stream was ended, A has
    no request in flight, so it sorts first by load; the next request must still
    go to B only, its token count included (a count sent to A waited `read_timeout`)."""
    silent = asyncio.Event()  # set: A answers nothing any more
    reached = asyncio.Event()  # set: a request went to A while it was silent

    async def serve(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if str(request.url).startswith(STUCK) and silent.is_set():
            if path == "/health":  # what the client's timeout would raise
                raise httpx.ReadTimeout("no answer", request=request)
            reached.set()
            await asyncio.Event().wait()  # nothing comes back: the client waits read_timeout
        if path == "/health":
            return httpx.Response(200)
        if path == "/tokenize":
            return httpx.Response(200, json={"count": 1, "tokens": [1]})
        return httpx.Response(200, content=stream(request), headers={"content-type": "text/event-stream"})

    async def stream(request: httpx.Request) -> AsyncIterator[bytes]:
        yield chunk(" Hi")
        if str(request.url).startswith(STUCK):
            silent.set()
            await asyncio.Event().wait()  # the stream stays open and says nothing
        yield chunk(" there", "length")
        yield b"data: [DONE]\n\n"

    engine = scripted_engine([STUCK, HEALTHY], serve)
    await engine.start()
    try:
        await wait_up(engine, 2)
        cut = await unless_reached(collect(engine, GenerationRequest("req_1", "Hello", 8)), reached)
        assert cut == [TextDelta(" Hi")]  # the stuck stream went to A (the first of two idle replicas) and ended
        assert engine.replicas()[STUCK] == (False, 0)
        assert (await unless_reached(engine.tokenize(GenerationRequest("req_t", "Hello", 1)), reached)).count == 1
        events = await unless_reached(collect(engine, GenerationRequest("req_2", "Hello", 8)), reached)
        assert events == [TextDelta(" Hi"), TextDelta(" there"), Finished("max_tokens")]
    finally:
        await engine.aclose()


async def collect(engine: UpstreamEngine, request: GenerationRequest) -> list[EngineEvent]:
    """The request's events up to its end, or up to the `EngineFailure` that ended it."""
    events: list[EngineEvent] = []
    with contextlib.suppress(EngineFailure):
        async for event in await engine.generate(request):
            events.append(event)
    return events


async def unless_reached(work: Awaitable[T], reached: asyncio.Event) -> T:
    """`work`'s result; fails as soon as `reached` is set instead (the request went to
    the silent replica and would wait an hour)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(reached.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task not in done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pytest.fail("a request was sent to the silent replica" if reached.is_set() else "no answer in 60 s")
    return task.result()


@pytest.mark.parametrize("first", ["/tokenize", "/v1/completions"])
async def test_a_replica_that_goes_silent_once_picked_does_not_hold_the_request(first: str) -> None:
    """Replica A is up when it is picked and then answers nothing (neither the token
    count nor the stream's headers, nor its health checks): once it is clearly down,
    the waiting call is ended and the other replica serves the request."""
    silent = asyncio.Event()  # set: A answers nothing any more
    armed = asyncio.Event()  # set after start(), whose own checks and token count A still answers

    async def serve(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if str(request.url).startswith(STUCK) and armed.is_set() and (silent.is_set() or path == first):
            silent.set()
            if path == "/health":
                raise httpx.ReadTimeout("no answer", request=request)
            await asyncio.Event().wait()  # nothing comes back: the client waits read_timeout
        if path == "/health":
            return httpx.Response(200)
        if path == "/tokenize":
            return httpx.Response(200, json={"count": 1, "tokens": [1]})
        body = chunk(" Hi") + chunk(" there", "length") + b"data: [DONE]\n\n"
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    engine = scripted_engine([STUCK, HEALTHY], serve)
    await engine.start()
    armed.set()
    never = asyncio.Event()  # nothing is off limits here: the guard alone fails a hang
    try:
        await wait_up(engine, 2)
        assert (await unless_reached(engine.tokenize(GenerationRequest("req_t", "Hello", 1)), never)).count == 1
        events = await unless_reached(collect(engine, GenerationRequest("req_1", "Hello", 8)), never)
        assert events == [TextDelta(" Hi"), TextDelta(" there"), Finished("max_tokens")]
        assert silent.is_set() and engine.replicas()[STUCK] == (False, 0)  # A was picked first, and went silent
    finally:
        await engine.aclose()
