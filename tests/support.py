"""Run a real uvicorn server for a test, on 127.0.0.1 and a free port, in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from tcserve.config import FakeModel, Settings

PROMPT = "\n\nHuman: Say hello.\n\nAssistant:"
VERSION = {"anthropic-version": "2023-06-01"}


def fake_model(**overrides: object) -> FakeModel:
    return FakeModel.model_validate({"name": "fake", "engine": "fake", **overrides})


@contextmanager
def serve_app(app: FastAPI, *, wait_ready: bool = True) -> Iterator[str]:
    """Yield the base URL of `app` served by uvicorn; stop it on exit."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on")
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
    while not app.state.tcserve.ready:
        if time.monotonic() > deadline:
            raise RuntimeError("engines did not become ready")
        time.sleep(0.01)


def settings(**overrides: object) -> Settings:
    """Settings for a test (conftest clears TCSERVE_* variables)."""
    return Settings(**overrides)  # type: ignore[arg-type]
