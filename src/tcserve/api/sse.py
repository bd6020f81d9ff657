"""Server-sent events as the Text Completions stream frames them.

Every event is one `event:` line, one `data:` line of compact JSON and a blank
line (the Go SDK dispatches only on the blank line).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("tcserve.sse")

PING = b'event: ping\ndata: {"type":"ping"}\n\n'


# JSON leaves these unescaped, but line readers that follow str.splitlines() (httpx's
# aiter_lines, for one) break a data: line at them. Escaping keeps one event one line.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def encode(event: str, data: Mapping[str, object]) -> bytes:
    return encode_raw(event, json.dumps(data, separators=(",", ":"), ensure_ascii=False).translate(_LINE_BREAKS))


def encode_raw(event: str, data_json: str) -> bytes:
    # Compact JSON never contains a raw newline, so one data: line is always enough.
    return f"event: {event}\ndata: {data_json}\n\n".encode()


async def with_pings(frames: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """Pass `frames` through, adding a `ping` whenever `interval` seconds pass
    without one. The pending frame is awaited, never cancelled, by a ping."""
    pending: asyncio.Task[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(frames))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield PING
                continue
            try:
                frame = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield frame
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()


class SlowReader(Exception):
    """The client stopped reading its stream: it was cut off."""


class EventStreamResponse(StreamingResponse):
    """A stream whose client must keep reading: a send that cannot complete within
    `write_timeout` seconds (the socket's buffers are full because the client stopped
    reading) ends the stream, which frees the request's slot. Other streams never wait
    for it: each has its own queue and its own connection."""

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        write_timeout: float,
        headers: Mapping[str, str],
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`on_close` runs when the response is over, however it ended: also when the
        client left before the stream started, when `frames` never ran at all."""
        super().__init__(frames, media_type="text/event-stream; charset=utf-8", headers=headers)
        self._frames = frames
        self._write_timeout = write_timeout
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._on_close is not None:
                await self._on_close()

    async def stream_response(self, send: Send) -> None:
        async def send_or_give_up(message: dict[str, object]) -> None:
            try:
                await asyncio.wait_for(send(message), self._write_timeout)
            except TimeoutError:
                raise SlowReader(f"the client read nothing for {self._write_timeout:g} s") from None

        try:
            await super().stream_response(send_or_give_up)  # type: ignore[arg-type]
        finally:
            # On a cut-off (or any failure to send) the frames are not drained: close them
            # now, which closes the engine's stream, instead of whenever they are collected.
            await self._frames.aclose()  # type: ignore[attr-defined]
