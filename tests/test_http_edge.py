"""The HTTP edge below the application, on raw sockets: what uvicorn's parser and
protocol do with malformed, pipelined, HTTP/1.0 and abandoned requests."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from support import PROMPT, fake_model, serve_app, settings
from tcserve.api.app import create_app


@pytest.fixture(scope="module")
def address() -> Iterator[tuple[str, int]]:
    app = create_app(settings(), [fake_model(reply=" one two three four five six seven eight")])
    with serve_app(app) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        yield host, int(port)


def exchange(address: tuple[str, int], request: bytes) -> bytes:
    """Send `request` in one write; read until the server closes the connection."""
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def responses(answer: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Split responses with content-length bodies: (status line, headers, body)."""
    found = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}
        length = int(headers.get(b"content-length", len(rest)))
        found.append((status, headers, rest[:length]))
        answer = rest[length:]
    return found


def assert_anthropic_400(status: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
    assert status.startswith(b"HTTP/1.1 400")
    assert headers[b"content-type"] == b"application/json"
    payload = json.loads(body)
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert payload["request_id"].startswith("req_01")
    assert headers[b"request-id"].decode() == payload["request_id"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /health HTTP/1.1\r\nbad header\r\n\r\n",
        b"POST /v1/complete HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        b"POST /v1/complete HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n",
    ],
)
def test_a_parse_error_is_anthropics_json_400_with_a_request_id(address: tuple[str, int], request_bytes: bytes) -> None:
    [(status, headers, body)] = responses(exchange(address, request_bytes))
    assert_anthropic_400(status, headers, body)
    assert json.loads(body)["error"]["message"].startswith("Invalid HTTP request")


def test_a_valid_request_pipelined_before_a_malformed_one_is_answered_first(address: tuple[str, int]) -> None:
    answer = exchange(address, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nBLAH BLAH\r\n\r\n")
    (status, _, body), bad = responses(answer)
    assert status.startswith(b"HTTP/1.1 200") and json.loads(body)["status"] == "ok"
    assert_anthropic_400(*bad)


def test_several_pipelined_requests_are_all_answered_in_order_before_the_400(address: tuple[str, int]) -> None:
    get = b"GET /v1/models/fake HTTP/1.1\r\nHost: x\r\nanthropic-version: 2023-06-01\r\n\r\n"
    answer = exchange(address, get + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00\x01\r\n\r\n")
    first, second, bad = responses(answer)
    assert json.loads(first[2])["id"] == "fake"
    assert json.loads(second[2])["status"] == "ok"
    assert_anthropic_400(*bad)


def _complete_request(version: bytes, stream: bool) -> bytes:
    body = json.dumps({"model": "fake", "prompt": PROMPT, "max_tokens_to_sample": 20, "stream": stream}).encode()
    return (
        b"POST /v1/complete HTTP/%s\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (version, len(body), body)
    )


def test_an_http_1_0_stream_is_delimited_by_closing_the_connection(address: tuple[str, int]) -> None:
    answer = exchange(address, _complete_request(b"1.0", stream=True))
    head, _, body = answer.partition(b"\r\n\r\n")
    headers = head.lower().split(b"\r\n")
    assert headers[0].startswith(b"http/1.1 200")
    assert not any(line.startswith(b"transfer-encoding") for line in headers)
    assert b"connection: close" in headers
    events = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert "".join(event["completion"] for event in events) == " one two three four five six seven eight"
    assert [event["stop_reason"] is None for event in events] == [True] * (len(events) - 1) + [False]
    assert body.endswith(b"\n\n")  # the raw events, no chunk sizes between them


def test_an_http_1_1_stream_is_still_chunked(address: tuple[str, int]) -> None:
    request = _complete_request(b"1.1", stream=True).replace(b"host: x\r\n", b"host: x\r\nconnection: close\r\n")
    head = exchange(address, request).partition(b"\r\n\r\n")[0].lower()
    assert b"transfer-encoding: chunked" in head


def test_an_http_1_0_json_answer_keeps_its_content_length(address: tuple[str, int]) -> None:
    [(status, headers, body)] = responses(exchange(address, _complete_request(b"1.0", stream=False)))
    assert status.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in headers
    assert json.loads(body)["completion"] == " one two three four five six seven eight"


class _AccessLines(logging.Handler):
    """Collects log records; `seen` is set at the access line of a /v1/complete."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.name == "tcserve.access" and record.getMessage().startswith("POST /v1/complete "):
            self.seen.set()


@pytest.fixture
def access_lines() -> Iterator[_AccessLines]:
    handler = _AccessLines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.parametrize("how", ["fin", "rst", "bad chunk"])
def test_a_client_that_leaves_mid_body_is_a_499_without_a_traceback(
    address: tuple[str, int], access_lines: _AccessLines, how: str
) -> None:
    body = json.dumps({"model": "fake", "prompt": PROMPT, "max_tokens_to_sample": 4}).encode()
    with socket.create_connection(address, timeout=30) as sock:
        if how == "bad chunk":
            sock.sendall(b"POST /v1/complete HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n"
                         b"transfer-encoding: chunked\r\n\r\n10\r\n" + body[:16] + b"\r\nZZ\r\n")  # fmt: skip
            assert sock.recv(65536).startswith(b"HTTP/1.1 400")
        else:
            sock.sendall(b"POST /v1/complete HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body) + 1000, body))  # fmt: skip
            if how == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert access_lines.seen.wait(30)
    access = [r.getMessage() for r in access_lines.records if r.name == "tcserve.access"]
    assert access[-1].startswith("POST /v1/complete 499 ")
    assert not [r for r in access_lines.records if r.levelno >= logging.ERROR or r.exc_info]
