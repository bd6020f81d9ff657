"""OpenAI `/v1/chat/completions` as an upstream API: the request body from a
conversation, and the stream's chunks as engine events. No HTTP client here.

The prefill is sent as a final assistant message that the server continues:
- vLLM and SGLang: with `continue_final_message: true, add_generation_prompt:
  false` (both servers' request models have the two fields; without them the
  template opens a new assistant turn after the prefill);
- llama-server: a final assistant message is continued by default (its
  `--no-prefill-assistant` flag turns that off); it ignores the two fields;
- Ollama continues a final assistant message by itself too.
`continue_fields=False` leaves the fields out, for servers that reject unknown ones.
Without a prefill no assistant message is added and the fields are not sent.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from tcserve.core.request import EngineEvent, Finished, SamplingParams, TextDelta
from tcserve.core.transcript import Conversation
from tcserve.errors import EngineFailure

_ROLES = {"human": "user", "assistant": "assistant"}


class ChatStreamError(EngineFailure):
    """The upstream's stream said something that is not a normal completion."""


def chat_messages(conversation: Conversation) -> list[dict[str, str]]:
    turns, prefill = conversation.chat_turns()
    messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
    messages += [{"role": _ROLES[turn.role], "content": turn.text} for turn in turns]
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
    return messages


def chat_body(
    model: str,
    conversation: Conversation,
    *,
    max_tokens: int,
    sampling: SamplingParams,
    stop_sequences: Sequence[str] = (),
    continue_fields: bool = True,
) -> dict[str, Any]:
    """A streaming chat request. `stop_sequences` are those to send (the caller cuts
    them to the upstream's limit); the stop text comes back in the output (vLLM's
    `include_stop_str_in_output`) so that tcserve's own matcher finds and reports it."""
    body: dict[str, Any] = {
        "model": model,
        "messages": chat_messages(conversation),
        "max_tokens": max_tokens,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if conversation.chat_turns()[1] and continue_fields:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body | openai_options(sampling, stop_sequences)


def openai_options(sampling: SamplingParams, stop_sequences: Sequence[str]) -> dict[str, Any]:
    """The stop and sampling fields that OpenAI-style completions and chat completions
    share. The stop text is asked back (vLLM's `include_stop_str_in_output`), so that
    tcserve's own matcher cuts and reports it as it does for every engine."""
    options: dict[str, Any] = {}
    if stop_sequences:
        options["stop"] = list(stop_sequences)
        options["include_stop_str_in_output"] = True
    if sampling.top_p is not None:
        options["top_p"] = sampling.top_p
    if sampling.top_k:
        options["top_k"] = sampling.top_k
    if sampling.seed is not None:
        options["seed"] = sampling.seed
    return options


class ChatStream:
    """Chat-completion SSE `data:` payloads -> engine events.

    The finish reason comes in a chunk of its own, and the usage (asked for with
    `stream_options.include_usage`) in a later chunk with no choices: `Finished` is
    given when both are known, or at `[DONE]` / the end of the stream.
    """

    def __init__(self) -> None:
        self._finish: Finished | None = None
        self._usage: tuple[int, int] | None = None
        self.done = False

    def feed(self, data: str) -> list[EngineEvent]:
        if self.done:
            return []
        if data.strip() == "[DONE]":
            return self.close()
        chunk = json.loads(data)
        if "error" in chunk:
            raise ChatStreamError(f"upstream error event: {chunk['error']}")
        events: list[EngineEvent] = []
        for choice in chunk.get("choices") or ():
            if text := (choice.get("delta") or {}).get("content"):
                events.append(TextDelta(text))
            if (reason := choice.get("finish_reason")) is not None:
                self._finish = openai_finish(reason, choice.get("stop_reason"))
        if usage := chunk.get("usage"):
            self._usage = (int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
        if self._finish is not None and self._usage is not None:
            events += self.close()
        return events

    def close(self) -> list[EngineEvent]:
        """The end of the stream: the `Finished` event, or an error if none came."""
        if self.done:
            return []
        if self._finish is None:
            raise ChatStreamError("the stream ended without a finish reason")
        self.done = True
        prompt, completion = self._usage or (None, None)
        return [dataclasses.replace(self._finish, prompt_tokens=prompt, completion_tokens=completion)]


def openai_finish(reason: str, stop: object) -> Finished:
    """`stop` (vLLM names the stop string it matched in `stop_reason`) or `length`;
    anything else ("tool_calls", "content_filter", "abort") is not a text completion,
    and passing it on as a short one would be a silent truncation."""
    if reason == "length":
        return Finished("max_tokens")
    if reason != "stop":
        raise ChatStreamError(f"the upstream ended the request with finish_reason {reason!r}")
    if isinstance(stop, str):
        return Finished("stop_sequence", stop=stop)
    return Finished("end_of_sequence")
