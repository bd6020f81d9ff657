"""The tiny chat GGUF (tests/gguf_support.py) served end to end by the embedded engine,
through the official SDK: `prompt_format = "auto"` picks its chat template, the
context check counts the rendered prompt's tokens (not the transcript's), and its
end-of-turn token ends a completion with `stop_sequence` and `stop: null`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from gguf_support import write_tiny_chat_gguf
from support import serve_app, settings
from tcserve.api.app import create_app
from tcserve.config import LlamaCppModel
from tcserve.core.transcript import parse_conversation, prepare
from tcserve.engines.factory import build_engine
from tcserve.engines.llamacpp.chat import load_chat_template
from tcserve.engines.llamacpp.native import ContextParams, Model
from tcserve.errors import EngineFailure

pytestmark = pytest.mark.model

CONTEXT = 128
PROMPT = "\n\nHuman: the cat sat in a hat\n\nAssistant: a"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_chat_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf", ends_at_once=True)


@pytest.fixture(scope="module")
def base_url(gguf: Path) -> Iterator[str]:
    model = LlamaCppModel(name="tiny", path=gguf, context_size=CONTEXT, parallel=1, threads=1)
    with serve_app(create_app(settings(), [model])) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=base_url, api_key="any", max_retries=0) as sdk:
        yield sdk


def token_counts(gguf: Path) -> tuple[int, int]:
    """(the transcript as raw text, the rendered chat prompt), by llama.cpp's tokenizer."""
    model = Model(gguf, ContextParams(slots=1, slot_context=CONTEXT, batch_tokens=64, threads=1))
    try:
        meta = model.chat_metadata()
        assert meta.template is not None
        chat = load_chat_template(meta.template, bos_token=meta.bos_token, eos_token=meta.eos_token)
        rendered = chat.render(parse_conversation(prepare(PROMPT)))
        chat_ids = model.vocab.tokenize(rendered, add_bos=chat.add_bos(rendered), parse_special=True)
        return len(model.vocab.tokenize(prepare(PROMPT))), len(chat_ids)
    finally:
        model.close()


def test_auto_picks_the_chat_template(base_url: str) -> None:
    health = httpx.get(f"{base_url}/health").json()
    assert health["formats"] == {"tiny": "chat"}


def test_the_end_of_turn_token_ends_with_stop_sequence_and_no_stop(client: anthropic.Anthropic) -> None:
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens_to_sample=8, temperature=0)
    assert (completion.completion, completion.stop_reason, completion.stop) == ("", "stop_sequence", None)
    with client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens_to_sample=8, temperature=0, stream=True
    ) as stream:
        last = list(stream)[-1]
    assert (last.stop_reason, last.stop) == ("stop_sequence", None)


def test_the_context_check_counts_the_rendered_prompt(client: anthropic.Anthropic, gguf: Path) -> None:
    raw, rendered = token_counts(gguf)
    assert rendered > raw  # so a check on the raw text would let the next request through
    room = CONTEXT - rendered
    fits = client.completions.create(model="tiny", prompt=PROMPT, max_tokens_to_sample=room, temperature=0)
    assert fits.stop_reason == "stop_sequence"
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens_to_sample=room + 1, temperature=0)
    assert f"prompt is too long: {rendered} tokens + {room + 1} max_tokens_to_sample > {CONTEXT}" in str(refused.value)


def test_a_raw_prompt_format_feeds_the_transcript(gguf: Path) -> None:
    raw_count, _ = token_counts(gguf)
    model = LlamaCppModel(name="tiny", path=gguf, context_size=CONTEXT, parallel=1, threads=1, prompt_format="raw")
    with serve_app(create_app(settings(), [model])) as url:
        assert httpx.get(f"{url}/health").json()["formats"] == {"tiny": "raw"}
        with (
            anthropic.Anthropic(base_url=url, api_key="any", max_retries=0) as client,
            pytest.raises(anthropic.BadRequestError, match=f"prompt is too long: {raw_count} tokens"),
        ):
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens_to_sample=CONTEXT, temperature=0)


def test_a_template_that_cannot_render_fails_the_load(gguf: Path) -> None:
    broken = "{{ raise_exception('this template renders nothing') }}"
    model = LlamaCppModel(name="tiny", path=gguf, context_size=CONTEXT, parallel=1, threads=1, chat_template=broken)
    engine = build_engine(model)
    with pytest.raises(
        EngineFailure, match=r"tiny: the chat template cannot render a probe conversation.*renders nothing"
    ):
        asyncio.run(engine.start())
    assert not engine.ready


def test_chat_without_a_template_fails_the_load(tmp_path: Path) -> None:
    plain = write_tiny_chat_gguf(tmp_path / "plain.gguf", chat_template=None)
    model = LlamaCppModel(name="plain", path=plain, context_size=CONTEXT, parallel=1, threads=1, prompt_format="chat")
    with pytest.raises(EngineFailure, match=r"no tokenizer\.chat_template"):
        asyncio.run(build_engine(model).start())
    auto = build_engine(model.model_copy(update={"prompt_format": "auto"}))
    asyncio.run(auto.start())  # auto without a template: raw
    assert auto.prompt_format == "raw"
    asyncio.run(auto.aclose())
