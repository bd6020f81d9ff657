"""Running the app under uvicorn, with a graceful drain on SIGTERM or Ctrl-C.

uvicorn's own shutdown closes the listening socket at once, so new clients would
get "connection refused" instead of an answer. On the first signal we drain
instead: new requests get 529 `overloaded_error` (with `retry-after`, so the SDKs
retry, perhaps on another instance), running requests may finish for up to
`shutdown_timeout` seconds, then the engines are closed, which ends every
remaining stream with an SSE `error` event. Only then does uvicorn shut down.
A second Ctrl-C exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tcserve.api.state import ServerState

log = logging.getLogger("tcserve")

DRAIN_POLL_SECONDS = 0.05


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._app = app
        self._shutdown_timeout = shutdown_timeout
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state: ServerState | None = getattr(self._app.state, "tcserve", None)
        if self._drain is not None or state is None or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        # Not recorded in _captured_signals: uvicorn would raise it again after a
        # clean drain, and a drained server should exit 0.
        log.info("%s: draining (new requests get 529; %.0fs for running ones)",
                 signal.Signals(sig).name, self._shutdown_timeout)  # fmt: skip
        state.engines.draining = True
        self._drain = asyncio.get_event_loop().create_task(self._drain_then_exit(state))

    async def _drain_then_exit(self, state: ServerState) -> None:
        deadline = time.monotonic() + self._shutdown_timeout
        while state.engines.busy() and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        if state.engines.busy():
            log.warning("shutdown timeout: ending the requests still running with an error event")
        await state.engines.close()
        self.should_exit = True


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline on request headers. uvicorn times out
    idle keep-alive connections but not a client that sends its headers a byte at a
    time (slowloris): such a client would hold a connection for as long as it likes.
    The deadline starts with the connection and again with each request's first
    byte, and ends when the headers are complete; past it the connection is closed."""

    header_timeout: float = 10.0
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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


def protocol_with_header_timeout(seconds: float) -> type[HeaderDeadlineProtocol]:
    return type("HeaderDeadline", (HeaderDeadlineProtocol,), {"header_timeout": seconds})


def serve(app: FastAPI, host: str, port: int, shutdown_timeout: float, header_timeout: float) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            http=protocol_with_header_timeout(header_timeout))  # fmt: skip
    DrainingServer(config, app, shutdown_timeout).run()
