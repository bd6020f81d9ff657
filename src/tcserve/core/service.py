"""The serving core: one completion request from a caller to its events.

    resolve the model -> permission -> validate -> lease the engine (loading
    it on demand) -> tokenize once -> admit
    (the key's limits, the engine's queue) -> generate -> stop matching ->
    accounting (time to first token, the key's charges, the ledger, /metrics)

`CompletionService.complete` does everything that can fail before a response
starts, so that the HTTP edge can still answer those failures with their real
status; it returns the stream, whose failures can only be SSE `error` events
(or a 500 for a caller that did not stream). The same service serves every
endpoint and the command line: nothing here knows about HTTP.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace

from tcserve.accounting.keys import KeyRecord
from tcserve.accounting.ledger import Ledger, UsageRow
from tcserve.accounting.limits import Limiter
from tcserve.accounting.metrics import Metrics
from tcserve.clock import now_iso
from tcserve.core.catalog import Catalog
from tcserve.core.engines import Engines, Lease
from tcserve.core.request import (
    Chunk,
    CompletionCall,
    CompletionEvent,
    Done,
    EngineEvent,
    Finished,
    StopReason,
    TextDelta,
    Usage,
)
from tcserve.core.stops import StopMatch, StopMatcher
from tcserve.core.validate import RequestCaps, check_caps, check_context, to_generation_request
from tcserve.errors import DeadlineExceeded, EngineFailure, PermissionDenied


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    caps: RequestCaps
    request_timeout: float
    """Seconds a completion may run, from its arrival, before it is ended."""


class CompletionService:
    def __init__(
        self,
        catalog: Catalog,
        engines: Engines,
        policy: ServicePolicy,
        limiter: Limiter,
        metrics: Metrics,
        ledger: Ledger | None = None,
    ) -> None:
        self._catalog = catalog
        self._engines = engines
        self._policy = policy
        self._limiter = limiter
        self._metrics = metrics
        self._ledger = ledger

    async def complete(
        self, call: CompletionCall, key: KeyRecord | None, arrived: float | None = None
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Admit the call and return its events: `Chunk`s, then exactly one `Done`.

        Raises before anything is generated (`tcserve.errors`: the caller's mistake,
        an unknown model, a key's permission or limits, a full queue, a model still
        loading). Closing the returned stream early (a stop, a client gone) stops the
        engine's work for it and records the request as cancelled.
        """
        arrived = time.monotonic() if arrived is None else arrived
        check_caps(call, self._policy.caps)
        model = self._catalog.resolve(call.model).served_by
        if key is not None and not key.allows(call.model):
            raise PermissionDenied(f"API key {key.name!r} may not use model {call.model!r}")
        request = to_generation_request(call, check_transcript=model.check_transcript)
        lease = await self._engines.acquire(model)  # waits for a load, bounded (core/engines.py)
        try:
            engine = lease.engine
            tokens = await engine.tokenize(request)  # what the engine will feed: a chat model's rendered prompt
            check_context(tokens, request.max_tokens, engine.context_size)
            if key is not None:
                self._limiter.admit(key, tokens.count or 0)
            accounting = _Accounting(self, call, model.name, key, tokens.count, arrived)
            events = await engine.generate(replace(request, tokens=tokens))
        except BaseException:
            lease.release()
            raise
        deadline = arrived + self._policy.request_timeout
        return _completion_events(events, StopMatcher(request.stop_sequences), accounting, deadline,
                                  self._policy.request_timeout, lease)  # fmt: skip


async def _completion_events(
    events: AsyncIterator[EngineEvent],
    matcher: StopMatcher,
    accounting: _Accounting,
    deadline: float,
    limit: float,
    lease: Lease,
) -> AsyncGenerator[CompletionEvent, None]:
    """Engine events -> completion events, with the stop matcher between them (so every
    engine gets the same stop semantics), the deadline (checked per event) and the
    accounting at the first text and at the end."""
    output_tokens = 0
    ended = False
    try:
        async for event in events:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(limit)
            if isinstance(event, TextDelta):
                output_tokens += event.tokens
                released = matcher.feed(event.text)
                if not isinstance(released, StopMatch):
                    if released:
                        accounting.first_text()
                        yield Chunk(released)
                    continue
                done = Done(released.text_before, "stop_sequence", released.stop, accounting.usage(output_tokens))
            else:
                done = _done(event, matcher.flush(), accounting, output_tokens)
            accounting.first_text()
            await accounting.finished(done)  # committed before the client sees the end
            ended = True
            yield done
            return
        raise EngineFailure("engine stream ended without a Finished event")
    except Exception:
        if not ended:
            accounting.ended_early("failed", output_tokens)
            ended = True
        raise
    finally:
        if not ended:
            accounting.ended_early("cancelled", output_tokens)
        try:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            lease.release()  # the model may be unloaded once idle


def _done(event: Finished, held: str, accounting: _Accounting, counted: int) -> Done:
    reason: StopReason = "max_tokens" if event.reason == "max_tokens" else "stop_sequence"
    stop = event.stop if event.reason == "stop_sequence" else None
    # An engine's own usage figures (an upstream's) win over our count of its deltas.
    output_tokens = counted if event.completion_tokens is None else event.completion_tokens
    return Done(held, reason, stop, accounting.usage(output_tokens, event.prompt_tokens))


class _Accounting:
    """What a completion's end updates: time to first token, the key's tokens, the
    usage ledger (whose row is committed before the final event) and /metrics."""

    def __init__(
        self,
        service: CompletionService,
        call: CompletionCall,
        model_name: str,
        key: KeyRecord | None,
        prompt_tokens: int | None,
        arrived: float,
    ) -> None:
        self._service = service
        self._call = call
        self._model_name = model_name
        self._key = key
        self._prompt_tokens = prompt_tokens
        self._arrived = arrived
        self._started_at = now_iso()
        self._waiting = True

    def first_text(self) -> None:
        if self._waiting:
            self._waiting = False
            self._service._metrics.observe_first_token(self._model_name, time.monotonic() - self._arrived)

    def usage(self, output_tokens: int, reported_input: int | None = None) -> Usage:
        """The request's usage. Its prompt was counted before admission, unless the
        engine could not count it: then the engine's own report is charged now."""
        if self._prompt_tokens is None and reported_input is not None:
            self._prompt_tokens = reported_input
            if self._key is not None:
                self._service._limiter.charge_input(self._key, reported_input)
        return Usage(self._prompt_tokens or 0, output_tokens)

    async def finished(self, done: Done) -> None:
        self._charge(done.usage)
        if self._service._ledger is not None:
            await self._service._ledger.record(self._row("complete", done.stop_reason, done.usage))

    def ended_early(self, status: str, output_tokens: int) -> None:
        """Cancelled or failed: recorded without waiting (there may be nobody to answer)."""
        usage = self.usage(output_tokens)
        self._charge(usage)
        if self._service._ledger is not None:
            self._service._ledger.submit(self._row(status, None, usage))

    def _charge(self, usage: Usage) -> None:
        if self._key is not None:
            self._service._limiter.charge_output(self._key, usage.output_tokens)
        self._service._metrics.count_tokens(self._model_name, usage)

    def _row(self, status: str, stop_reason: str | None, usage: Usage) -> UsageRow:
        return UsageRow(
            request_id=self._call.request_id,
            key_name=self._key.name if self._key else None,
            model=self._call.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            stop_reason=stop_reason,
            status=status,
            started_at=self._started_at,
            finished_at=now_iso(),
        )
