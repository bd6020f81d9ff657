"""The tiny chat GGUF (tests/gguf_support.py) through the embedded llama.cpp layer:
its template and BOS/EOS are read from the file, a conversation is rendered and
tokenized without a double BOS, `<|im_end|>` is an end-of-generation token, and
the model decodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gguf_support import BOS, CHATML, IM_END, IM_START, write_tiny_chat_gguf
from tcserve.core.transcript import parse_conversation, prepare
from tcserve.engines.llamacpp.chat import load_chat_template
from tcserve.engines.llamacpp.native import ContextParams, Model

PARAMS = ContextParams(slots=1, slot_context=128, batch_tokens=64, threads=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    path = write_tiny_chat_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf")
    loaded = Model(path, PARAMS)
    yield loaded
    loaded.close()


def test_the_template_and_special_tokens_come_from_the_file(model: Model) -> None:
    metadata = model.chat_metadata()
    assert metadata.template == CHATML
    assert (metadata.bos_token, metadata.eos_token) == ("<s>", "</s>")
    assert model.metadata("general.name") == "tcserve-tiny-chat"
    assert model.metadata("no.such.key") is None
    assert model.vocab.is_end(IM_END)
    assert not model.vocab.is_end(IM_START)


def test_a_rendered_conversation_tokenizes_with_its_special_tokens_and_one_bos(model: Model) -> None:
    metadata = model.chat_metadata()
    assert metadata.template is not None
    chat = load_chat_template(metadata.template, bos_token=metadata.bos_token, eos_token=metadata.eos_token)
    rendered = chat.render(parse_conversation(prepare("\n\nHuman: hi\n\nAssistant: the")))
    assert rendered.endswith("<|im_start|>assistant\nthe")
    tokens = model.vocab.tokenize(rendered, add_bos=chat.add_bos(rendered), parse_special=True)
    assert tokens[0] == BOS and tokens.count(BOS) == 1
    assert tokens[1] == IM_START and tokens.count(IM_START) == 3 and tokens.count(IM_END) == 2
    # The default (raw prompts) keeps special-token text as plain text.
    assert IM_START not in model.vocab.tokenize(rendered)
    # A template that writes the BOS text itself gets no second one.
    bos_first = "<s>" + rendered
    assert load_chat_template("{{ bos_token }}x", bos_token="<s>", eos_token="").add_bos(bos_first) is False
    assert model.vocab.tokenize(bos_first, add_bos=False, parse_special=True).count(BOS) == 1


def test_the_model_decodes(model: Model) -> None:
    tokens = model.vocab.tokenize("<|im_start|>user\nhi<|im_end|>\n", parse_special=True)
    model.forget(0)
    generated = []
    position = 0
    for _ in range(4):
        model.batch.clear()
        for index, token in enumerate(tokens):
            model.batch.add(token, position + index, 0, wants_logits=index == len(tokens) - 1)
        assert model.decode() == 0
        logits = model.logits(model.batch.size - 1)
        assert logits.shape == (model.vocab.size,) and np.isfinite(logits).all()
        position += len(tokens)
        tokens = [int(np.argmax(logits))]
        generated.append(tokens[0])
    assert all(0 <= token < model.vocab.size for token in generated)


def test_a_file_without_a_template_has_none(tmp_path: Path) -> None:
    plain = Model(write_tiny_chat_gguf(tmp_path / "plain.gguf", chat_template=None), PARAMS)
    try:
        assert plain.chat_metadata().template is None
    finally:
        plain.close()
