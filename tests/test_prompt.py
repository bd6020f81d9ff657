from __future__ import annotations

import pytest

from tcserve.core.request import CompletionCall
from tcserve.core.transcript import BAD_END, BAD_START, prepare, sanitise, wrap_bare_prompt
from tcserve.core.validate import to_generation_request
from tcserve.errors import PromptError

ACCEPTED = [
    ("\n\nHuman: Hello\n\nAssistant:", "\n\nHuman: Hello\n\nAssistant:"),
    # Text before the first Human turn is a system prompt.
    ("You are terse.\n\nHuman: Hello\n\nAssistant:", "You are terse.\n\nHuman: Hello\n\nAssistant:"),
    # Text after the last Assistant turn is a prefill.
    ("\n\nHuman: Hello\n\nAssistant: Sure, here", "\n\nHuman: Hello\n\nAssistant: Sure, here"),
    # A prompt that begins with Human: gets \n\n in front.
    ("Human: Hello\n\nAssistant:", "\n\nHuman: Hello\n\nAssistant:"),
    # Trailing whitespace is removed.
    ("\n\nHuman: Hello\n\nAssistant: \n ", "\n\nHuman: Hello\n\nAssistant:"),
    # Several turns.
    (
        "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:",
        "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:",
    ),
    # A single-newline marker is not a turn: it is just text inside the Human turn.
    ("\n\nHuman: say\nAssistant: hi\n\nAssistant:", "\n\nHuman: say\nAssistant: hi\n\nAssistant:"),
]

REJECTED = [
    ("Hello, world", BAD_START),
    ("Hello, world\n\nAssistant:", BAD_START),
    ("\n\nHuman: Hello", BAD_END),
    ("\n\nAssistant: Hi\n\nHuman: Hello", BAD_START),
    # Single newlines are not turns, so this has neither.
    ("\nHuman: Hello\nAssistant:", BAD_START),
    ("\n\nHuman: Hello\nAssistant:", BAD_END),
]


@pytest.mark.parametrize(("raw", "expected"), ACCEPTED)
def test_accepted_prompts_are_sanitised(raw: str, expected: str) -> None:
    assert prepare(raw) == expected


@pytest.mark.parametrize(("raw", "message"), REJECTED)
def test_rejected_prompts_get_anthropics_message(raw: str, message: str) -> None:
    with pytest.raises(PromptError) as caught:
        prepare(raw)
    assert str(caught.value) == message


def test_messages_carry_real_newlines() -> None:
    assert BAD_START == 'prompt must start with "\n\nHuman:" turn after an optional system prompt'
    assert BAD_END == 'prompt must end with "\n\nAssistant:" turn'
    assert "\\n" not in BAD_START


def test_raw_mode_passes_the_prompt_untouched() -> None:
    call = CompletionCall("req_test", "m", "Once upon a time ", 8)
    assert to_generation_request(call, check_transcript=False).prompt == "Once upon a time "
    with pytest.raises(PromptError):
        to_generation_request(call, check_transcript=True)


def test_sanitise_only_prefixes_a_leading_human() -> None:
    assert sanitise("  Human: x") == "  Human: x"


def test_wrap_bare_prompt() -> None:
    assert wrap_bare_prompt("Hi?") == "\n\nHuman: Hi?\n\nAssistant:"
    assert wrap_bare_prompt("\n\nHuman: a\n\nAssistant:") == "\n\nHuman: a\n\nAssistant:"
