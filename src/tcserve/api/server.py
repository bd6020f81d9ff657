"""Running the app under uvicorn, with a graceful drain on SIGTERM or Ctrl-C, and
uvicorn's HTTP protocol with the edges tcserve needs.

uvicorn's own shutdown closes the listening socket at once, so new clients would
get "connection refused" instead of an answer. On the first signal we drain
instead: new requests get 529 `overloaded_error` (with `retry-after`, so the SDKs
retry, perhaps on another instance), running requests may finish for up to
`shutdown_timeout` seconds, then the engines are closed, which ends every
remaining stream with an SSE `error` event. Only then does uvicorn shut down.
A second signal exits at once: the engines are closed (streams get their `error`
event if they can be sent within a second) and the process exits 128 + the
signal's number (130 for Ctrl-C), without waiting for connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from types import FrameType

import httptools
import uvicorn
from fastapi import FastAPI
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from tcserve.api.errors import InvalidRequestError, error_body
from tcserve.api.state import ServerState
from tcserve.ids import new_id
from tcserve.logs import request_id_var

log = logging.getLogger("tcserve")

DRAIN_POLL_SECONDS = 0.05
FORCED_EXIT_GRACE_SECONDS = 1  # uvicorn takes whole seconds
"""On the second signal, how long connections have to finish (streams send their
error event) before uvicorn cancels them."""


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._app = app
        self._shutdown_timeout = shutdown_timeout
        self._drain: asyncio.Task[None] | None = None
        self._forced: asyncio.Task[None] | None = None
        self.exit_status = 0
        """0 after a drain; 128 + the signal's number after a forced exit."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state: ServerState | None = getattr(self._app.state, "tcserve", None)
        if state is None or (self.should_exit and self._drain is None):
            super().handle_exit(sig, frame)  # before startup, or uvicorn's own shutdown: its rules
            return
        # Neither signal is recorded in _captured_signals: uvicorn would raise it again
        # after serving, and KeyboardInterrupt would end the process with a traceback.
        loop = asyncio.get_event_loop()
        if self._drain is None:
            log.info("%s: draining (new requests get 529; %.0fs for running ones; again to exit now)",
                     signal.Signals(sig).name, self._shutdown_timeout)  # fmt: skip
            state.engines.draining = True
            self._drain = loop.create_task(self._drain_then_exit(state))
        elif self._forced is None:
            log.warning("%s again: exiting now, ending the requests still running", signal.Signals(sig).name)
            self.exit_status = 128 + sig
            self._forced = loop.create_task(self._exit_now(state))

    async def _drain_then_exit(self, state: ServerState) -> None:
        deadline = time.monotonic() + self._shutdown_timeout
        while state.engines.busy() and time.monotonic() < deadline and self._forced is None:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        if self._forced is not None:
            return
        if state.engines.busy():
            log.warning("shutdown timeout: ending the requests still running with an error event")
        await state.engines.close()
        self.should_exit = True

    async def _exit_now(self, state: ServerState) -> None:
        await state.engines.close()  # every open stream ends with its error event ...
        # ... if it can be sent within the grace; then uvicorn cancels what is left, and
        # the lifespan still shuts down (the ledger keeps its rows).
        self.config.timeout_graceful_shutdown = FORCED_EXIT_GRACE_SECONDS
        self.should_exit = True


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with what tcserve promises at the HTTP level:

    - a deadline on request headers. uvicorn times out idle keep-alive connections
      but not a client that sends its headers a byte at a time (slowloris), which
      would hold a connection for as long as it likes. The deadline starts with the
      connection and again with each request's first byte, and ends when the headers
      are complete; past it the connection is closed.
    - a malformed request is answered in Anthropic's JSON error shape with a
      `request-id` (uvicorn sends a text/plain 400 without one), and only after the
      answers to the valid requests pipelined before it (uvicorn wrote its 400 and
      closed the connection first, so those were lost).
    - an HTTP/1.0 client's stream is delimited by closing the connection: HTTP/1.0
      has no chunked encoding (RFC 9112, 6.1), and uvicorn would use it.

    A subclass rather than uvicorn's h11 protocol or another server: h11 delimits
    HTTP/1.0 bodies and holds back pipelined requests itself, but answers parse
    errors in text/plain too, has no header deadline (this class would have to be
    rewritten for its event loop), and parses in pure Python, slower than httptools'
    C parser on every request; Granian or Hypercorn would replace all of it, the
    body and slow-reader deadlines' interplay with uvicorn's flow control included.
    The price is coupling to uvicorn's internals (pinned <1 in pyproject.toml):
    the hooks used are `data_received`, `on_message_begin`, `on_headers_complete`,
    `on_response_complete`, `send_400_response` and the cycle's `send`."""

    header_timeout: float = 10.0
    _header_deadline: asyncio.TimerHandle | None = None
    _unparsable: str | None = None
    """Set at a parse error: nothing more is read, and this 400 is sent once every
    request before the bad bytes has its answer."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        # uvicorn's, except for the parse error (its error text is kept for the 400).
        if self._unparsable is not None:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._bad_request(f"Invalid HTTP request: {error or 'malformed'}")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        if self.scope.get("http_version") == "1.0" and self.cycle is not None:
            # Not started yet (its task runs on a later loop iteration), so the
            # application will be handed this send.
            self.cycle.send = _close_delimited(self.cycle)  # type: ignore[method-assign,assignment]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._unparsable is not None and self.cycle.response_complete and not self.transport.is_closing():
            self._write_400(self._unparsable)

    def send_400_response(self, msg: str) -> None:
        self._bad_request(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _bad_request(self, message: str) -> None:
        self._disarm()
        self._unparsable = message
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            self.flow.pause_reading()  # earlier requests are whole and not yet answered
            return
        self._write_400(message)  # ends a request whose body was broken, too: it sees a disconnect

    def _write_400(self, message: str) -> None:
        request_id = new_id("req")
        token = request_id_var.set(request_id)
        try:
            log.warning("400: %s", message)
        finally:
            request_id_var.reset(token)
        body = json.dumps(error_body(InvalidRequestError(message), request_id), separators=(",", ":")).encode()
        head = (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"request-id: %s\r\nconnection: close\r\n\r\n" % (len(body), request_id.encode())
        )
        self.transport.write(head + body)
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _too_slow(self) -> None:
        log.warning("closing a connection whose request headers took over %gs", self.header_timeout)
        self.transport.close()


def _close_delimited(cycle: RequestResponseCycle) -> Callable[[ASGISendEvent], Awaitable[None]]:
    """The cycle's `send` for an HTTP/1.0 client: a response without `content-length`
    (a stream) is written as it is and ended by closing the connection, where uvicorn
    would frame it with `transfer-encoding: chunked`."""
    uvicorn_send = cycle.send
    until_close = False

    async def send(message: ASGISendEvent) -> None:
        nonlocal until_close
        if message["type"] == "http.response.start" and not cycle.response_started:
            names = {name.lower() for name, _ in message.get("headers", [])}
            framed = b"content-length" in names or b"transfer-encoding" in names
            bodiless = cycle.scope["method"] == "HEAD" or message["status"] in (204, 304)
            if not framed and not bodiless:
                until_close = True
                cycle.chunked_encoding = False  # uvicorn then adds no transfer-encoding
        elif until_close and message["type"] == "http.response.body" and not cycle.response_complete:
            await _write_until_close(cycle, message.get("body", b""), more=message.get("more_body", False))
            return
        await uvicorn_send(message)

    return send


async def _write_until_close(cycle: RequestResponseCycle, body: bytes, *, more: bool) -> None:
    # What uvicorn's send does for a body, with the connection's end as the body's end.
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    cycle.transport.write(body)
    if not more:
        cycle.response_complete = True
        cycle.message_event.set()
        cycle.transport.close()
        cycle.on_response()


def edge_protocol(header_timeout: float) -> type[EdgeProtocol]:
    return type("Edge", (EdgeProtocol,), {"header_timeout": header_timeout})


def serve(app: FastAPI, host: str, port: int, shutdown_timeout: float, header_timeout: float) -> int:
    """Serve until a signal; the exit status (0 after a drain)."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            http=edge_protocol(header_timeout))  # fmt: skip
    server = DrainingServer(config, app, shutdown_timeout)
    server.run()
    return server.exit_status
