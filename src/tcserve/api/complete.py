"""POST /v1/complete, the thin edge: parse the wire -> the serving core -> JSON or SSE.

Everything that can fail is checked before the 200 goes out (spec: version,
body, then the core's checks: model, permission, prompt rules, engine
readiness, context fit, limits), so that those failures are ordinary JSON
errors with their real status; after that, a failure can only be an SSE
`error` event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from tcserve.api import sse
from tcserve.api.disconnect import ClientDisconnected, until_disconnected
from tcserve.api.errors import edge_validation_message, error_event_data, to_api_error
from tcserve.api.headers import require_version
from tcserve.api.middleware import CLIENT_CLOSED_REQUEST, key_of, request_id_of
from tcserve.api.openapi import ERROR_RESPONSES
from tcserve.api.protocol import Completion, CompletionRequest
from tcserve.api.state import server_state
from tcserve.core.request import CompletionCall, Done
from tcserve.core.service import CompletionStream
from tcserve.errors import InvalidRequest
from tcserve.ids import new_id

router = APIRouter()

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
    events = await state.service.complete(to_call(wire, request_id), key_of(request.scope), arrived)
    completion_id = new_id("compl")
    if wire.stream:
        frames = sse_frames(events, completion_id, wire.model, request_id)
        return sse.EventStreamResponse(
            sse.with_pings(frames, state.settings.ping_interval),
            write_timeout=state.settings.slow_reader_timeout,
            headers=SSE_HEADERS,
            on_close=events.aclose,  # also when the client left before the stream started
        )
    try:
        body = await until_disconnected(request, whole_completion(events, completion_id, wire.model))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; the access log does
    finally:
        await events.aclose()
    return JSONResponse(body)


def to_call(wire: CompletionRequest, request_id: str) -> CompletionCall:
    """The wire's types and bounds are checked (pydantic); the core checks the rest."""
    return CompletionCall(
        request_id=request_id,
        model=wire.model,
        prompt=wire.prompt,
        max_tokens=wire.max_tokens_to_sample,
        stop_sequences=tuple(wire.stop_sequences or ()),
        temperature=wire.temperature,
        top_p=wire.top_p,
        top_k=wire.top_k,
        user_id=wire.metadata.user_id if wire.metadata else None,
    )


async def read_body(request: Request, timeout: float) -> bytes:
    """The body, or a 400 for a client that sends it too slowly (it would hold a
    connection and a task for as long as it likes)."""
    try:
        return await asyncio.wait_for(request.body(), timeout)
    except TimeoutError:
        raise InvalidRequest(f"The request body did not arrive within {timeout:g} seconds") from None


def parse_completion_request(body: bytes) -> CompletionRequest:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"The request body is not valid JSON: {error}") from None
    except RecursionError:  # json's parser recurses once per level of nesting
        raise InvalidRequest("The request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as error:
        raise InvalidRequest(edge_validation_message(error.errors())) from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


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


async def whole_completion(events: CompletionStream, completion_id: str, model: str) -> dict[str, Any]:
    parts: list[str] = []
    async with aclosing(events):
        async for event in events:
            parts.append(event.text)
            if isinstance(event, Done):
                return completion_body(completion_id, model, "".join(parts), event.stop_reason, event.stop)
    raise AssertionError("completion events ended without Done")  # complete() guarantees a Done


async def sse_frames(events: CompletionStream, completion_id: str, model: str, request_id: str) -> AsyncIterator[bytes]:
    async with aclosing(events):
        try:
            async for event in events:
                stop_reason = event.stop_reason if isinstance(event, Done) else None
                stop = event.stop if isinstance(event, Done) else None
                body = completion_body(completion_id, model, event.text, stop_reason, stop)
                yield sse.encode("completion", body)
        except Exception as error:  # the 200 is out: the failure can only be an error event
            yield sse.encode_raw("error", error_event_data(to_api_error(error, request_id), request_id))
