from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from tcserve.api import sse
from tcserve.api.complete import completion_body
from tcserve.api.errors import OverloadedError, error_event_data

GOLDEN = Path(__file__).parent / "golden" / "stream.sse"


def test_encoder_matches_the_golden_stream() -> None:
    frames = [
        sse.encode("completion", completion_body("compl_01X", "claude-2.1", " Hello", None, None)),
        sse.PING,
        sse.encode("completion", completion_body("compl_01X", "claude-2.1", " wörld\n", None, None)),
        sse.encode("completion", completion_body("compl_01X", "claude-2.1", "", "stop_sequence", "\n\nHuman:")),
    ]
    assert b"".join(frames) == GOLDEN.read_bytes()


def test_unicode_line_breaks_never_split_a_data_line() -> None:
    text = "a\u2028b\u2029c\u0085d\re\nf"
    frame = sse.encode("completion", completion_body("compl_01X", "m", text, None, None)).decode()
    event_line, data_line, blank, end = frame.split("\n")
    assert event_line == "event: completion"
    assert data_line.splitlines() == [data_line]  # what str.splitlines()-based readers see
    assert json.loads(data_line[6:])["completion"] == text
    assert (blank, end) == ("", "")


def test_error_event_shape() -> None:
    frame = sse.encode_raw("error", error_event_data(OverloadedError("Overloaded"), "req_01abc"))
    assert frame == (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"Overloaded"},"request_id":"req_01abc"}\n\n'
    )


async def _slow_frames() -> AsyncIterator[bytes]:
    yield b"a"
    await asyncio.sleep(0.35)
    yield b"b"


async def test_pings_fill_silence_without_losing_frames() -> None:
    out = [frame async for frame in sse.with_pings(_slow_frames(), interval=0.1)]
    assert out[0] == b"a" and out[-1] == b"b"
    assert out[1:-1] and all(frame == sse.PING for frame in out[1:-1])


async def test_closing_the_pinged_stream_closes_the_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        try:
            yield b"a"
            await asyncio.sleep(60)
            yield b"never"
        finally:
            closed.set()

    stream = sse.with_pings(source(), interval=0.05)
    assert await anext(stream) == b"a"
    assert await anext(stream) == sse.PING
    await stream.aclose()  # type: ignore[attr-defined]
    assert closed.is_set()
