"""Server-sent events as the Text Completions stream frames them.

Every event is one `event:` line, one `data:` line of compact JSON and a blank
line (the Go SDK dispatches only on the blank line).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping

PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def encode(event: str, data: Mapping[str, object]) -> bytes:
    return encode_raw(event, json.dumps(data, separators=(",", ":"), ensure_ascii=False))


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
