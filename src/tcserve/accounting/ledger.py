"""The usage ledger: every finished request (complete, cancelled or failed), in SQLite.

Writes go to one writer thread with its own connection, in WAL mode, batched:
whatever is queued when a transaction starts is committed together. `record`
returns once the row is committed, so the serving core can await it before it
sends the final event: a request its client saw finish is in the ledger even
if the server is killed right after (a committed WAL transaction survives a
process crash). Nothing here runs on the event loop or the engine's thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from concurrent.futures import Future
from dataclasses import astuple, dataclass
from pathlib import Path

log = logging.getLogger("tcserve.ledger")

LEDGER_FILE = "usage.sqlite3"
"""The ledger's file name inside --data-dir."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT PRIMARY KEY,
    key_name TEXT,
    model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    stop_reason TEXT,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_finished_at ON usage (finished_at);
"""


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    key_name: str | None
    model: str
    input_tokens: int
    output_tokens: int
    stop_reason: str | None
    status: str
    """complete, cancelled or failed"""
    started_at: str
    finished_at: str


class Ledger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._queue: queue.SimpleQueue[tuple[UsageRow, Future[None]] | None] = queue.SimpleQueue()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="ledger", daemon=True)
        self._thread.start()
        self._ready.result()  # fail at start-up, not at the first request, if the file is unusable

    async def record(self, usage: UsageRow) -> None:
        """Commit the row; returns when it is on disk (in the WAL)."""
        await asyncio.wrap_future(self.submit(usage))

    def submit(self, usage: UsageRow) -> Future[None]:
        """Queue the row without waiting (for requests that ended without a client)."""
        done: Future[None] = Future()
        self._queue.put((usage, done))
        return done

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            connection = connect(self.path)
            connection.executescript(SCHEMA)
        except sqlite3.Error as error:
            self._ready.set_exception(error)
            return
        self._ready.set_result(None)
        stopping = False
        while not stopping and (item := self._queue.get()) is not None:
            batch = [item]
            while not self._queue.empty():  # everything queued meanwhile goes in the same transaction
                more = self._queue.get()
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            self._write(connection, batch)
        connection.close()

    def _write(self, connection: sqlite3.Connection, batch: list[tuple[UsageRow, Future[None]]]) -> None:
        try:
            with connection:  # one transaction for the batch
                connection.executemany(
                    "INSERT OR REPLACE INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [astuple(usage) for usage, _ in batch],
                )
        except sqlite3.Error as error:
            log.error("could not write %d usage rows: %s", len(batch), error)
            for _, done in batch:
                done.set_exception(error)
            return
        for _, done in batch:
            done.set_result(None)


def connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process; fsync at checkpoints
    connection.execute("PRAGMA busy_timeout=5000")
    return connection


def totals(
    path: Path, since: str | None = None, until: str | None = None, key: str | None = None, model: str | None = None
) -> list[tuple[str, str, int, int, int]]:
    """(key, model, requests, input tokens, output tokens) per key and model, in a
    period, optionally for one key name ("-": requests made without a key) or model."""
    connection = connect(path)
    try:
        rows = connection.execute(
            "SELECT COALESCE(key_name, '-'), model, COUNT(*), SUM(input_tokens), SUM(output_tokens) FROM usage "
            "WHERE finished_at >= :since AND finished_at < :until "
            "AND (:key IS NULL OR COALESCE(key_name, '-') = :key) AND (:model IS NULL OR model = :model) "
            "GROUP BY 1, 2 ORDER BY 1, 2",
            {"since": since or "", "until": until or "9999", "key": key, "model": model},
        ).fetchall()
    finally:
        connection.close()
    return [(str(k), str(m), int(n), int(i or 0), int(o or 0)) for k, m, n, i, o in rows]
