"""A GGUF's own chat template, rendered the way `transformers` renders it.

The environment is `transformers`' (`apply_chat_template`): a sandboxed,
immutable Jinja2 environment with `trim_blocks` and `lstrip_blocks`,
`raise_exception`, `strftime_now` and a `tojson` that does not escape HTML;
`messages` as `{"role": "system" | "user" | "assistant", "content": str}`,
`add_generation_prompt=True`, and `bos_token` / `eos_token` as strings. The text
the model continues (the prefill) goes after the generation prompt.

No double BOS: many templates write the BOS text themselves (`{{ bos_token }}`)
and llama.cpp's tokenizer adds a BOS token too. `add_bos` says whether the
tokenizer should add one: not when the rendered text already starts with it.
The rendered text is tokenized with special tokens parsed, as `transformers`
and llama.cpp's server do, so the template's markers become their tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tcserve.core.transcript import Conversation, Turn
from tcserve.errors import EngineFailure, InvalidRequest

Message = dict[str, str]

PROBE = Conversation(
    system="You are a helpful assistant.",
    turns=(Turn("human", "Hello"), Turn("assistant", "Hi there"), Turn("human", "How are you?")),
    prefill="",
)
"""What every chat template must render at load."""

_ROLES = {"human": "user", "assistant": "assistant"}


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template that has rendered the probe conversation.

    `system_role` is False for templates that refuse a system message (Gemma 2
    raises "System role not supported"): the system text then goes in front of
    the first user message, as Gemma 3's own template does.
    """

    source: str
    bos_token: str
    eos_token: str
    system_role: bool
    _template: jinja2.Template

    def messages(self, conversation: Conversation) -> tuple[list[Message], str]:
        """The template's `messages` and the text to continue after its generation prompt."""
        turns, prefill = conversation.chat_turns()
        messages = [{"role": _ROLES[turn.role], "content": turn.text} for turn in turns]
        if conversation.system and self.system_role:
            messages.insert(0, {"role": "system", "content": conversation.system})
        elif conversation.system:
            messages[0] = {"role": "user", "content": f"{conversation.system}\n\n{messages[0]['content']}"}
        return messages, prefill

    def render(self, conversation: Conversation) -> str:
        """The prompt text; a template that rejects this conversation is the caller's 400."""
        messages, prefill = self.messages(conversation)
        try:
            return self._render(messages) + prefill
        except jinja2.TemplateError as error:
            raise InvalidRequest(f"the model's chat template rejected the prompt: {error}") from None

    def turn_opening(self) -> str:
        """The text the template puts between an assistant's answer and the next user
        message (Gemma 3: "<end_of_turn>\\n<start_of_turn>user\\n"), or "" when the
        probe conversation does not show it plainly."""
        rendered = self._render(self.messages(Conversation(system="", turns=PROBE.turns, prefill=""))[0])
        answer, question = PROBE.turns[1].text, PROBE.turns[2].text
        after = rendered.find(answer) + len(answer)
        before = rendered.find(question, after)
        return rendered[after:before] if answer in rendered and before > after else ""

    def add_bos(self, rendered: str) -> bool:
        """Whether the tokenizer should add BOS (it is not already the text's start)."""
        return not (self.bos_token and rendered.startswith(self.bos_token))

    def _render(self, messages: list[Message]) -> str:
        return self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=True,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


def load_chat_template(source: str, *, bos_token: str, eos_token: str, name: str = "model") -> ChatTemplate:
    """Compile `source` and render the probe with it: a template that cannot is a
    load failure with a message that names the model and the template's complaint."""
    try:
        compiled = _environment().from_string(source)
    except jinja2.TemplateError as error:
        raise EngineFailure(f"{name}: the chat template does not compile: {error}") from None
    template = ChatTemplate(source, bos_token, eos_token, True, compiled)
    try:
        template._render(template.messages(PROBE)[0])
        return template
    except Exception as with_system:  # any failure of the template's own code
        template = ChatTemplate(source, bos_token, eos_token, False, compiled)
        try:
            template._render(template.messages(PROBE)[0])
        except Exception as error:
            raise EngineFailure(
                f"{name}: the chat template cannot render a probe conversation: {error!r}"
                f" (with a system message: {with_system!r})"
            ) from None
        return template
