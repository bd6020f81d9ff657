"""POST /v1/complete: wire request -> `GenerationRequest` -> completion events -> JSON or SSE.

Everything that can fail is checked before the 200 goes out (spec: version,
body, model, prompt rules, context fit, engine readiness), so that those
failures are ordinary JSON errors with their real status; after that, a
failure can only be an SSE `error` event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from tcserve.core import transcript as prompt
from tcserve.api import sse
from tcserve.api.disconnect import ClientDisconnected, until_disconnected
from tcserve.api.errors import (
    InvalidRequestError,
    PermissionDeniedError,
    error_event_data,
    to_api_error,
    validation_message,
)
from tcserve.api.headers import require_version
from tcserve.api.middleware import key_of, request_id_of
from tcserve.api.openapi import ERROR_RESPONSES
from tcserve.api.protocol import Completion, CompletionRequest
from tcserve.api.state import ServerState, server_state
from tcserve.core.service import CompletionEvent, Done, check_context, complete
from tcserve.config import ServedModel, Settings
from tcserve.errors import DeadlineExceeded
from tcserve.core.request import HUMAN_STOP, GenerationRequest, SamplingParams
from tcserve.ids import new_id
from tcserve.accounting.keys import KeyRecord
from tcserve.accounting.ledger import Usage, now_iso

router = APIRouter()

CLIENT_CLOSED_REQUEST = 499
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@router.post(
    "/v1/complete",
    response_model=Completion,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CompletionRequest"}}},
        }
    },
    dependencies=[Depends(require_version)],
    summary="Create a Text Completion",
)
async def create_completion(request: Request) -> Response:
    arrived = time.monotonic()
    state = server_state(request)
    request_id = request_id_of(request.scope)
    wire = parse_completion_request(await read_body(request, state.settings.body_timeout))
    check_limits(wire, state.settings)
    model = state.catalog.resolve(wire.model).served_by
    key = key_of(request.scope)
    if key is not None and not key.allows(wire.model):
        raise PermissionDeniedError(f"API key {key.name!r} may not use model {wire.model!r}")
    generation = to_generation_request(wire, model, request_id)
    engine = state.ready_engine(model.name)
    prompt_tokens = await check_context(engine, generation)
    if key is not None:
        state.limiter.admit(key, prompt_tokens)
    accounting = _Accounting(state, request_id, wire.model, key, prompt_tokens, arrived)
    deadline = arrived + state.settings.request_timeout
    events = accounted(await complete(engine, generation), accounting, deadline, state.settings.request_timeout)
    completion_id = new_id("compl")
    if wire.stream:
        frames = sse_frames(events, completion_id, wire.model, request_id)
        return sse.EventStreamResponse(
            sse.with_pings(frames, state.settings.ping_interval),
            write_timeout=state.settings.slow_reader_timeout,
            headers=SSE_HEADERS,
        )
    try:
        body = await until_disconnected(request, whole_completion(events, completion_id, wire.model))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; the access log does
    return JSONResponse(body)


class _Accounting:
    """What a completion's end updates: time to first token, the key's output
    tokens, and the usage ledger, whose row is committed before the final event."""

    def __init__(
        self, state: ServerState, request_id: str, model: str, key: KeyRecord | None, prompt_tokens: int, arrived: float
    ) -> None:
        self._state = state
        self._ttft = state.metrics.time_to_first_token.labels(state.catalog.resolve(model).served_by.name)
        self._request_id = request_id
        self._model = model
        self._key = key
        self._prompt_tokens = prompt_tokens
        self._arrived = arrived
        self._started_at = now_iso()

    def first_text(self) -> None:
        self._ttft.observe(time.monotonic() - self._arrived)

    async def finished(self, done: Done) -> None:
        self._charge(done.output_tokens)
        if self._state.ledger is not None:
            await self._state.ledger.record(self._usage("complete", done.stop_reason, done.output_tokens))

    def ended_early(self, status: str, output_tokens: int) -> None:
        """Cancelled or failed: recorded without waiting (there may be nobody to answer)."""
        self._charge(output_tokens)
        if self._state.ledger is not None:
            self._state.ledger.submit(self._usage(status, None, output_tokens))

    def _charge(self, output_tokens: int) -> None:
        if self._key is not None:
            self._state.limiter.charge_output(self._key, output_tokens)

    def _usage(self, status: str, stop_reason: str | None, output_tokens: int) -> Usage:
        key_name = self._key.name if self._key else None
        return Usage(self._request_id, key_name, self._model, self._prompt_tokens, output_tokens, stop_reason,
                     status, self._started_at, now_iso())  # fmt: skip


async def accounted(
    events: AsyncGenerator[CompletionEvent, None], accounting: _Accounting, deadline: float, limit: float
) -> AsyncGenerator[CompletionEvent, None]:
    """Pass events through to the wire, with the accounting at the first text and at
    the end, and end a generation that runs past its deadline (checked per event)."""
    waiting, finished, pieces = True, False, 0
    try:
        async with aclosing(events):
            async for event in events:
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(limit)
                pieces += 1
                if waiting and (event.text or isinstance(event, Done)):
                    waiting = False
                    accounting.first_text()
                if isinstance(event, Done):
                    await accounting.finished(event)  # committed before the client sees the end
                    finished = True
                yield event
    except Exception:
        accounting.ended_early("failed", pieces)
        finished = True
        raise
    finally:
        if not finished:
            accounting.ended_early("cancelled", pieces)


async def read_body(request: Request, timeout: float) -> bytes:
    """The body, or a 400 for a client that sends it too slowly (it would hold a
    connection and a task for as long as it likes)."""
    try:
        return await asyncio.wait_for(request.body(), timeout)
    except TimeoutError:
        raise InvalidRequestError(f"The request body did not arrive within {timeout:g} seconds") from None


def parse_completion_request(body: bytes) -> CompletionRequest:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"The request body is not valid JSON: {error}") from None
    except RecursionError:  # json's parser recurses once per level of nesting
        raise InvalidRequestError("The request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as error:
        raise InvalidRequestError(validation_message(error.errors())) from None


def check_limits(wire: CompletionRequest, settings: Settings) -> None:
    """Caps that protect the process: a huge prompt costs CPU to tokenize before the
    context check can refuse it, and every stop sequence is matched at every token."""
    if len(wire.prompt) > settings.max_prompt_chars:
        raise InvalidRequestError(f"prompt: at most {settings.max_prompt_chars} characters are accepted")
    stops = wire.stop_sequences or []
    if len(stops) > settings.max_stop_sequences:
        raise InvalidRequestError(f"stop_sequences: at most {settings.max_stop_sequences} are accepted")
    if any(len(stop) > settings.max_stop_chars for stop in stops):
        raise InvalidRequestError(f"stop_sequences: each may have at most {settings.max_stop_chars} characters")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def to_generation_request(wire: CompletionRequest, model: ServedModel, request_id: str) -> GenerationRequest:
    """Parse, don't validate: the only way a wire request reaches an engine."""
    user_stops = tuple(wire.stop_sequences or ())
    if any(stop == "" for stop in user_stops):
        raise InvalidRequestError("stop_sequences: a stop sequence must not be empty")
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt.prepare(wire.prompt, check_transcript=model.check_transcript),
        max_tokens=wire.max_tokens_to_sample,
        sampling=SamplingParams(
            temperature=1.0 if wire.temperature is None else float(wire.temperature),
            top_p=None if wire.top_p is None else float(wire.top_p),
            top_k=wire.top_k or None,
        ),
        stop_sequences=(HUMAN_STOP, *user_stops),
    )


