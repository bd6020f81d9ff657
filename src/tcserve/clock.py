"""Timestamps as tcserve writes them."""

from __future__ import annotations

from datetime import UTC, datetime


def now_iso() -> str:
    """Now, in UTC, to the millisecond (the ledger's times)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def iso_z(when: datetime) -> str:
    """`2026-11-01T12:00:00Z`: RFC 3339 in UTC, to the second, as Anthropic's API writes times."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
