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
    ) -> CompletionStream:
        """Admit the call and return its events: `Chunk`s, then exactly one `Done`.

        Raises before anything is generated (`tcserve.errors`: the caller's mistake,
        an unknown model, a key's permission or limits, a full queue, a model still
        loading). Closing the returned stream early (a stop, a client gone), read or
        not, stops the engine's work for it and records the request as cancelled.
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
        return CompletionStream(events, StopMatcher(request.stop_sequences), accounting, lease, deadline,
                                self._policy.request_timeout)  # fmt: skip


class CompletionStream:
    """An admitted completion's events: `Chunk`s, then exactly one `Done`.

    Engine events become completion events here, with the stop matcher between them
    (so every engine gets the same stop semantics), the deadline (checked per event)
    and the accounting at the first text and at the end. `aclose()` ends the stream
    and frees what it holds (the engine's work, the model's lease, the ledger row of a
    cancelled request) whether or not it was ever read: a client can leave before its
    response starts, and an async generator that never started runs no `finally`.
    """

    def __init__(
        self,
        events: AsyncIterator[EngineEvent],
        matcher: StopMatcher,
        accounting: _Accounting,
        lease: Lease,
        deadline: float,
        limit: float,
    ) -> None:
        self._events = events
        self._matcher = matcher
        self._accounting = accounting
        self._lease = lease
        self._deadline = deadline
        self._limit = limit
        self._output_tokens = 0
        self._ended = False
        """The request is accounted for (finished or failed); closing then records nothing."""
        self._closed = False
        self._iterator = self._run()

    def __aiter__(self) -> CompletionStream:
        return self

    async def __anext__(self) -> CompletionEvent:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        await self._iterator.aclose()
        await self._close()

    async def _run(self) -> AsyncGenerator[CompletionEvent, None]:
        accounting = self._accounting
        try:
            async for event in self._events:
                if time.monotonic() > self._deadline:
                    raise DeadlineExceeded(self._limit)
                if isinstance(event, TextDelta):
                    self._output_tokens += event.tokens
                    released = self._matcher.feed(event.text)
                    if not isinstance(released, StopMatch):
                        if released:
                            accounting.first_text()
                            yield Chunk(released)
                        continue
                    usage = accounting.usage(self._output_tokens)
                    done = Done(released.text_before, "stop_sequence", released.stop, usage)
                else:
                    done = _done(event, self._matcher.flush(), accounting, self._output_tokens)
                accounting.first_text()
                self._ended = True  # accounted once, even if the wait for the ledger is cut short
                await accounting.finished(done)  # committed before the client sees the end
                yield done
                return
            raise EngineFailure("engine stream ended without a Finished event")
        except Exception:
            if not self._ended:
                accounting.ended_early("failed", self._output_tokens)
                self._ended = True
            raise
        finally:
            await self._close()

    async def _close(self) -> None:
        """Once: a request that was neither finished nor failed was cancelled; the
        engine's stream is closed (which stops its work) and the lease given back."""
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            self._ended = True
            self._accounting.ended_early("cancelled", self._output_tokens)
        try:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._lease.release()  # the model may be unloaded once idle


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
