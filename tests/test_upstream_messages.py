"""The Messages API adapter (engines/upstream/messages.py) on recorded streams in
Anthropic's documented format (tests/golden/messages/), and its request body."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tcserve.core.request import EngineEvent, Finished, SamplingParams, TextDelta
from tcserve.core.transcript import parse_conversation, prepare
from tcserve.engines.upstream.messages import (
    MessagesStream,
    MessagesStreamError,
    UnsupportedStopReason,
    messages_body,
    messages_headers,
    upstream_error,
)
from tcserve.engines.upstream.sse import sse_data
from tcserve.errors import InvalidRequest, Overloaded

GOLDEN = Path(__file__).parent / "golden" / "messages"


def replay(name: str) -> tuple[list[EngineEvent], MessagesStream]:
    stream = MessagesStream()
    events: list[EngineEvent] = []
    for data in sse_data((GOLDEN / name).read_text().splitlines()):
        events += stream.feed(data)
    return events, stream


@pytest.mark.parametrize(
    ("name", "texts", "finished"),
    [
        ("text.sse", ["Hello", ", Grüße 🌍!"], Finished("end_of_sequence", prompt_tokens=25, completion_tokens=15)),
        (
            "end_turn.sse",
            [],
            Finished("end_of_sequence", prompt_tokens=14, completion_tokens=2),
        ),  # 10 input + 4 read from the cache
        (
            "stop_sequence.sse",
            ["1, 2, 3"],
            Finished("stop_sequence", stop=", 4", prompt_tokens=18, completion_tokens=7),
        ),
        ("max_tokens.sse", ["Once upon", " a time"], Finished("max_tokens", prompt_tokens=12, completion_tokens=4)),
    ],
)
def test_a_recorded_stream_becomes_text_and_one_finish(name: str, texts: list[str], finished: Finished) -> None:
    events, stream = replay(name)
    assert events == [*(TextDelta(text) for text in texts), finished]
    assert stream.done and stream.close() == []


def test_a_mid_stream_error_event_is_raised_as_ours() -> None:
    stream = MessagesStream()
    payloads = list(sse_data((GOLDEN / "error.sse").read_text().splitlines()))
    events = [event for data in payloads[:-1] for event in stream.feed(data)]
    assert events == [TextDelta("Partial")]
    with pytest.raises(Overloaded, match="Overloaded"):
        stream.feed(payloads[-1])


def test_an_unknown_stop_reason_is_a_clear_error_not_a_short_answer() -> None:
    with pytest.raises(UnsupportedStopReason, match="stop_reason 'refusal'") as caught:
        replay("unknown_stop_reason.sse")
    assert isinstance(caught.value, InvalidRequest)  # its message reaches the caller


@pytest.mark.parametrize("reason", ["tool_use", "pause_turn", "model_context_window_exceeded"])
def test_other_stop_reasons_fail_too(reason: str) -> None:
    stream = MessagesStream()
    with pytest.raises(UnsupportedStopReason, match=reason):
        stream.feed(json.dumps({"type": "message_delta", "delta": {"stop_reason": reason}, "usage": {}}))


def test_a_stream_cut_before_message_stop_is_an_error() -> None:
    stream = MessagesStream()
    stream.feed(json.dumps({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x"}}))
    with pytest.raises(MessagesStreamError, match="without a stop reason"):
        stream.close()


def test_upstream_http_errors() -> None:
    overloaded = json.loads((GOLDEN / "overloaded_529.json").read_text())["error"]
    error = upstream_error(overloaded, status=529)
    assert isinstance(error, Overloaded) and error.retry_after == 1.0
    limited = json.loads((GOLDEN / "rate_limit_429.json").read_text())["error"]
    error = upstream_error(limited, status=429, retry_after=17.0)
    assert isinstance(error, Overloaded) and error.retry_after == 17.0
    retired = upstream_error({"type": "not_found_error", "message": "model: claude-2.1"}, status=404)
    assert type(retired) is InvalidRequest and str(retired) == "model: claude-2.1"
    assert isinstance(upstream_error({"type": "api_error", "message": "boom"}, status=500), MessagesStreamError)


def test_the_body_and_headers() -> None:
    conversation = parse_conversation(
        prepare("Be brief.\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Count\n\nHuman: to three\n\nAssistant: 1,")
    )
    body = messages_body(
        "claude-sonnet-4-5", conversation, max_tokens=64, sampling=SamplingParams(temperature=0.5, top_p=0.9, top_k=5),
        stop_sequences=["\n\nHuman:", "4"], user_id="u-1",
    )  # fmt: skip
    assert body == {
        "model": "claude-sonnet-4-5",
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Count\n\nto three"},
            {"role": "assistant", "content": "1,"},
        ],
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "stop_sequences": ["\n\nHuman:", "4"],
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }
    plain = messages_body("m", parse_conversation(prepare("\n\nHuman: Hi\n\nAssistant:")), max_tokens=8,
                          sampling=SamplingParams(temperature=0.0))  # fmt: skip
    assert plain == {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                     "temperature": 0.0, "stream": True}  # fmt: skip
    assert messages_headers("sk-x") == {"x-api-key": "sk-x", "anthropic-version": "2023-06-01",
                                        "content-type": "application/json"}  # fmt: skip


def test_sse_data_joins_multi_line_data_and_drops_the_rest() -> None:
    lines = [": comment", "event: x", "data: a", "data:b", "", "", "id: 1", "data: c"]
    assert list(sse_data(lines)) == ["a\nb", "c"]
