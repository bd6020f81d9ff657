"""Run a real uvicorn server for a test, on 127.0.0.1 and a free port, in a background thread."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from tcserve.api.server import edge_protocol
from tcserve.config import FakeModel, Settings

PROMPT = "\n\nHuman: Say hello.\n\nAssistant:"
VERSION = {"anthropic-version": "2023-06-01"}


def fake_model(**overrides: object) -> FakeModel:
    return FakeModel.model_validate({"name": "fake", "engine": "fake", **overrides})


@contextmanager
def serve_app(app: FastAPI, *, wait_ready: bool = True) -> Iterator[str]:
    """Yield the base URL of `app` served by uvicorn with tcserve's HTTP protocol; stop it on exit."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on",
                            http=edge_protocol(header_timeout=10.0))  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    try:
        if wait_ready:
            _wait_ready(app)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _wait_ready(app: FastAPI) -> None:
    deadline = time.monotonic() + 120
    while not app.state.tcserve.engines.ready:
        if time.monotonic() > deadline:
            raise RuntimeError("engines did not become ready")
        time.sleep(0.01)


def settings(**overrides: object) -> Settings:
    """Settings for a test (conftest clears TCSERVE_* variables)."""
    return Settings(**overrides)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[Any] | None = None, timeout: float = 30) -> None:
    """Wait for a server process started by a test to answer /health with 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, "the server exited early"
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not become healthy")
