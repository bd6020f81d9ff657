"""The chat-completions adapter (engines/upstream/chat.py): body and stream parser."""

from __future__ import annotations

import json

import pytest

from tcserve.core.request import EngineEvent, Finished, SamplingParams, TextDelta
from tcserve.core.transcript import parse_conversation, prepare
from tcserve.engines.upstream.chat import ChatStream, ChatStreamError, chat_body


def chunk(content: str | None = None, finish: str | None = None, **extra: object) -> str:
    delta = {} if content is None else {"content": content}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]})


USAGE = json.dumps({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}})


def feed(*payloads: str) -> list[EngineEvent]:
    stream = ChatStream()
    return [event for data in payloads for event in stream.feed(data)]


def test_the_body_continues_the_prefill_on_vllm() -> None:
    conversation = parse_conversation(prepare("Be brief.\n\nHuman: Hi\n\nAssistant:  The answer is"))
    body = chat_body("tiny", conversation, max_tokens=16, sampling=SamplingParams(temperature=0.7, top_k=4, seed=3),
                     stop_sequences=["\n\nHuman:"])  # fmt: skip
    assert body == {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "The answer is"},
        ],
        "max_tokens": 16,
        "temperature": 0.7,
        "top_k": 4,
        "seed": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "continue_final_message": True,
        "add_generation_prompt": False,
        "stop": ["\n\nHuman:"],
        "include_stop_str_in_output": True,
    }
    plain = chat_body("tiny", conversation, max_tokens=16, sampling=SamplingParams(), continue_fields=False)
    assert "continue_final_message" not in plain and plain["messages"][-1]["role"] == "assistant"


def test_without_a_prefill_no_assistant_message_and_no_continue_fields() -> None:
    body = chat_body("tiny", parse_conversation(prepare("\n\nHuman: Hi\n\nAssistant:")), max_tokens=4,
                     sampling=SamplingParams(temperature=0.0))  # fmt: skip
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    assert "continue_final_message" not in body and "stop" not in body and body["temperature"] == 0.0


def test_a_stream_with_usage() -> None:
    events = feed(chunk("", role="assistant"), chunk("Hel"), chunk("lo"), chunk(None, "stop"), USAGE, "[DONE]")
    assert events == [
        TextDelta("Hel"),
        TextDelta("lo"),
        Finished("end_of_sequence", prompt_tokens=11, completion_tokens=3),
    ]


def test_finish_reasons() -> None:
    assert feed(chunk("a", "length"), "[DONE]") == [TextDelta("a"), Finished("max_tokens")]
    named = feed(chunk(" water", "stop", stop_reason=" water"), USAGE)
    assert named == [
        TextDelta(" water"),
        Finished("stop_sequence", stop=" water", prompt_tokens=11, completion_tokens=3),
    ]
    with pytest.raises(ChatStreamError, match="finish_reason 'tool_calls'"):
        feed(chunk("a", "tool_calls"))


def test_errors() -> None:
    with pytest.raises(ChatStreamError, match="upstream error event"):
        feed(chunk("a"), json.dumps({"error": {"message": "boom"}}))
    with pytest.raises(ChatStreamError, match="without a finish reason"):
        feed(chunk("a"), "[DONE]")
