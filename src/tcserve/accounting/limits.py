"""Per-key limits on requests, input tokens and output tokens per minute.

Each limit is a token bucket that holds one minute's allowance and refills
continuously, so a key may burst up to its limit and then proceeds at the
limit's pace. A request is admitted when every bucket can pay for it: one
request, its prompt tokens, and at least one output token (output is charged
as it is produced, at the end, and may run the bucket into debt, which later
requests wait out). Lives on the event loop: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from tcserve.accounting.keys import KeyRecord
from tcserve.clock import iso_z
from tcserve.errors import RateLimited

WINDOW = 60.0


@dataclass
class Bucket:
    limit: int
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.limit, self.level + (now - self.updated) * self.limit / WINDOW)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 when it is now)."""
        return max(0.0, (amount - self.level) * WINDOW / self.limit)

    def seconds_to_full(self) -> float:
        return self.wait_for(self.limit)


@dataclass
class _KeyBuckets:
    requests: Bucket | None
    input: Bucket | None
    output: Bucket | None

    def apply(self, limits: tuple[int | None, int | None, int | None], now: float) -> None:
        """New limits for a key whose record changed: what was used stays used."""
        self.requests, self.input, self.output = (
            _changed(bucket, limit, now)
            for bucket, limit in zip((self.requests, self.input, self.output), limits, strict=True)
        )

    def all(self) -> list[tuple[str, Bucket]]:
        named = (("requests", self.requests), ("input-tokens", self.input), ("output-tokens", self.output))
        return [(name, bucket) for name, bucket in named if bucket is not None]


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._keys: dict[str, _KeyBuckets] = {}
        self.clock = clock
        """Seconds, monotonic; a test can stop it to read exact bucket levels."""

    def admit(self, key: KeyRecord, input_tokens: int) -> None:
        """Take one request and the prompt's tokens, or raise `RateLimited` (taking nothing).
        `key` is the record in force now: its limits apply from this request on."""
        buckets = self._buckets(key, current=True)
        now = self.clock()
        needs = {"requests": 1.0, "input-tokens": float(input_tokens), "output-tokens": 1.0}
        waits = []
        for name, bucket in buckets.all():
            bucket.refill(now)
            if needs[name] > bucket.limit:
                raise RateLimited(f"{needs[name]:.0f} {name} exceed the key's {bucket.limit}", retry_after=WINDOW)
            waits.append((bucket.wait_for(needs[name]), name))
        wait, name = max(waits, default=(0.0, ""))
        if wait > 0:
            raise RateLimited(name, retry_after=wait)
        for name, bucket in buckets.all():
            if name != "output-tokens":
                bucket.level -= needs[name]

    def charge_output(self, key: KeyRecord, tokens: int) -> None:
        _charge(self._buckets(key).output, tokens, self.clock())

    def charge_input(self, key: KeyRecord, tokens: int) -> None:
        """Prompt tokens known only at the end (an engine that cannot count them first)."""
        _charge(self._buckets(key).input, tokens, self.clock())

    def headers(self, key: KeyRecord) -> dict[str, str]:
        """`anthropic-ratelimit-*` headers for a key with limits ({} for an unlimited key)."""
        buckets = self._buckets(key)
        now = self.clock()
        headers: dict[str, str] = {}
        token_buckets = []
        for name, bucket in buckets.all():
            bucket.refill(now)
            headers.update(_bucket_headers(name, bucket, bucket.level, bucket.seconds_to_full()))
            if name != "requests":
                token_buckets.append(bucket)
        if token_buckets:  # tokens-*: the most restrictive of the token limits
            tightest = min(token_buckets, key=lambda b: b.level)
            headers.update(_bucket_headers("tokens", tightest, tightest.level, tightest.seconds_to_full()))
        return headers

    def _buckets(self, key: KeyRecord, *, current: bool = False) -> _KeyBuckets:
        """A key's buckets, by name. The keys file is re-read live, so a key's limits can
        change: only the record of a new request (`current`) updates them; the record a
        finishing request captured earlier never does."""
        limits = (key.requests_per_minute, key.input_tokens_per_minute, key.output_tokens_per_minute)
        buckets = self._keys.get(key.name)
        if buckets is None:
            now = self.clock()
            buckets = self._keys[key.name] = _KeyBuckets(*(_bucket(limit, now) for limit in limits))
        elif current:
            buckets.apply(limits, self.clock())
        return buckets


def _charge(bucket: Bucket | None, tokens: int, now: float) -> None:
    """Take tokens already spent: the bucket may go into debt, which later requests wait out."""
    if bucket is not None:
        bucket.refill(now)
        bucket.level -= tokens


def _bucket(limit: int | None, now: float) -> Bucket | None:
    """A full bucket (or none, without a limit)."""
    return None if limit is None else Bucket(limit, float(limit), now)


def _changed(bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
    if bucket is None or limit is None:
        return _bucket(limit, now)  # a limit added (a full bucket) or removed (none)
    if bucket.limit != limit:
        bucket.refill(now)
        bucket.limit = limit
        bucket.level = min(bucket.level, float(limit))
    return bucket


def _bucket_headers(name: str, bucket: Bucket, level: float, to_full: float) -> dict[str, str]:
    reset = iso_z(datetime.fromtimestamp(time.time() + to_full, UTC))
    prefix = f"anthropic-ratelimit-{name}"
    return {
        f"{prefix}-limit": str(bucket.limit),
        f"{prefix}-remaining": str(max(0, int(level))),
        f"{prefix}-reset": reset,
    }
