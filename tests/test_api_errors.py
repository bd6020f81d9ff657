"""Every error path of the HTTP edge, on the fake engine: status, error.type, message, request-id."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import PROMPT, VERSION, fake_model, serve_app, settings
from tcserve.api.app import create_app
from tcserve.config import LlamaCppModel

KEY = "sk-test-secret-key"


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    app = create_app(settings(max_body_bytes=4096), [fake_model()])
    with serve_app(app) as url, httpx.Client(base_url=url, headers=VERSION) as client:
        yield client


@pytest.fixture(scope="module")
def keyed() -> Iterator[httpx.Client]:
    app = create_app(settings(api_keys=(KEY, "sk-second")), [fake_model()])
    with serve_app(app) as url, httpx.Client(base_url=url) as client:
        yield client


def body(**overrides: object) -> dict[str, object]:
    return {"model": "fake", "prompt": PROMPT, "max_tokens_to_sample": 8, **overrides}


def assert_error(response: httpx.Response, status: int, error_type: str, message: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == error_type
    if message is not None:
        assert payload["error"]["message"] == message
    assert payload["request_id"].startswith("req_01")
    assert response.headers["request-id"] == payload["request_id"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"prompt": PROMPT, "max_tokens_to_sample": 8}, "model: Field required"),
        ({"model": "fake", "max_tokens_to_sample": 8}, "prompt: Field required"),
        ({"model": "fake", "prompt": PROMPT}, "max_tokens_to_sample: Field required"),
        (body(max_tokens_to_sample=5.0), "max_tokens_to_sample: Input should be a valid integer"),
        (body(max_tokens_to_sample="5"), "max_tokens_to_sample: Input should be a valid integer"),
        (body(max_tokens_to_sample=0), "max_tokens_to_sample: Input should be greater than or equal to 1"),
        (body(prompt=""), "prompt: String should have at least 1 character"),
        (body(prompt=7), "prompt: Input should be a valid string"),
        (body(temperature=1.5), "temperature: Input should be less than or equal to 1"),
        (body(temperature=-0.1), "temperature: Input should be greater than or equal to 0"),
        (body(temperature="hot"), "temperature: Input should be a valid number"),
        (body(top_p=2), "top_p: Input should be less than or equal to 1"),
        (body(top_k=-1), "top_k: Input should be greater than or equal to 0"),
        (body(top_k=1.5), "top_k: Input should be a valid integer"),
        (body(stream="yes"), "stream: Input should be a valid boolean"),
        (body(stop_sequences="\n"), "stop_sequences: Input should be a valid list"),
        (body(stop_sequences=[1]), "stop_sequences.0: Input should be a valid string"),
        (body(stop_sequences=[""]), "stop_sequences: a stop sequence must not be empty"),
        (
            body(metadata={"user_id": "x" * 513}),
            "metadata.user_id: String should have at most 512 characters",
        ),
        (body(metadata={"other": 1}), "metadata.other: Extra inputs are not permitted"),
        (body(frequency_penalty=1), "frequency_penalty: Extra inputs are not permitted"),
    ],
)
def test_bad_fields_name_the_field(client: httpx.Client, payload: dict[str, object], message: str) -> None:
    assert_error(client.post("/v1/complete", json=payload), 400, "invalid_request_error", message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "The request body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"", "The request body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        (b'{"model": "fake",', None),
        (b"[1, 2]", "The request body must be a JSON object"),
        (b'"text"', "The request body must be a JSON object"),
        (b'{"model":"fake","prompt":"x","max_tokens_to_sample":1,"temperature":NaN}', None),
        (b"\xff\xfe", None),
    ],
)
def test_bodies_that_are_not_a_json_object(client: httpx.Client, content: bytes, message: str | None) -> None:
    response = client.post("/v1/complete", content=content, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request_error", message)
    assert response.json()["error"]["message"].startswith("The request body ")


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("Hello, world", 'prompt must start with "\n\nHuman:" turn after an optional system prompt'),
        (
            "Hello, world\n\nAssistant:",
            'prompt must start with "\n\nHuman:" turn after an optional system prompt',
        ),
        ("\n\nHuman: Hello", 'prompt must end with "\n\nAssistant:" turn'),
        (
            "\n\nAssistant: Hi\n\nHuman: Hello",
            'prompt must start with "\n\nHuman:" turn after an optional system prompt',
        ),
    ],
)
def test_prompt_rules(client: httpx.Client, prompt: str, message: str) -> None:
    assert_error(client.post("/v1/complete", json=body(prompt=prompt)), 400, "invalid_request_error", message)


def test_context_overflow_gives_both_numbers(client: httpx.Client) -> None:
    response = client.post("/v1/complete", json=body(max_tokens_to_sample=8190))
    # The fake engine counts one token per character plus BOS.
    prompt_tokens = len(PROMPT) + 1
    expected = f"prompt is too long: {prompt_tokens} tokens + 8190 max_tokens_to_sample > 8192 context"
    assert_error(response, 400, "invalid_request_error", expected)


def test_unknown_model_is_404_with_the_id(client: httpx.Client) -> None:
    assert_error(client.post("/v1/complete", json=body(model="claude-x")), 404, "not_found_error", "model: claude-x")


def test_version_header_is_required(client: httpx.Client) -> None:
    response = client.post("/v1/complete", json=body(), headers={"anthropic-version": ""})
    assert_error(response, 400, "invalid_request_error")
    response = httpx.post(f"{client.base_url}/v1/complete", json=body())
    assert_error(response, 400, "invalid_request_error", "anthropic-version: header is required")


def test_unknown_version_is_rejected(client: httpx.Client) -> None:
    response = client.post("/v1/complete", json=body(), headers={"anthropic-version": "1999-01-01"})
    assert_error(response, 400, "invalid_request_error", 'anthropic-version: "1999-01-01" is not a valid version')


@pytest.mark.parametrize("version", ["2023-06-01", "2023-01-01", "2026-10-21"])
def test_known_versions_are_accepted(client: httpx.Client, version: str) -> None:
    response = client.post("/v1/complete", json=body(), headers={"anthropic-version": version})
    assert response.status_code == 200


def test_version_is_checked_before_the_body(client: httpx.Client) -> None:
    response = httpx.post(f"{client.base_url}/v1/complete", content=b"not json")
    assert_error(response, 400, "invalid_request_error", "anthropic-version: header is required")


def test_body_is_checked_before_the_model(client: httpx.Client) -> None:
    response = client.post("/v1/complete", json={"model": "claude-x", "prompt": PROMPT})
    assert_error(response, 400, "invalid_request_error", "max_tokens_to_sample: Field required")


def test_model_is_checked_before_the_prompt(client: httpx.Client) -> None:
    response = client.post("/v1/complete", json=body(model="claude-x", prompt="Hello"))
    assert_error(response, 404, "not_found_error")


@pytest.mark.parametrize("path", ["/nothing-here", "/v1", "/v1/completions", "/v1/messages", "/docs/../etc"])
def test_unknown_paths_are_404_json(client: httpx.Client, path: str) -> None:
    assert_error(client.get(path), 404, "not_found_error")


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/complete"), ("PUT", "/v1/complete"), ("POST", "/v1/models")])
def test_wrong_method_is_405_invalid_request(client: httpx.Client, method: str, path: str) -> None:
    assert_error(client.request(method, path), 405, "invalid_request_error")


def test_body_over_the_limit_is_413(client: httpx.Client) -> None:
    response = client.post("/v1/complete", json=body(prompt=PROMPT + "x" * 5000))
    assert_error(response, 413, "request_too_large")


def test_chunked_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    response = client.post("/v1/complete", content=chunks())
    assert_error(response, 413, "request_too_large")


def test_body_under_the_limit_passes(client: httpx.Client) -> None:
    # About 2 KiB, under the 4 KiB limit (the " x x ..." is a prefill the model continues).
    assert client.post("/v1/complete", json=body(prompt=PROMPT + " x" * 1000)).status_code == 200


def test_missing_key_is_401(keyed: httpx.Client) -> None:
    response = keyed.post("/v1/complete", json=body(), headers=VERSION)
    assert_error(response, 401, "authentication_error", "x-api-key header is required")


def test_wrong_key_is_401(keyed: httpx.Client) -> None:
    response = keyed.post("/v1/complete", json=body(), headers={**VERSION, "x-api-key": "sk-wrong"})
    assert_error(response, 401, "authentication_error", "invalid x-api-key")


@pytest.mark.parametrize(
    "headers", [{"x-api-key": KEY}, {"x-api-key": "sk-second"}, {"authorization": f"Bearer {KEY}"}]
)
def test_right_key_passes(keyed: httpx.Client, headers: dict[str, str]) -> None:
    assert keyed.post("/v1/complete", json=body(), headers={**VERSION, **headers}).status_code == 200


def test_auth_comes_before_everything_else(keyed: httpx.Client) -> None:
    # No version header, a broken body, an unknown path: still 401 first.
    assert_error(keyed.post("/v1/complete", content=b"{"), 401, "authentication_error")
    assert_error(keyed.get("/no/such/path"), 401, "authentication_error")
    assert_error(keyed.get("/v1/models", headers=VERSION), 401, "authentication_error")


def test_health_needs_no_key(keyed: httpx.Client) -> None:
    assert keyed.get("/health").status_code == 200


def test_request_id_on_success_too(client: httpx.Client) -> None:
    response = client.post("/v1/complete", json=body())
    assert response.headers["request-id"].startswith("req_01")
    assert json.loads(response.text)["id"].startswith("compl_01")


@pytest.mark.parametrize(("host", "warns"), [("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False)])
def test_open_server_warns_only_off_loopback(caplog: pytest.LogCaptureFixture, host: str, warns: bool) -> None:
    with caplog.at_level("WARNING", logger="tcserve"), serve_app(create_app(settings(host=host), [fake_model()])):
        pass
    assert any("no API key is set" in record.getMessage() for record in caplog.records) == warns


def test_keyed_server_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(settings(host="0.0.0.0", api_keys=(KEY,)), [fake_model()])
    with caplog.at_level("WARNING", logger="tcserve"), serve_app(app):
        pass
    assert not [r for r in caplog.records if "no API key" in r.getMessage()]


def test_a_model_that_fails_to_load_is_a_500_not_a_hang(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    app = create_app(settings(), [LlamaCppModel(name="broken", path=bogus)])
    with serve_app(app, wait_ready=False) as url:
        for _ in range(500):
            health = httpx.get(f"{url}/health")
            if health.json().get("models") == {"broken": "failed"}:
                break
        assert health.status_code == 503 and health.json()["models"] == {"broken": "failed"}
        body = {"model": "broken", "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 5}
        response = httpx.post(f"{url}/v1/complete", headers=VERSION, json=body)
    assert response.status_code == 500
    message = "model broken failed to load; see the server log"
    assert response.json()["error"] == {"type": "api_error", "message": message}


def _with_surrogate(payload: dict[str, object]) -> bytes:
    """The JSON text of `payload` with each "@@" turned into `\\ud800`, which json
    decodes to a lone surrogate (httpx's own encoder would refuse the string)."""
    return json.dumps(payload).replace("@@", "\\ud800").encode()


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (body(model="claude-@@"), "model"),
        (body(prompt=PROMPT + " @@"), "prompt"),
        (body(stop_sequences=["@@"]), "stop_sequences.0"),
        (body(metadata={"user_id": "@@"}), "metadata.user_id"),
    ],
)
def test_a_lone_surrogate_in_any_string_field_is_the_same_400(
    client: httpx.Client, payload: dict[str, object], field: str
) -> None:
    response = client.post(
        "/v1/complete", content=_with_surrogate(payload), headers={"content-type": "application/json"}
    )
    message = f"{field}: Input should be a valid string, unable to parse raw data as a unicode string"
    assert_error(response, 400, "invalid_request_error", message)


