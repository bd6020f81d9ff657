"""Chat templates (engines/llamacpp/chat.py): tcserve renders real models' templates
exactly as `transformers` does.

The reference renderer runs in the vLLM venv, where `transformers` lives
(tests/scripts/render_chat_templates.py); without that venv those tests are skipped.
The other tests need only jinja2.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tcserve.core.transcript import parse_conversation, prepare
from tcserve.engines.llamacpp.chat import ChatTemplate, load_chat_template
from tcserve.errors import EngineFailure, InvalidRequest
from vllm_support import VLLM_PYTHON

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SCRIPT = Path(__file__).parent / "scripts" / "render_chat_templates.py"

MODELS = {  # template file: (bos_token, eos_token) as the model's GGUF names them
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "Qwen-Qwen2.5-7B-Instruct": ("<|endoftext|>", "<|im_end|>"),
    "google-gemma-3-it": ("<bos>", "<eos>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>"),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>"),
    "google-gemma-2-2b-it": ("<bos>", "<eos>"),
    "tcserve-chatml-blocks": ("<s>", "<|im_end|>"),
}

CONVERSATIONS: list[tuple[str, list[dict[str, str]], str]] = [  # prompt, its messages, the prefill
    ("\n\nHuman: Hello\n\nAssistant:", [{"role": "user", "content": "Hello"}], ""),
    (
        "You are terse.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:",
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2+2?"},
        ],
        "",
    ),
    (
        "\n\nHuman: One.\n\nHuman: Two.\n\nAssistant: A\n\nAssistant: B\n\nHuman: Three?\n\nAssistant:",
        [
            {"role": "user", "content": "One.\n\nTwo."},
            {"role": "assistant", "content": "A\n\nB"},
            {"role": "user", "content": "Three?"},
        ],
        "",
    ),
    (
        "\n\nHuman: Name a colour.\n\nAssistant: The colour is",
        [{"role": "user", "content": "Name a colour."}],
        "The colour is",
    ),
    (
        "Réponds en français.\n\nHuman: Grüße aus 東京 🌸\n\nAssistant: « Bonjour",
        [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Grüße aus 東京 🌸"}],
        "« Bonjour",
    ),
    (
        "\n\nHuman: Count.\n\nAssistant: One,\n\nAssistant: two,",
        [{"role": "user", "content": "Count."}],
        "One,\n\ntwo,",
    ),
]


def template(name: str) -> ChatTemplate:
    bos, eos = MODELS[name]
    return load_chat_template((TEMPLATES / f"{name}.jinja").read_text(), bos_token=bos, eos_token=eos, name=name)


def reference(cases: list[dict[str, Any]]) -> list[dict[str, str | None]]:
    result = subprocess.run(
        [str(VLLM_PYTHON), str(SCRIPT)], input=json.dumps(cases), capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("prompt", "messages", "prefill"), CONVERSATIONS)
def test_a_conversation_becomes_the_templates_messages(
    prompt: str, messages: list[dict[str, str]], prefill: str
) -> None:
    assert template("Qwen-Qwen2.5-7B-Instruct").messages(parse_conversation(prepare(prompt))) == (messages, prefill)


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn() -> None:
    gemma2 = template("google-gemma-2-2b-it")
    assert not gemma2.system_role
    conversation = parse_conversation(prepare("Be brief.\n\nHuman: Hi\n\nAssistant:"))
    assert gemma2.messages(conversation) == ([{"role": "user", "content": "Be brief.\n\nHi"}], "")


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv (with transformers) at {VLLM_PYTHON}")
@pytest.mark.timeout(300)
def test_rendering_equals_transformers() -> None:
    cases, ours = [], []
    for name in MODELS:
        chat = template(name)
        for prompt, _, _ in CONVERSATIONS:
            conversation = parse_conversation(prepare(prompt))
            messages, prefill = chat.messages(conversation)
            bos, eos = MODELS[name]
            cases.append({"template": chat.source, "messages": messages, "bos_token": bos, "eos_token": eos,
                          "prefill": prefill})  # fmt: skip
            ours.append((name, prompt, prefill, chat.render(conversation)))
    for (name, prompt, prefill, rendered), theirs in zip(ours, reference(cases), strict=True):
        assert rendered == f"{theirs['generation']}{prefill}", (name, prompt)
        # The prefill continued the way vLLM's continue_final_message does it, where the
        # template puts an assistant message right after its generation prompt. Mistral's
        # does not: it moves the system text to the last *user* message (and our own
        # test template writes a line after its generation prompt).
        if prefill and not name.startswith(("mistralai", "tcserve")):
            assert rendered == theirs["continued"], (name, prompt)


def test_no_double_bos() -> None:
    llama = template("meta-llama-Llama-3.1-8B-Instruct")
    rendered = llama.render(parse_conversation(prepare("\n\nHuman: Hi\n\nAssistant:")))
    assert rendered.startswith("<|begin_of_text|>")
    assert not llama.add_bos(rendered)
    phi = template("microsoft-Phi-3.5-mini-instruct")  # writes no BOS: the tokenizer adds it
    assert phi.add_bos(phi.render(parse_conversation(prepare("\n\nHuman: Hi\n\nAssistant:"))))


def test_a_template_that_cannot_render_the_probe_fails_at_load() -> None:
    with pytest.raises(EngineFailure, match=r"tiny: the chat template cannot render a probe conversation.*no turns"):
        load_chat_template("{{ raise_exception('no turns') }}", bos_token="", eos_token="", name="tiny")
    with pytest.raises(EngineFailure, match="tiny: the chat template does not compile"):
        load_chat_template("{% for %}", bos_token="", eos_token="", name="tiny")


def test_a_conversation_the_template_rejects_is_the_callers_mistake() -> None:
    strict = load_chat_template(
        "{% if messages | length > 3 %}{{ raise_exception('at most 3 messages') }}{% endif %}ok",
        bos_token="", eos_token="",
    )  # fmt: skip
    long = parse_conversation(
        prepare("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d\n\nHuman: e\n\nAssistant:")
    )
    with pytest.raises(InvalidRequest, match="chat template rejected the prompt: at most 3 messages"):
        strict.render(long)


def test_the_sandbox_holds() -> None:
    with pytest.raises(EngineFailure, match=r"SecurityError|unsafe"):
        load_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", bos_token="", eos_token="")


@pytest.mark.parametrize(
    ("name", "opening"),
    [
        ("google-gemma-3-it", "<end_of_turn>\n<start_of_turn>user\n"),
        ("Qwen-Qwen2.5-7B-Instruct", "<|im_end|>\n<|im_start|>user\n"),
        ("meta-llama-Llama-3.1-8B-Instruct", "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"),
        ("mistralai-Mistral-Nemo-Instruct-2407", "</s>[INST]"),
    ],
)
def test_a_template_shows_what_opens_a_users_turn_after_an_answer(name: str, opening: str) -> None:
    """Where the engine cuts prompt chunks, so that a next turn reuses the answer."""
    assert template(name).turn_opening() == opening
