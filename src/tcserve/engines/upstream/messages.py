"""Anthropic's Messages API (`POST /v1/messages`) as an upstream API: headers and
body from a conversation, the stream's events as engine events, and upstream
errors as ours. No HTTP client here.

Stream events (Anthropic's "Messages streaming" docs): `message_start` (input
usage), `content_block_start`, `content_block_delta` (`text_delta` is text; other
delta kinds carry no completion text), `content_block_stop`, `message_delta`
(`stop_reason`, `stop_sequence`, cumulative output usage), `message_stop`,
`ping`, `error`. Stop reasons:

    end_turn       -> Finished end_of_sequence  (the wire: stop_sequence, stop null)
    stop_sequence  -> Finished stop_sequence, with the matched string
    max_tokens     -> Finished max_tokens
    anything else  -> UnsupportedStopReason (tool_use, refusal, pause_turn, ...):
                      a clear error, never a silent short answer
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from tcserve.core.request import EngineEvent, Finished, SamplingParams, TextDelta
from tcserve.core.transcript import Conversation
from tcserve.errors import EngineFailure, InvalidRequest, Overloaded, TCServeError

ANTHROPIC_VERSION = "2023-06-01"
_ROLES = {"human": "user", "assistant": "assistant"}
_OVERLOADED = frozenset({"overloaded_error", "rate_limit_error"})


class UnsupportedStopReason(InvalidRequest):
    """The upstream ended for a reason a text completion cannot express. Its message
    reaches the caller (a 400, or the stream's `error` event): retrying the same
    prompt would end the same way."""

    def __init__(self, stop_reason: str) -> None:
        self.stop_reason = stop_reason
        super().__init__(
            f"the upstream model ended with stop_reason {stop_reason!r}, which Text Completions cannot express"
        )


class MessagesStreamError(EngineFailure):
    """The stream broke or said something that is not a normal message."""


def messages_headers(api_key: str) -> dict[str, str]:
    return {"x-api-key": api_key, "anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}


def messages_body(
    model: str,
    conversation: Conversation,
    *,
    max_tokens: int,
    sampling: SamplingParams,
    stop_sequences: Sequence[str] = (),
    user_id: str | None = None,
) -> dict[str, Any]:
    """A streaming Messages request: alternating messages, the prefill as a final
    assistant message (Claude continues it), the system text as `system`."""
    turns, prefill = conversation.chat_turns()
    messages = [{"role": _ROLES[turn.role], "content": turn.text} for turn in turns]
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "stream": True,
    }
    if conversation.system:
        body["system"] = conversation.system
    if stop_sequences:
        body["stop_sequences"] = list(stop_sequences)
    if sampling.top_p is not None:
        body["top_p"] = sampling.top_p
    if sampling.top_k:
        body["top_k"] = sampling.top_k
    if user_id is not None:
        body["metadata"] = {"user_id": user_id}
    return body


def upstream_error(
    error: Mapping[str, Any], *, status: int | None = None, retry_after: float | None = None
) -> TCServeError:
    """An upstream error (an HTTP error body's `error`, or a stream's `error` event) as
    ours: overloaded and rate-limited (429, 503, 529) are `Overloaded` with the
    upstream's retry-after; the caller's mistakes (other 4xx) keep their message;
    the rest is an `EngineFailure` whose detail goes to the log."""
    kind = str(error.get("type", ""))
    message = str(error.get("message", "")) or kind or "upstream error"
    if kind in _OVERLOADED or status in (429, 503, 529):
        return Overloaded(f"Overloaded: the upstream said {message}", retry_after=retry_after or 1.0)
    if kind == "invalid_request_error" or kind == "not_found_error" or (status is not None and 400 <= status < 500):
        return InvalidRequest(message)
    return MessagesStreamError(f"upstream {kind or status}: {message}")


class MessagesStream:
    """Messages SSE `data:` payloads -> engine events; `Finished` at `message_stop`."""

    def __init__(self) -> None:
        self._input_tokens = 0
        self._output_tokens = 0
        self._finish: Finished | None = None
        self.done = False

    def feed(self, data: str) -> list[EngineEvent]:
        if self.done:
            return []
        event = json.loads(data)
        match event.get("type"):
            case "message_start":
                self._count(event.get("message", {}).get("usage") or {})
            case "content_block_delta":
                delta = event.get("delta") or {}
                if delta.get("type") == "text_delta" and delta.get("text"):
                    return [TextDelta(delta["text"])]
            case "message_delta":
                self._count(event.get("usage") or {})
                delta = event.get("delta") or {}
                if (reason := delta.get("stop_reason")) is not None:
                    self._finish = _finished(str(reason), delta.get("stop_sequence"))
            case "message_stop":
                return self.close()
            case "error":
                raise upstream_error(event.get("error") or {})
        return []  # ping, content_block_start/stop, and event kinds added later

    def close(self) -> list[EngineEvent]:
        if self.done:
            return []
        if self._finish is None:
            raise MessagesStreamError("the stream ended without a stop reason")
        self.done = True
        finish = self._finish
        return [dataclasses.replace(finish, prompt_tokens=self._input_tokens, completion_tokens=self._output_tokens)]

    def _count(self, usage: Mapping[str, Any]) -> None:
        """Input usage counts cache reads and writes too (all are prompt tokens); output
        usage is cumulative, so the last one is the total."""
        if "input_tokens" in usage:
            cached = ("cache_creation_input_tokens", "cache_read_input_tokens")
            self._input_tokens = int(usage["input_tokens"]) + sum(int(usage.get(key) or 0) for key in cached)
        if "output_tokens" in usage:
            self._output_tokens = int(usage["output_tokens"])


def _finished(reason: str, stop_sequence: object) -> Finished:
    if reason == "end_turn":
        return Finished("end_of_sequence")
    if reason == "stop_sequence" and isinstance(stop_sequence, str):
        return Finished("stop_sequence", stop=stop_sequence)
    if reason == "max_tokens":
        return Finished("max_tokens")
    raise UnsupportedStopReason(reason)
