"""Admission (529), cancellation on disconnect, /metrics and graceful shutdown, on the fake engine."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import PROMPT, VERSION, fake_model, free_port, serve_app, settings, wait_healthy
from tcserve.api.app import create_app
from tcserve.engines.fake import FakeEngine

SLOW = {"reply": " tick" * 400, "token_delay": 0.02}


def body(**overrides: object) -> dict[str, object]:
    return {"model": "fake", "prompt": PROMPT, "max_tokens_to_sample": 400, **overrides}


@pytest.fixture
def slow_server() -> Iterator[tuple[str, FakeEngine]]:
    app = create_app(settings(), [fake_model(capacity=1, **SLOW)])
    with serve_app(app) as url:
        yield url, app.state.tcserve.engines.by_name["fake"]


def wait_until_idle(engine: FakeEngine) -> None:
    for _ in range(3000):
        if engine.active == 0:
            return
        time.sleep(0.01)
    raise AssertionError("the engine kept generating for a client that left")


@pytest.mark.parametrize("stream", [True, False])
def test_full_queue_is_529_before_anything_is_streamed(slow_server: tuple[str, FakeEngine], stream: bool) -> None:
    url, engine = slow_server
    with (
        httpx.Client(base_url=url, headers=VERSION, timeout=30) as client,
        client.stream("POST", "/v1/complete", json=body(stream=True)) as holder,
    ):
        lines = holder.iter_lines()  # kept: dropping it would close the connection
        assert next(lines).startswith("event: completion")
        refused = client.post("/v1/complete", json=body(stream=stream))
    assert refused.status_code == 529
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["type"] == "overloaded_error"
    assert int(refused.headers["retry-after"]) >= 1
    wait_until_idle(engine)


def test_non_streaming_client_that_leaves_stops_the_engine(slow_server: tuple[str, FakeEngine]) -> None:
    url, engine = slow_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/complete", headers=VERSION, json=body(), timeout=0.3)
    assert len(engine.requests) == 1
    wait_until_idle(engine)
    # The slot is free again: a new request is admitted, not refused.
    assert httpx.post(f"{url}/v1/complete", headers=VERSION, json=body(max_tokens_to_sample=2)).status_code == 200


def test_metrics(slow_server: tuple[str, FakeEngine]) -> None:
    url, _ = slow_server
    for _ in range(3):
        httpx.post(f"{url}/v1/complete", headers=VERSION, json=body(max_tokens_to_sample=3))
    text = httpx.get(f"{url}/metrics").text
    assert 'tcserve_queue_depth{model="fake"} 0.0' in text
    assert 'tcserve_running_sequences{model="fake"} 0.0' in text
    assert 'tcserve_generated_tokens_total{model="fake"} 9.0' in text
    assert 'tcserve_tokens_per_second{model="fake"}' in text
    assert 'tcserve_time_to_first_token_seconds_count{model="fake"} 3.0' in text


def _start(tmp_path: Path, shutdown_timeout: float) -> tuple[subprocess.Popen[str], str]:
    config = tmp_path / "tcserve.toml"
    config.write_text(f"[[models]]\nname = 'fake'\nengine = 'fake'\nreply = '{SLOW['reply']}'\ntoken_delay = 0.02\n")
    port = free_port()
    command = [sys.executable, "-m", "tcserve", "serve", "--config", str(config), "--port", str(port),
               "--shutdown-timeout", str(shutdown_timeout)]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process)
    return process, url


def _events(lines: Iterator[str]) -> list[tuple[str, dict[str, object]]]:
    events, name = [], ""
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def test_sigterm_drains_then_ends_what_is_left_with_an_error_event(tmp_path: Path) -> None:
    process, url = _start(tmp_path, shutdown_timeout=0.5)
    try:
        with httpx.stream("POST", f"{url}/v1/complete", headers=VERSION, json=body(stream=True), timeout=30) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("event: completion")
            process.send_signal(signal.SIGTERM)
            time.sleep(0.1)  # let the signal land; the assertions below do not depend on timing
            refused = httpx.post(f"{url}/v1/complete", headers=VERSION, json=body(max_tokens_to_sample=2))
            events = _events(lines)
    finally:
        process.wait(timeout=30)
    assert refused.status_code == 529 and refused.json()["error"]["type"] == "overloaded_error"
    assert refused.json()["error"]["message"] == "The server is shutting down"
    name, data = events[-1]
    assert name == "error" and data["error"] == {"type": "overloaded_error", "message": "The server is shutting down"}
    assert process.returncode == 0


def test_sigterm_lets_running_requests_finish(tmp_path: Path) -> None:
    process, url = _start(tmp_path, shutdown_timeout=60)
    try:
        request = body(stream=True, max_tokens_to_sample=30)
        with httpx.stream("POST", f"{url}/v1/complete", headers=VERSION, json=request, timeout=30) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("event: completion")
            process.send_signal(signal.SIGTERM)
            events = _events(lines)
    finally:
        process.wait(timeout=30)
    assert events[-1][0] == "completion" and events[-1][1]["stop_reason"] == "max_tokens"
    assert process.returncode == 0


def test_a_client_that_stops_reading_is_cut_off_without_delaying_others() -> None:
    big = " " + "x" * 65536
    app = create_app(settings(slow_reader_timeout=0.5), [fake_model(reply=big * 400)])
    with serve_app(app) as url:
        engine = app.state.tcserve.engines.by_name["fake"]
        port = int(url.rsplit(":", 1)[1])
        payload = json.dumps(body(stream=True, max_tokens_to_sample=400)).encode()
        with socket.create_connection(("127.0.0.1", port)) as reader:
            reader.sendall(
                b"POST /v1/complete HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            reader.recv(1024)  # the response has started; from now on this client reads nothing
            for _ in range(1000):  # its generation starts right after the headers went out
                if engine.active == 1:
                    break
                time.sleep(0.01)
            assert engine.active == 1
            other = httpx.post(f"{url}/v1/complete", headers=VERSION, json=body(max_tokens_to_sample=2), timeout=10)
            assert other.status_code == 200  # served while the slow stream is stuck
            wait_until_idle(engine)  # cut off after 0.5 s: its generation stopped


def test_a_client_that_sends_its_headers_too_slowly_is_disconnected(tmp_path: Path) -> None:
    config = tmp_path / "tcserve.toml"
    config.write_text("[[models]]\nname = 'fake'\nengine = 'fake'\n")
    port = free_port()
    command = [sys.executable, "-m", "tcserve", "serve", "--config", str(config), "--port", str(port),
               "--header-timeout", "0.5"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # ... and never the blank line
            slow.settimeout(10)
            assert slow.recv(1024) == b""  # closed by the server, not by our 10 s timeout
        healthy = httpx.get(f"http://127.0.0.1:{port}/health")  # normal clients are unaffected
    finally:
        process.terminate()
        process.wait(30)
    assert healthy.status_code == 200


def test_a_second_sigint_exits_at_once_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "tcserve.toml"
    config.write_text(
        "[[models]]\nname = 'fake'\nengine = 'fake'\nreply = '" + " tick" * 400 + "'\ntoken_delay = 0.2\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tcserve", "serve", "--config", str(config), "--port", str(port),
               "--shutdown-timeout", "300"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(url, process)
        with httpx.stream("POST", f"{url}/v1/complete", headers=VERSION, json=body(stream=True), timeout=30) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("event: completion")  # a stream of 80 s is running
            process.send_signal(signal.SIGINT)
            for _ in range(300):  # the first signal drains: new requests get 529
                refused = httpx.post(f"{url}/v1/complete", headers=VERSION, json=body(max_tokens_to_sample=2))
                if refused.status_code == 529:
                    break
            assert refused.status_code == 529
            process.send_signal(signal.SIGINT)  # the second one must not wait for the stream
            events = _events(lines)
        _, stderr = process.communicate(timeout=30)  # far less than the stream or the 300 s drain
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "overloaded_error"
    assert process.returncode == 130
    assert "Traceback" not in stderr
