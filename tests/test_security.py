"""Keys guard every route but /health and /metrics; CORS is off unless asked for;
caps on prompt and stop sequences. The route test walks the app's own route
table, so a route added later cannot be forgotten."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.routing import Route

from support import PROMPT, VERSION, fake_model, serve_app, settings
from tcserve.api.app import create_app

KEY = "sk-security-key-1"
PUBLIC = {"/health", "/metrics"}


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[str, list[Route]]]:
    app = create_app(settings(api_keys=(KEY,), max_prompt_chars=200, max_stop_sequences=2, max_stop_chars=5),
                     [fake_model()])  # fmt: skip
    with serve_app(app) as url:
        yield url, [route for route in app.routes if isinstance(route, Route)]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "claude-opus-4-6", path)


def test_every_route_but_the_public_ones_refuses_a_missing_or_wrong_key(keyed: tuple[str, list[Route]]) -> None:
    url, routes = keyed
    checked = 0
    for route in routes:
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            path = _concrete(route.path)
            for headers in ({}, {"x-api-key": "sk-wrong"}, {"authorization": "Bearer sk-wrong"}):
                response = httpx.request(method, url + path, headers={**VERSION, **headers})
                if route.path in PUBLIC:
                    assert response.status_code == 200, (method, path)
                else:
                    assert response.status_code == 401, (method, path, response.status_code)
                    assert response.json()["error"]["type"] == "authentication_error"
            checked += 1
    assert checked >= 6  # /v1/complete, /v1/models, /v1/models/{id}, /health, /metrics, /openapi.json, /docs...


def test_the_right_key_opens_them(keyed: tuple[str, list[Route]]) -> None:
    url, _ = keyed
    assert httpx.get(f"{url}/v1/models", headers={**VERSION, "x-api-key": KEY}).status_code == 200


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompt": PROMPT + " x" * 200}, "prompt: at most 200 characters are accepted"),
        ({"stop_sequences": ["a", "b", "c"]}, "stop_sequences: at most 2 are accepted"),
        ({"stop_sequences": ["toolong"]}, "stop_sequences: each may have at most 5 characters"),
    ],
)
def test_caps(keyed: tuple[str, list[Route]], overrides: dict[str, object], message: str) -> None:
    url, _ = keyed
    body = {"model": "fake", "prompt": PROMPT, "max_tokens_to_sample": 5, **overrides}
    response = httpx.post(f"{url}/v1/complete", headers={**VERSION, "x-api-key": KEY}, json=body)
    assert response.status_code == 400
    assert response.json()["error"] == {"type": "invalid_request_error", "message": message}


def test_cors_is_off_by_default(keyed: tuple[str, list[Route]]) -> None:
    url, _ = keyed
    preflight = httpx.options(f"{url}/v1/complete", headers={"origin": "https://evil.example",
                                                             "access-control-request-method": "POST"})  # fmt: skip
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_only_the_configured_origins() -> None:
    app = create_app(settings(cors_origins=("https://app.example",)), [fake_model()])
    with serve_app(app) as url:
        ok = httpx.options(f"{url}/v1/complete", headers={"origin": "https://app.example",
                                                          "access-control-request-method": "POST",
                                                          "access-control-request-headers": "x-api-key"})  # fmt: skip
        other = httpx.options(f"{url}/v1/complete", headers={"origin": "https://evil.example",
                                                             "access-control-request-method": "POST"})  # fmt: skip
        simple = httpx.get(f"{url}/v1/models", headers={**VERSION, "origin": "https://app.example"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers
    assert simple.headers["access-control-allow-origin"] == "https://app.example"
    assert "request-id" in simple.headers["access-control-expose-headers"]


def test_a_slow_sender_gets_400_and_frees_the_connection() -> None:
    app = create_app(settings(body_timeout=0.3), [fake_model()])
    with serve_app(app) as url:

        def trickle() -> Iterator[bytes]:
            yield b'{"model": "fake",'
            time.sleep(2)
            yield b'"prompt": "x"}'

        response = httpx.post(f"{url}/v1/complete", headers=VERSION, content=trickle())
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "The request body did not arrive within 0.3 seconds"


def test_a_generation_past_its_deadline_ends_with_an_error() -> None:
    app = create_app(settings(request_timeout=0.3), [fake_model(reply=" tick" * 100, token_delay=0.05)])
    with serve_app(app) as url:
        body = {"model": "fake", "prompt": PROMPT, "max_tokens_to_sample": 100}
        whole = httpx.post(f"{url}/v1/complete", headers=VERSION, json=body)
        streamed = httpx.post(f"{url}/v1/complete", headers=VERSION, json={**body, "stream": True})
    message = "The request ran past the server's 0.3-second limit"
    assert whole.status_code == 500 and whole.json()["error"] == {"type": "api_error", "message": message}
    assert streamed.text.rstrip().splitlines()[-2:] == [
        "event: error",
        f'data: {{"type":"error","error":{{"type":"api_error","message":"{message}"}},'
        f'"request_id":"{streamed.headers["request-id"]}"}}',
    ]