def test_deeply_nested_json_is_400_not_500(keyed: httpx.Client) -> None:
    nested = b"[" * 10_000 + b"]" * 10_000  # past json's recursion limit
    content = json.dumps(body(metadata={"user_id": "@@"})).encode().replace(b'"@@"', nested)
    response = keyed.post("/v1/complete", content=content, headers={**VERSION, "x-api-key": KEY})
    assert_error(response, 400, "invalid_request_error", "The request body is nested too deeply")


def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send `request` as it is and read until the server closes the connection."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        (f"x-api-key: {KEY}", True),
        (f"x-api-key:  {KEY}", True),
        (f"x-api-key: {KEY} ", True),
        (f"x-api-key: {KEY}\t", True),
        (f"x-api-key: \t{KEY} \t", True),
        (f"authorization: Bearer {KEY}", True),
        (f"authorization: Bearer {KEY} ", True),
        (f"authorization: Bearer  {KEY}\t", True),
        (f"authorization: bearer {KEY}", True),
        (f"x-api-key: {KEY}x", False),
        (f"x-api-key: {KEY[:4]} {KEY[4:]}", False),  # whitespace inside is part of the value
        (f"authorization: Bearer {KEY[:4]} {KEY[4:]}", False),
        ("x-api-key:  \t", None),
        ("authorization: Bearer  ", None),
    ],
)
def test_whitespace_around_a_key_is_one_rule_for_both_headers(
    keyed: httpx.Client, header: str, accepted: bool | None
) -> None:
    # Raw bytes: an HTTP client library would trim or refuse the whitespace itself.
    request = (
        f"GET /v1/models HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\n{header}\r\nconnection: close\r\n\r\n"
    )
    head, _, content = _raw_exchange(str(keyed.base_url).rstrip("/"), request.encode()).partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == (b"200" if accepted else b"401"), header
    if not accepted:  # only whitespace is no key at all
        message = "invalid x-api-key" if accepted is False else "x-api-key header is required"
        assert json.loads(content)["error"]["message"] == message


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/v1/models/fake"])
def test_head_is_answered_like_get_without_a_body(client: httpx.Client, path: str) -> None:
    got = client.get(path)
    head = client.head(path)
    assert got.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["request-id"].startswith("req_01")
    if "content-length" in got.headers and path != "/metrics":  # the metrics change between the two calls
        assert head.headers["content-length"] == got.headers["content-length"]


def test_head_on_an_unknown_model_is_404_without_a_body(client: httpx.Client) -> None:
    head = client.head("/v1/models/claude-x")
    assert head.status_code == 404 and head.content == b""
    assert head.headers["request-id"].startswith("req_01")


def test_head_is_not_allowed_where_get_is_not(client: httpx.Client) -> None:
    head = client.head("/v1/complete")
    assert head.status_code == 405 and head.content == b""


@pytest.mark.parametrize("path", ["/v1/complete/", "/v1/models/", "/health/"])
def test_a_trailing_slash_is_404_not_a_redirect(client: httpx.Client, path: str) -> None:
    method = "POST" if path == "/v1/complete/" else "GET"
    response = client.request(method, path, json=body(), headers={"host": "attacker.example"})
    assert_error(response, 404, "not_found_error")
    assert "location" not in response.headers
