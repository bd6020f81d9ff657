"""The edge's pure-ASGI middleware, outermost first:

- `RequestContext`: gives each request its `req_...` id (scope state, log
  context, `request-id` header on every response), logs one access line, and
  turns anything that escaped into a JSON 500.
- `Authenticate`: when keys are configured (a keys file, even an empty one, or
  command-line keys), every path but the public ones (`/health`, `/metrics`,
  the playground's static files) needs `x-api-key` or
  `Authorization: Bearer` matching one (checked first, so nothing about the
  request is revealed to a caller without a key).
- `LimitBody`: answers 413 when the body is over the limit, from
  `content-length` or while streaming it in, without buffering it.

They are plain ASGI so that they also cover unknown paths and wrong methods,
and so that streaming responses pass through untouched.
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tcserve.accounting.keys import KeyRecord, KeySource
from tcserve.accounting.limits import Limiter
from tcserve.api.errors import (
    APIError,
    AuthenticationError,
    RequestTooLargeError,
    error_response,
    to_api_error,
)
from tcserve.api.sse import SlowReader
from tcserve.ids import new_id
from tcserve.logs import request_id_var

log = logging.getLogger("tcserve.access")

PUBLIC_PATHS = frozenset({"/health", "/metrics"})
CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that left before the answer: only ever logged."""


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


async def send_error(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
    await error_response(error, request_id_of(scope))(scope, receive, send)


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_id("req")
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "request-id" not in headers:
                    headers["request-id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except SlowReader as cut_off:
            log.warning("%s: stream ended", cut_off)  # the connection is closed; nothing else to send
        except ClientDisconnect:
            # The client left before its body was complete: not a server fault, and nobody
            # is there to answer. Logged as the other disconnects are (499), no traceback.
            status = status or CLIENT_CLOSED_REQUEST
            log.info("the client disconnected before its request body was complete")
        except Exception as error:  # the last line of defence: never a stack trace on the wire
            if status:
                raise  # headers already went out; uvicorn closes the connection
            status = 500
            await send_error(scope, receive, send_with_id, to_api_error(error, request_id))
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            log.info("%s %s %s %.0fms", scope["method"], scope["path"], status, elapsed_ms)
            request_id_var.reset(token)


class Authenticate:
    """Finds the caller's key (by SHA-256, compared in constant time with every
    stored hash), puts its record in the scope for permission and limit checks,
    and adds the key's `anthropic-ratelimit-*` headers to every response."""

    def __init__(
        self, app: ASGIApp, keys: KeySource, limiter: Limiter, public_paths: frozenset[str] = PUBLIC_PATHS
    ) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.required or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(Headers(scope=scope))
        record = None if presented is None else self.keys.current().find(presented)
        if presented is None:
            await send_error(scope, receive, send, AuthenticationError("x-api-key header is required"))
        elif record is None:
            await send_error(scope, receive, send, AuthenticationError("invalid x-api-key"))
        else:
            scope.setdefault("state", {})["key"] = record
            await self.app(scope, receive, self._with_limit_headers(send, record))

    def _with_limit_headers(self, send: Send, record: KeyRecord) -> Send:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.limiter.headers(record).items():
                    headers[name] = value
            await send(message)

        return send_with_headers


def key_of(scope: Scope) -> KeyRecord | None:
    record: KeyRecord | None = scope.get("state", {}).get("key")
    return record


_OWS = " \t"


def _presented_key(headers: Headers) -> str | None:
    """One rule for both headers: the optional whitespace that HTTP allows around a field
    value (and a Bearer token) is not part of the key; whitespace inside it is, and such
    a key matches nothing, since no key contains whitespace. An empty key is a missing one."""
    if key := headers.get("x-api-key", "").strip(_OWS):
        return key
    scheme, _, token = headers.get("authorization", "").strip(_OWS).partition(" ")
    if scheme.lower() == "bearer" and (token := token.strip(_OWS)):
        return token
    return None


class _BodyTooLarge(Exception):
    pass


class LimitBody:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(scope, receive, send, self._error())
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await send_error(scope, receive, send, self._error())

    def _error(self) -> RequestTooLargeError:
        return RequestTooLargeError(f"Request exceeds the maximum allowed size of {self.max_bytes} bytes")