def completion_body(
    completion_id: str, model: str, text: str, stop_reason: str | None, stop: str | None
) -> dict[str, Any]:
    return {
        "type": "completion",
        "id": completion_id,
        "completion": text,
        "stop_reason": stop_reason,
        "model": model,
        "stop": stop,
        "log_id": completion_id,
    }


async def whole_completion(
    events: AsyncGenerator[CompletionEvent, None], completion_id: str, model: str
) -> dict[str, Any]:
    parts: list[str] = []
    async with aclosing(events):
        async for event in events:
            parts.append(event.text)
            if isinstance(event, Done):
                return completion_body(completion_id, model, "".join(parts), event.stop_reason, event.stop)
    raise AssertionError("completion events ended without Done")  # complete() guarantees a Done


async def sse_frames(
    events: AsyncGenerator[CompletionEvent, None], completion_id: str, model: str, request_id: str
) -> AsyncIterator[bytes]:
    async with aclosing(events):
        try:
            async for event in events:
                stop_reason = event.stop_reason if isinstance(event, Done) else None
                stop = event.stop if isinstance(event, Done) else None
                body = completion_body(completion_id, model, event.text, stop_reason, stop)
                yield sse.encode("completion", body)
        except Exception as error:  # the 200 is out: the failure can only be an error event
            yield sse.encode_raw("error", error_event_data(to_api_error(error, request_id), request_id))
