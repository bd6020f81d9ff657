"""The Human/Assistant transcript: sanitise, validate, parse into a conversation.

Anthropic's rules (docs/wire.md, "Prompt rules"): trailing whitespace is removed, a
prompt that begins with `Human:` gets `\\n\\n` put in front, then the first
turn must be `\\n\\nHuman:` (text before it is a system prompt) and the last
turn must be `\\n\\nAssistant:` (text after it is a prefill the model
continues). A marker after a single newline is not a turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tcserve.errors import PromptError

HUMAN_TURN = "\n\nHuman:"
ASSISTANT_TURN = "\n\nAssistant:"

BAD_START = 'prompt must start with "\n\nHuman:" turn after an optional system prompt'
BAD_END = 'prompt must end with "\n\nAssistant:" turn'


def sanitise(prompt: str) -> str:
    prompt = prompt.rstrip()
    if prompt.startswith("Human:"):
        prompt = "\n\n" + prompt
    return prompt


def validate(prompt: str) -> None:
    """Raise `PromptError` with Anthropic's own message if the transcript is malformed."""
    first_human = prompt.find(HUMAN_TURN)
    first_assistant = prompt.find(ASSISTANT_TURN)
    if first_human < 0 or (0 <= first_assistant < first_human):
        raise PromptError(BAD_START)
    if prompt.rfind(ASSISTANT_TURN) < prompt.rfind(HUMAN_TURN):
        raise PromptError(BAD_END)


def prepare(prompt: str) -> str:
    """The text the model is given: sanitised, and checked against the rules."""
    prompt = sanitise(prompt)
    validate(prompt)
    return prompt


def wrap_bare_prompt(text: str) -> str:
    """Turn a bare question into a one-turn transcript (used by `tcserve complete`)."""
    if HUMAN_TURN in text or text.lstrip().startswith("Human:"):
        return text
    return f"{HUMAN_TURN} {text}{ASSISTANT_TURN}"


Role = Literal["human", "assistant"]

TURN_JOIN = "\n\n"
"""What joins consecutive turns of the same role."""

_MARKER = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    text: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """A validated transcript as the turns a chat model is trained on.

    `system` is the text before the first `\\n\\nHuman:` (may be empty). `turns`
    alternate, starting with a human turn: consecutive turns of the same role are
    merged into one, their texts joined with a blank line, as Anthropic's Messages
    API combines consecutive same-role turns. Each turn's text and the system text
    are stripped of surrounding whitespace: the space after `Human:` and the blank
    lines around markers are the transcript's formatting, not content (Llama 3's
    and Gemma's templates `trim` the text themselves; stripping here makes every
    template see the same text). `prefill` is the text after the last
    `\\n\\nAssistant:`, exactly as sent (a leading space included; trailing
    whitespace is already gone, `sanitise` removed it): the model continues it.

    The last turn can be an assistant turn (`...\\n\\nAssistant: a\\n\\nAssistant: b`):
    `chat_turns` folds it into the text to continue.
    """

    system: str
    turns: tuple[Turn, ...]
    prefill: str

    def chat_turns(self) -> tuple[tuple[Turn, ...], str]:
        """The turns to render, ending with a human turn, and the assistant text the
        model continues. A final assistant turn and the prefill are one assistant
        turn (joined with a blank line, as same-role turns are). The continued text
        loses its leading whitespace: after a chat template's assistant header, the
        space after `Assistant:` is formatting, and a model trained on the template
        never sees it there."""
        prefill = self.prefill.lstrip()
        if self.turns and self.turns[-1].role == "assistant":
            last = self.turns[-1].text
            return self.turns[:-1], _join(last, prefill)
        return self.turns, prefill


def parse_conversation(prompt: str) -> Conversation:
    """Split a prompt that `prepare` accepted (sanitised and validated) into its parts."""
    pieces = _MARKER.split(prompt)  # [system, role, text, role, text, ...]
    system, marked = pieces[0], pieces[1:]
    segments = [(_role(marked[i]), marked[i + 1]) for i in range(0, len(marked), 2)]
    *turn_segments, (_, prefill) = segments  # validation made the last marker Assistant
    turns: list[Turn] = []
    for role, text in turn_segments:
        if turns and turns[-1].role == role:
            turns[-1] = Turn(role, _join(turns[-1].text, text.strip()))
        else:
            turns.append(Turn(role, text.strip()))
    return Conversation(system.strip(), tuple(turns), prefill)


def _join(first: str, second: str) -> str:
    """Two same-role texts as one; an empty one adds nothing (no stray blank line)."""
    return TURN_JOIN.join(text for text in (first, second) if text)


def _role(marker: str) -> Role:
    return "human" if marker == "Human" else "assistant"
