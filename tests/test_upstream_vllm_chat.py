"""tcserve in front of a REAL vLLM (vLLM's CPU build) through `api = "chat"` and
`api = "messages"`, driven with anthropic==0.125.0.

One vLLM serves both APIs (it serves OpenAI's /v1/chat/completions and Anthropic's
/v1/messages side by side); the tiny model of tests/vllm_support.py has a ChatML
template. Its greedy answers are gibberish, but fixed: the stops are picked from
vLLM's own answer, and every expected text is what vLLM itself answers when asked
directly, so each test compares tcserve's completion with the upstream's.

What vLLM does that the code had to learn: its /v1/messages renders the template
with a generation prompt after a final assistant message (it has no
`continue_final_message`), so a prefill there is answered, not continued; tcserve
sends a prefill to the same replica's /v1/chat/completions instead, and counts a
vLLM Messages upstream's prompts with /tokenize as it does a chat upstream's, so
that an overflow is refused before anything is sent. vLLM keeps a stop's text out
of the Messages stream (it names the stop in `stop_sequence`), where its chat
stream keeps it (`include_stop_str_in_output`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from support import serve_app, settings
from tcserve.api.app import create_app
from tcserve.config import UpstreamModel
from vllm_support import MAX_MODEL_LEN, SERVED_NAME, VLLM_PYTHON, VllmServer, build_tiny_model

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON} (see test_upstream_vllm.py)"),
    pytest.mark.timeout(600),  # the first test also builds the model and starts vLLM (30 to 60 s)
]

APIS = ("chat", "messages")
QUESTION = "What is the capital of France?"
PROMPT = f"{anthropic.HUMAN_PROMPT} {QUESTION}{anthropic.AI_PROMPT}"
PREFILL = "The capital"
MAX_TOKENS = 40
ASKED = [{"role": "user", "content": QUESTION}]
"""PROMPT as chat messages: what tcserve must send for it."""
PREFILLED = [*ASKED, {"role": "assistant", "content": PREFILL}]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    scratch = tmp_path_factory.mktemp("vllm-chat")
    server = VllmServer(build_tiny_model(scratch / "tiny-llama"), scratch, extra_args=("--enable-log-requests",))
    try:
        server.start(timeout=300)
        yield server
    finally:
        server.stop()


def _model(vllm: VllmServer, api: str, **overrides: Any) -> UpstreamModel:
    return UpstreamModel.model_validate({
        "name": f"vllm-{api}", "engine": "upstream", "api": api, "urls": [vllm.url],
        "upstream_model": SERVED_NAME, "health_interval": 0.5, "read_timeout": 60, **overrides,
    })  # fmt: skip


@pytest.fixture(scope="module")
def client(vllm: VllmServer) -> Iterator[anthropic.Anthropic]:
    """One tcserve with both models: `vllm-chat` and `vllm-messages`."""
    app = create_app(settings(), [_model(vllm, api) for api in APIS])
    with serve_app(app) as url, anthropic.Anthropic(base_url=url, api_key="none", max_retries=0) as sdk:
        yield sdk


def _chat(vllm: VllmServer, messages: list[dict[str, str]], **extra: Any) -> tuple[str, str]:
    """vLLM's own greedy chat answer: (text, finish_reason)."""
    body = {"model": SERVED_NAME, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    response = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    return str(choice["message"]["content"]), str(choice["finish_reason"])


def _rendered(vllm: VllmServer, messages: list[dict[str, str]], *, continues: bool) -> list[int]:
    """The prompt's token ids as vLLM renders the messages with the template."""
    body = {"model": SERVED_NAME, "messages": messages, "add_generation_prompt": not continues,
            "continue_final_message": continues}  # fmt: skip
    response = httpx.post(f"{vllm.url}/tokenize", json=body, timeout=30)
    response.raise_for_status()
    return [int(token) for token in response.json()["tokens"]]


@pytest.fixture(scope="module")
def answer(vllm: VllmServer) -> str:
    """vLLM's greedy answer to QUESTION; its /v1/messages gives the same one."""
    text, finish = _chat(vllm, ASKED)
    assert finish == "length", text
    body = {"model": SERVED_NAME, "messages": ASKED, "max_tokens": MAX_TOKENS, "temperature": 0}
    message = httpx.post(f"{vllm.url}/v1/messages", json=body, timeout=60).json()
    assert (message["content"][0]["text"], message["stop_reason"]) == (text, "max_tokens")
    return text


@pytest.fixture(scope="module")
def stops(answer: str) -> tuple[str, str]:
    """(STOP, LATER): two words of the answer, each first found at its place, LATER after STOP."""
    words = [(m.start(), m.group()) for m in re.finditer(r" \w+", answer) if answer.index(m.group()) == m.start()]
    first = next((at, word) for at, word in words if at >= 5)
    later = next(word for at, word in words if at > first[0] + len(first[1]))
    return first[1], later


def greedy(client: anthropic.Anthropic, api: str, **overrides: Any) -> Any:
    params = {"model": f"vllm-{api}", "prompt": PROMPT, "max_tokens_to_sample": MAX_TOKENS, "temperature": 0,
              **overrides}  # fmt: skip
    return client.completions.create(**params)


def _sent_to_vllm(vllm: VllmServer, since: int) -> list[tuple[list[str], bool]]:
    return vllm.stops_received(since, "chatcmpl")


@pytest.mark.parametrize("api", APIS)
def test_create_and_stream_agree_with_vllm(client: anthropic.Anthropic, answer: str, api: str) -> None:
    whole = greedy(client, api)
    assert (whole.model, whole.completion, whole.stop_reason, whole.stop) == (f"vllm-{api}", answer, "max_tokens", None)
    events = list(greedy(client, api, stream=True))
    assert "".join(e.completion for e in events) == answer
    assert (events[-1].stop_reason, events[-1].stop) == ("max_tokens", None)
    assert all(e.stop_reason is None for e in events[:-1])


@pytest.mark.parametrize("api", APIS)
def test_a_stop_sequence_vllm_stops_at(
    vllm: VllmServer, client: anthropic.Anthropic, answer: str, stops: tuple[str, str], api: str
) -> None:
    stop, later = stops
    since = vllm.log_size()
    stopped = greedy(client, api, stop_sequences=[later, stop])
    assert (stopped.completion, stopped.stop_reason, stopped.stop) == (answer[: answer.index(stop)], "stop_sequence",
                                                                        stop)  # fmt: skip
    events = list(greedy(client, api, stop_sequences=[later, stop], stream=True))
    assert "".join(e.completion for e in events) == stopped.completion
    assert (events[-1].stop_reason, events[-1].stop) == ("stop_sequence", stop)
    # The chat API keeps the stop text for tcserve's matcher; the Messages API has no such field.
    assert _sent_to_vllm(vllm, since) == [(["\n\nHuman:", later, stop], api == "chat")] * 2


@pytest.mark.parametrize("api", APIS)
def test_stops_beyond_stop_limit_are_enforced_by_tcserve(
    vllm: VllmServer, answer: str, stops: tuple[str, str], api: str
) -> None:
    """stop_limit = 1 sends vLLM only the built-in "\\n\\nHuman:"; the user's stop is tcserve's alone."""
    stop, _ = stops
    app = create_app(settings(), [_model(vllm, api, stop_limit=1)])
    since = vllm.log_size()
    with serve_app(app) as url, anthropic.Anthropic(base_url=url, api_key="none", max_retries=0) as own:
        stopped = greedy(own, api, stop_sequences=[stop])
        events = list(greedy(own, api, stop_sequences=[stop], stream=True))
    assert _sent_to_vllm(vllm, since) == [(["\n\nHuman:"], api == "chat")] * 2
    assert (stopped.completion, stopped.stop_reason, stopped.stop) == (answer[: answer.index(stop)], "stop_sequence",
                                                                        stop)  # fmt: skip
    assert "".join(e.completion for e in events) == stopped.completion
    assert (events[-1].stop_reason, events[-1].stop) == ("stop_sequence", stop)


@pytest.mark.parametrize("api", APIS)
def test_max_tokens(client: anthropic.Anthropic, answer: str, api: str) -> None:
    completion = greedy(client, api, max_tokens_to_sample=3)
    assert (completion.stop_reason, completion.stop) == ("max_tokens", None)
    assert completion.completion and answer.startswith(completion.completion)
    assert len(completion.completion) < len(answer)


@pytest.mark.parametrize("api", APIS)
def test_the_prefill_is_continued(vllm: VllmServer, client: anthropic.Anthropic, api: str) -> None:
    """The completion of `...Assistant: The capital` is vLLM's continuation of the rendered
    prompt that ends in "The capital" (asked as token ids on /v1/completions), not an
    answer in a new assistant turn after it."""
    body = {"model": SERVED_NAME, "prompt": _rendered(vllm, PREFILLED, continues=True), "max_tokens": MAX_TOKENS,
            "temperature": 0}  # fmt: skip
    continued = httpx.post(f"{vllm.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    answered, _ = _chat(vllm, PREFILLED)  # a new turn after the prefill: what tcserve must not give
    assert continued != answered
    whole = greedy(client, api, prompt=f"{PROMPT} {PREFILL}")
    assert (whole.completion, whole.stop_reason) == (continued, "max_tokens")
    events = list(greedy(client, api, prompt=f"{PROMPT} {PREFILL}", stream=True))
    assert "".join(e.completion for e in events) == continued


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", APIS)
def test_context_overflow_is_a_400_counted_on_the_rendered_prompt(
    vllm: VllmServer, client: anthropic.Anthropic, api: str, stream: bool
) -> None:
    """tcserve counts the prompt with vLLM's /tokenize on the messages (the template adds
    tokens the raw transcript does not have) and refuses before anything is sent."""
    for prompt, messages, continues in ((PROMPT, ASKED, False), (f"{PROMPT} {PREFILL}", PREFILLED, True)):
        tokens = len(_rendered(vllm, messages, continues=continues))
        raw = httpx.post(f"{vllm.url}/tokenize", json={"model": SERVED_NAME, "prompt": prompt}, timeout=30).json()
        assert tokens != raw["count"]  # else this test could not tell the two counts apart
        since = vllm.log_size()
        with pytest.raises(anthropic.BadRequestError) as budget:
            greedy(client, api, prompt=prompt, max_tokens_to_sample=MAX_MODEL_LEN - tokens + 1, stream=stream)
        expected = f"{tokens} tokens + {MAX_MODEL_LEN - tokens + 1} max_tokens_to_sample > {MAX_MODEL_LEN} context"
        assert expected in budget.value.message
        assert _sent_to_vllm(vllm, since) == []
    long_question = f"{QUESTION} " + "word " * 300
    long_tokens = len(_rendered(vllm, [{"role": "user", "content": long_question.strip()}], continues=False))
    long_prompt = f"{anthropic.HUMAN_PROMPT} {long_question}{anthropic.AI_PROMPT}"
    with pytest.raises(anthropic.BadRequestError) as long:
        greedy(client, api, prompt=long_prompt, stream=stream)
    assert f"prompt is too long: {long_tokens} tokens + {MAX_TOKENS} max_tokens_to_sample" in long.value.message
