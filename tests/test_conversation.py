"""The transcript parsed into a conversation (core/transcript.py)."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcserve.core.transcript import Conversation, Turn, parse_conversation, prepare


def parse(prompt: str) -> Conversation:
    return parse_conversation(prepare(prompt))


def h(text: str) -> Turn:
    return Turn("human", text)


def a(text: str) -> Turn:
    return Turn("assistant", text)


CASES = [
    ("\n\nHuman: Hello\n\nAssistant:", Conversation("", (h("Hello"),), "")),
    ("Be terse.\n\nHuman: Hello\n\nAssistant:", Conversation("Be terse.", (h("Hello"),), "")),
    # The prefill keeps its leading space; trailing whitespace went in `sanitise`.
    ("\n\nHuman: Hi\n\nAssistant: Sure, here \n", Conversation("", (h("Hi"),), " Sure, here")),
    (
        "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:",
        Conversation("", (h("A"), a("B"), h("C")), ""),
    ),
    # Same-role runs merge, joined with a blank line; an empty one adds nothing.
    ("\n\nHuman: A\n\nHuman: B\n\nHuman:\n\nAssistant:", Conversation("", (h("A\n\nB"),), "")),
    # A single-newline marker is text, and turn text is stripped on both sides.
    ("\n\nHuman:  say\nAssistant: hi \n\n\nAssistant:", Conversation("", (h("say\nAssistant: hi"),), "")),
    ("Human: Grüße, 世界 🌍\n\nAssistant: «", Conversation("", (h("Grüße, 世界 🌍"),), " «")),
]


@pytest.mark.parametrize(("prompt", "expected"), CASES)
def test_parse(prompt: str, expected: Conversation) -> None:
    assert parse(prompt) == expected


def test_a_final_assistant_turn_is_continued_with_the_prefill() -> None:
    conversation = parse("\n\nHuman: A\n\nAssistant: B\n\nAssistant: C")
    assert conversation.turns == (h("A"), a("B"))
    assert conversation.prefill == " C"
    assert conversation.chat_turns() == ((h("A"),), "B\n\nC")
    assert parse("\n\nHuman: A\n\nAssistant: B\n\nAssistant:").chat_turns() == ((h("A"),), "B")


def test_chat_turns_drop_the_space_after_the_assistant_marker() -> None:
    assert parse("\n\nHuman: A\n\nAssistant:  It is").chat_turns() == ((h("A"),), "It is")


# -- properties -----------------------------------------------------------------------

# Text that cannot contain a turn marker (no blank line), may have inner whitespace.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=30).map(
    lambda text: re.sub(r"\n+", "\n", text)
)
STRIPPED = TEXT.map(str.strip)
ROLES = st.lists(st.sampled_from(["Human", "Assistant"]), max_size=8)


def transcript(system: str, markers: list[str], texts: list[str], prefill: str) -> str:
    body = "".join(f"\n\n{marker}: {text}" for marker, text in zip(markers, texts, strict=True))
    return f"{system}\n\nHuman: first{body}\n\nAssistant:{prefill}"


@given(system=TEXT, markers=ROLES, data=st.data(), prefill=TEXT)
def test_any_valid_prompt_parses_into_alternating_stripped_turns(
    system: str, markers: list[str], data: st.DataObject, prefill: str
) -> None:
    texts = [data.draw(TEXT) for _ in markers]
    conversation = parse(transcript(system, markers, texts, prefill))
    roles = [turn.role for turn in conversation.turns]
    assert roles[0] == "human"
    assert all(first != second for first, second in itertools.pairwise(roles))
    for text in (conversation.system, *(turn.text for turn in conversation.turns)):
        assert text == text.strip()
    assert conversation.prefill == prefill.rstrip()


SYSTEM = STRIPPED.filter(lambda text: not text.startswith("Human:"))  # `sanitise` makes that a turn


@given(system=SYSTEM, texts=st.lists(STRIPPED.filter(bool), min_size=1, max_size=8), prefill=TEXT)
def test_an_alternating_conversation_round_trips(system: str, texts: list[str], prefill: str) -> None:
    turns = tuple(Turn("human" if i % 2 == 0 else "assistant", text) for i, text in enumerate(texts))
    if turns[-1].role == "assistant":
        turns += (h("last"),)
    prefill = prefill.rstrip()
    body = "".join(f"\n\n{'Human' if t.role == 'human' else 'Assistant'}: {t.text}" for t in turns)
    assert parse(f"{system}{body}\n\nAssistant:{prefill}") == Conversation(system, turns, prefill)


@given(markers=ROLES, data=st.data())
def test_same_role_runs_merge_in_order(markers: list[str], data: st.DataObject) -> None:
    texts = [data.draw(STRIPPED.filter(bool)) for _ in markers]
    conversation = parse(transcript("", markers, texts, ""))
    merged = "\n\n".join(turn.text for turn in conversation.turns)
    assert merged == "\n\n".join(["first", *texts])
