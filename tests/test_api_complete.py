"""POST /v1/complete on the fake engine: response shapes, streaming frames, stops, pings, failures."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from support import PROMPT, VERSION, fake_model, serve_app, settings
from tcserve.api.app import create_app
from tcserve.config import FakeModel
from tcserve.engines.fake import FakeEngine

REPLY = " The quick brown fox.\n\nHuman: and more"


def body(**overrides: object) -> dict[str, object]:
    return {"model": "fake", "prompt": PROMPT, "max_tokens_to_sample": 50, **overrides}


def parse_sse(text: str) -> list[tuple[str, dict[str, object]]]:
    """Strictly: every event is one `event:` line, one `data:` line and a blank line."""
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        events.append((event_line[7:], json.loads(data_line[6:])))
    return events


@contextmanager
def server(*models: FakeModel, **setting: object) -> Iterator[tuple[httpx.Client, dict[str, FakeEngine]]]:
    app = create_app(settings(**setting), list(models) or [fake_model(reply=REPLY)])
    with serve_app(app) as url, httpx.Client(base_url=url, headers=VERSION, timeout=30) as client:
        yield client, app.state.tcserve.engines.by_name


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with server() as (client, _):
        yield client


def test_whole_completion_shape(client: httpx.Client) -> None:
    response = client.post("/v1/complete", json=body(model="claude-opus-4-6"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert list(payload) == ["type", "id", "completion", "stop_reason", "model", "stop", "log_id"]
    assert payload["type"] == "completion"
    assert payload["completion"] == " The quick brown fox."
    assert payload["stop_reason"] == "stop_sequence"
    assert payload["stop"] == "\n\nHuman:"
    assert payload["model"] == "claude-opus-4-6"  # echoes the id the client sent
    assert payload["log_id"] == payload["id"] and payload["id"].startswith("compl_01")
    assert len(payload["id"]) == len("compl_") + 24


def test_stream_frames(client: httpx.Client) -> None:
    response = client.post("/v1/complete", json=body(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = parse_sse(response.text)
    assert all(name == "completion" for name, _ in events)
    *deltas, last = [data for _, data in events]
    assert all(d["stop_reason"] is None and d["stop"] is None for d in deltas)
    assert last["stop_reason"] == "stop_sequence" and last["stop"] == "\n\nHuman:"
    assert len({d["id"] for d in [*deltas, last]}) == 1
    text = "".join(str(d["completion"]) for d in [*deltas, last])
    assert text == client.post("/v1/complete", json=body()).json()["completion"]
    assert all("\n" not in str(d["completion"]) for d in deltas[-2:])  # no part of the stop leaked


def test_user_stop_sequence(client: httpx.Client) -> None:
    payload = client.post("/v1/complete", json=body(stop_sequences=["brown"])).json()
    assert (payload["completion"], payload["stop"], payload["stop_reason"]) == (
        " The quick ",
        "brown",
        "stop_sequence",
    )


def test_max_tokens(client: httpx.Client) -> None:
    payload = client.post("/v1/complete", json=body(max_tokens_to_sample=2)).json()
    assert (payload["completion"], payload["stop"], payload["stop_reason"]) == (
        " The quick",
        None,
        "max_tokens",
    )


def test_end_of_sequence_is_stop_sequence_with_null_stop() -> None:
    with server(fake_model(reply=" Done. <eos> never")) as (client, _):
        payload = client.post("/v1/complete", json=body()).json()
    assert (payload["completion"], payload["stop"], payload["stop_reason"]) == (
        " Done.",
        None,
        "stop_sequence",
    )


def test_sampling_parameters_reach_the_engine() -> None:
    with server() as (client, engines):
        client.post("/v1/complete", json=body(temperature=0, top_p=0.5, top_k=3, stop_sequences=["x"]))
        request = engines["fake"].requests[-1]  # type: ignore[attr-defined]
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.top_k) == (0.0, 0.5, 3)
    assert request.sampling.greedy
    assert request.stop_sequences == ("\n\nHuman:", "x")
    assert request.max_tokens == 50


def test_pings_keep_a_quiet_stream_alive() -> None:
    with server(fake_model(reply=" a b", token_delay=0.3), ping_interval=0.1) as (client, _):
        events = parse_sse(client.post("/v1/complete", json=body(stream=True)).text)
    names = [name for name, _ in events]
    assert "ping" in names
    assert next(data for name, data in events if name == "ping") == {"type": "ping"}
    assert names[-1] == "completion"


def test_engine_failure_mid_stream_is_an_error_event() -> None:
    with server(fake_model(reply=" one two three", fail_after=2)) as (client, _):
        response = client.post("/v1/complete", json=body(stream=True))
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert [name for name, _ in events] == ["completion", "completion", "error"]
    error = events[-1][1]
    assert error["type"] == "error"
    assert error["error"] == {"type": "api_error", "message": "Internal server error"}  # no internals
    assert str(error["request_id"]) == response.headers["request-id"]


def test_engine_failure_before_the_response_is_a_generic_500() -> None:
    with server(fake_model(reply=" one two", fail_after=0)) as (client, _):
        response = client.post("/v1/complete", json=body())
    assert response.status_code == 500
    assert response.json()["error"] == {"type": "api_error", "message": "Internal server error"}
    assert "scripted" not in response.text


def test_loading_model_health_503_then_complete_529() -> None:
    app = create_app(settings(load_timeout=0.2), [fake_model(load_delay=30)])
    with serve_app(app, wait_ready=False) as url:
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503
        assert health.json()["error"]["type"] == "api_error"
        assert health.json()["models"] == {"fake": "loading"}
        response = httpx.post(f"{url}/v1/complete", json=body(), headers=VERSION)
        assert response.status_code == 529
        assert response.json()["error"]["type"] == "overloaded_error"
        assert response.headers["retry-after"] == "2"


def test_client_disconnect_stops_the_engine() -> None:
    with server(fake_model(reply=" tick" * 1000, token_delay=0.01)) as (client, engines):
        engine = engines["fake"]
        with client.stream("POST", "/v1/complete", json=body(stream=True, max_tokens_to_sample=1000)) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("event: completion")
            assert engine.active == 1  # type: ignore[attr-defined]
        # The client is gone: the server must close the engine's generation.
        deadline = time.monotonic() + 10
        while engine.active and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        assert engine.active == 0  # type: ignore[attr-defined]
