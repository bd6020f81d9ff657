"""The Messages upstream through the whole server, driven by `anthropic==0.125.0`:
a scripted Anthropic (httpx.MockTransport) replays the recorded streams of
tests/golden/messages/ and tcserve answers /v1/complete from them. One entry with
`upstream_model = "{model}"` serves every Claude id, each forwarded as it was asked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from support import serve_app, settings
from tcserve.api.app import create_app
from tcserve.config import ServedModel, UpstreamModel
from tcserve.engines.base import Engine
from tcserve.engines.factory import build_engine, upstream_settings
from tcserve.engines.upstream.engine import UpstreamEngine

GOLDEN = Path(__file__).parent / "golden" / "messages"
ANTHROPIC = "http://anthropic.test"
KEY = "sk-ant-upstream-key"
STREAMS = ("text", "stop_sequence", "max_tokens", "end_turn", "error", "unknown_stop_reason")


class ScriptedAnthropic:
    """Answers by the first user message's text: the name of a golden stream or error."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(404, json={"type": "error", "error": {"type": "not_found_error", "message": "no"}})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [], "has_more": False})
        assert request.url.path == "/v1/messages"
        body = json.loads(request.content)
        self.bodies.append(body)
        self.headers.append(request.headers)
        scenario = body["messages"][0]["content"]
        if scenario in STREAMS:
            stream = (GOLDEN / f"{scenario}.sse").read_bytes()
            return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})
        if scenario == "overloaded":
            return httpx.Response(529, content=(GOLDEN / "overloaded_529.json").read_bytes())
        if scenario == "rate_limited":
            limited = (GOLDEN / "rate_limit_429.json").read_bytes()
            return httpx.Response(429, content=limited, headers={"retry-after": "17"})
        message = f"model: {body['model']}"
        return httpx.Response(404, json={"type": "error", "error": {"type": "not_found_error", "message": message}})


@pytest.fixture(scope="module")
def upstream() -> ScriptedAnthropic:
    return ScriptedAnthropic()


@pytest.fixture(scope="module")
def client(upstream: ScriptedAnthropic) -> Iterator[anthropic.Anthropic]:
    claude = UpstreamModel.model_validate({
        "name": "claude", "engine": "upstream", "api": "messages", "urls": [ANTHROPIC], "api_key": KEY,
        "upstream_model": "{model}", "context_size": 200000,
    })  # fmt: skip

    def factory(model: ServedModel) -> Engine:
        if isinstance(model, UpstreamModel):
            return UpstreamEngine(upstream_settings(model), transport=httpx.MockTransport(upstream))
        return build_engine(model)

    with (
        serve_app(create_app(settings(), [claude], factory)) as url,
        anthropic.Anthropic(base_url=url, api_key="caller-key", max_retries=0) as sdk,
    ):
        yield sdk


def create(client: anthropic.Anthropic, scenario: str, **params: Any) -> Any:
    prompt = f"\n\nHuman: {scenario}\n\nAssistant:"
    arguments = {"model": "claude-sonnet-4-5", "prompt": prompt, "max_tokens_to_sample": 64, **params}
    return client.completions.create(**arguments)


def streamed(client: anthropic.Anthropic, scenario: str, **params: Any) -> tuple[str, Any]:
    with create(client, scenario, stream=True, **params) as stream:
        events = list(stream)
    return "".join(event.completion for event in events), events[-1]


def test_text_is_forwarded_to_the_id_asked_for(client: anthropic.Anthropic, upstream: ScriptedAnthropic) -> None:
    completion = create(client, "text", temperature=0.5, stop_sequences=["END"], metadata={"user_id": "u-1"})
    assert (completion.completion, completion.stop_reason, completion.stop) == (
        "Hello, Grüße 🌍!",
        "stop_sequence",
        None,
    )
    assert completion.model == "claude-sonnet-4-5"
    body, headers = upstream.bodies[-1], upstream.headers[-1]
    assert body["model"] == "claude-sonnet-4-5" and body["stream"] is True and body["max_tokens"] == 64
    assert body["messages"] == [{"role": "user", "content": "text"}]
    assert body["stop_sequences"] == ["\n\nHuman:", "END"] and body["metadata"] == {"user_id": "u-1"}
    assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers  # the caller's key is not passed on
    text, last = streamed(client, "text")
    assert (text, last.stop_reason, last.stop) == ("Hello, Grüße 🌍!", "stop_sequence", None)
    haiku = create(client, "text", model="claude-haiku-4-5")
    assert haiku.model == "claude-haiku-4-5" and upstream.bodies[-1]["model"] == "claude-haiku-4-5"


def test_stop_sequence_max_tokens_and_end_turn(client: anthropic.Anthropic) -> None:
    stop = create(client, "stop_sequence", stop_sequences=[", 4"])
    assert (stop.completion, stop.stop_reason, stop.stop) == ("1, 2, 3", "stop_sequence", ", 4")
    assert streamed(client, "stop_sequence", stop_sequences=[", 4"])[1].stop == ", 4"
    limit = create(client, "max_tokens", max_tokens_to_sample=4)
    assert (limit.completion, limit.stop_reason, limit.stop) == ("Once upon a time", "max_tokens", None)
    assert streamed(client, "max_tokens", max_tokens_to_sample=4)[1].stop_reason == "max_tokens"
    end = create(client, "end_turn")
    assert (end.completion, end.stop_reason, end.stop) == ("", "stop_sequence", None)


def test_a_mid_stream_error_event_becomes_ours(client: anthropic.Anthropic) -> None:
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as failed, create(client, "error", stream=True) as stream:
        received.extend(event.completion for event in stream)
    assert "".join(received) == "Partial"
    assert isinstance(failed.value.body, dict) and failed.value.body["error"]["type"] == "overloaded_error"


def test_overloaded_and_rate_limited_upstreams_are_529_with_retry_after(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        create(client, "overloaded")
    assert overloaded.value.response.headers["retry-after"] == "1"
    with pytest.raises(anthropic.OverloadedError) as limited:
        create(client, "rate_limited")
    assert limited.value.response.headers["retry-after"] == "17"  # the upstream's, passed on


def test_an_unknown_stop_reason_is_a_clear_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="stop_reason 'refusal'"):
        create(client, "unknown_stop_reason")
    streaming = pytest.raises(anthropic.APIStatusError, match="stop_reason 'refusal'")
    with streaming, create(client, "unknown_stop_reason", stream=True) as stream:
        list(stream)


def test_a_retired_id_gets_the_upstreams_404(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError, match=r"model: claude-2\.1"):
        create(client, "retired", model="claude-2.1")
