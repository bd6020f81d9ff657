"""The Human/Assistant transcript: sanitise, validate, render.

Anthropic's rules (docs/wire.md, "Prompt rules"): trailing whitespace is removed, a
prompt that begins with `Human:` gets `\\n\\n` put in front, then the first
turn must be `\\n\\nHuman:` (text before it is a system prompt) and the last
turn must be `\\n\\nAssistant:` (text after it is a prefill the model
continues). A marker after a single newline is not a turn.
"""

from __future__ import annotations

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
