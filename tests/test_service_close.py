"""The serving core's promise: closing a completion's stream early, read or not,
stops the engine's work and records the request as cancelled. An endpoint can close a
stream it never read (its client left before the response started), and an async
generator that never started runs no `finally`: the engine's admission and the
model's lease would stay taken, and the ledger would never hear of the request."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from support import PROMPT, fake_model, settings
from tcserve.api.app import create_app
from tcserve.core.request import CompletionCall, Done


def statuses(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / "usage.sqlite3") as db:
        return sorted(row[0] for row in db.execute("SELECT status FROM usage"))


async def test_a_stream_closed_unread_is_cancelled_and_frees_its_slot(tmp_path: Path) -> None:
    # capacity=1: the fake engine holds one request at a time, so a leaked admission
    # refuses every later request with Overloaded.
    app = create_app(settings(data_dir=tmp_path), [fake_model(reply=" a b c", capacity=1)])
    async with app.router.lifespan_context(app):
        state = app.state.tcserve
        deadline = time.monotonic() + 30
        while not state.engines.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for number in range(3):
            stream = await state.service.complete(CompletionCall(f"req_{number}", "fake", PROMPT, 3), None)
            await stream.aclose()  # never read
        stream = await state.service.complete(CompletionCall("req_read", "fake", PROMPT, 3), None)
        events = [event async for event in stream]
        deadline = time.monotonic() + 30  # cancelled rows are written without waiting for them
        while len(statuses(tmp_path)) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    assert isinstance(events[-1], Done) and "".join(e.text for e in events) == " a b c"
    assert statuses(tmp_path) == ["cancelled", "cancelled", "cancelled", "complete"]
