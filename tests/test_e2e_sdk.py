"""The real thing: the server on the embedded Gemma model, driven by the official SDKs.

Python `anthropic==0.125.0` (sync, async, streaming, errors) and, under node,
`@anthropic-ai/sdk@0.137.0` (tests/node/sdk_check.mjs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from support import serve_app, settings
from tcserve.api.app import create_app
from tcserve.config import LlamaCppModel

pytestmark = pytest.mark.model

KEY = "sk-e2e-test-key"
PROMPT = f"{anthropic.HUMAN_PROMPT} What is the capital of France?{anthropic.AI_PROMPT}"
NODE_DIR = Path(__file__).parent / "node"
COUNTING = f"{anthropic.HUMAN_PROMPT} List the numbers from 1 to 1000, one per line.{anthropic.AI_PROMPT} 1\n2\n3\n"
"""A prefill that greedy Gemma continues for hundreds of tokens without a new Human turn."""


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = create_app(settings(api_keys=(KEY,)), [LlamaCppModel(name="gemma-3-270m", context_size=2048)])
    with serve_app(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=base_url, api_key=KEY, max_retries=0) as client:
        yield client


def greedy(client: anthropic.Anthropic, **overrides: object) -> anthropic.types.Completion:
    params: dict[str, object] = {
        "model": "claude-sonnet-4-5",
        "prompt": PROMPT,
        "max_tokens_to_sample": 40,
        "temperature": 0,
        **overrides,
    }
    return client.completions.create(**params)  # type: ignore[no-any-return, call-overload]


def test_create(client: anthropic.Anthropic) -> None:
    completion = greedy(client)
    assert completion.type == "completion"
    assert completion.model == "claude-sonnet-4-5"
    assert completion.id.startswith("compl_01")
    assert "Paris" in completion.completion
    assert completion.stop_reason == "stop_sequence"
    assert completion.stop == "\n\nHuman:"  # this model goes on to write the next Human turn
    assert "Human:" not in completion.completion


def test_greedy_is_repeatable(client: anthropic.Anthropic) -> None:
    assert greedy(client).completion == greedy(client).completion


def test_stream_concatenates_to_the_whole_greedy_result(client: anthropic.Anthropic) -> None:
    whole = greedy(client, max_tokens_to_sample=60)
    events = list(greedy(client, max_tokens_to_sample=60, stream=True))
    assert len(events) > 2
    assert all(event.stop_reason is None for event in events[:-1])
    assert events[-1].stop_reason == whole.stop_reason and events[-1].stop == whole.stop
    assert "".join(event.completion for event in events) == whole.completion


def test_user_stop_sequence(client: anthropic.Anthropic) -> None:
    whole = greedy(client).completion
    assert "Paris" in whole
    stopped = greedy(client, stop_sequences=["Paris"])
    assert stopped.stop == "Paris" and stopped.stop_reason == "stop_sequence"
    assert stopped.completion == whole[: whole.index("Paris")]
    streamed = "".join(e.completion for e in greedy(client, stop_sequences=["Paris"], stream=True))
    assert streamed == stopped.completion


def test_max_tokens(client: anthropic.Anthropic) -> None:
    completion = greedy(client, max_tokens_to_sample=2)
    assert completion.stop_reason == "max_tokens" and completion.stop is None
    assert 0 < len(completion.completion) < len(greedy(client).completion)


def test_sampling_gives_text(client: anthropic.Anthropic) -> None:
    completion = greedy(client, temperature=0.9, top_p=0.9, top_k=40, max_tokens_to_sample=20)
    assert completion.stop_reason in ("stop_sequence", "max_tokens")
    assert completion.completion.strip()


async def test_async_client(base_url: str) -> None:
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key=KEY, max_retries=0) as client:
        completion = await client.completions.create(
            model="claude-haiku-4-5", prompt=PROMPT, max_tokens_to_sample=40, temperature=0
        )
        stream = await client.completions.create(
            model="claude-haiku-4-5", prompt=PROMPT, max_tokens_to_sample=40, temperature=0, stream=True
        )
        streamed = "".join([event.completion async for event in stream])
    assert "Paris" in completion.completion
    assert streamed == completion.completion


def test_not_found_error_carries_the_request_id(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        greedy(client, model="claude-x")
    assert caught.value.status_code == 404
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model: claude-x"},
        "request_id": caught.value.request_id,
    }
    assert str(caught.value.request_id).startswith("req_01")


def test_bad_request_and_auth_errors(client: anthropic.Anthropic, base_url: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        greedy(client, prompt="Hello, world")
    assert "must start with" in bad.value.message
    with pytest.raises(anthropic.BadRequestError) as too_long:
        greedy(client, max_tokens_to_sample=5000)
    assert "max_tokens_to_sample > 2048 context" in too_long.value.message
    with (
        anthropic.Anthropic(base_url=base_url, api_key="sk-wrong", max_retries=0) as stranger,
        pytest.raises(anthropic.AuthenticationError) as denied,
    ):
        greedy(stranger)
    assert denied.value.request_id is not None


def test_health_answers_while_a_long_completion_runs(client: anthropic.Anthropic, base_url: str) -> None:
    streaming = threading.Event()
    checked = threading.Event()
    received: list[str] = []

    def long_completion() -> None:
        stream = greedy(client, prompt=COUNTING, max_tokens_to_sample=400, stream=True)
        with stream:
            for event in stream:
                received.append(event.completion)
                streaming.set()
                if checked.wait(0):
                    break  # the generation is still going: hang up

    worker = threading.Thread(target=long_completion)
    worker.start()
    try:
        assert streaming.wait(120)
        health = httpx.get(f"{base_url}/health", timeout=10)  # would time out if llama.cpp held the loop
        generation_still_running = worker.is_alive()
    finally:
        checked.set()
        worker.join(120)
    assert health.status_code == 200
    assert generation_still_running and received


@pytest.mark.node
def test_typescript_sdk(base_url: str) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules").is_dir():
        pytest.fail("node and tests/node/node_modules are needed: run `make test`, which installs them")
    env = {**os.environ, "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": KEY}
    done = subprocess.run([node, "sdk_check.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["create"]["type"] == "completion" and result["create"]["completion"].strip()
    assert result["create"]["model"] == "claude-sonnet-4-5"
    assert result["stream"]["text"] == result["create"]["completion"]  # greedy: same text either way
    assert result["stream"]["stop_reason"] == result["create"]["stop_reason"]
    assert result["not_found"] == {
        "status": 404,
        "type": "not_found_error",
        "request_id": result["not_found"]["request_id"],
        "is_not_found_error": True,
    }
    assert result["not_found"]["request_id"].startswith("req_01")


@pytest.fixture(scope="module")
def one_slot() -> Iterator[tuple[str, Any]]:
    """One sequence slot and a queue of one, to make waiting and overload easy to reach."""
    model = LlamaCppModel(name="gemma-3-270m", context_size=1024, parallel=1, max_queue=1)
    app = create_app(settings(ping_interval=0.05), [model])
    with serve_app(app) as url:
        yield url, app.state.tcserve.engines.by_name["gemma-3-270m"]


def _stream(stack: ExitStack, url: str, **overrides: object) -> Iterator[str]:
    body = {"model": "claude-opus-4-6", "prompt": PROMPT, "max_tokens_to_sample": 5, "stream": True, **overrides}
    response = stack.enter_context(
        httpx.stream("POST", f"{url}/v1/complete", headers={"anthropic-version": "2023-06-01"}, json=body)
    )
    return response.iter_lines()


def _hold(stack: ExitStack, url: str) -> None:
    """A long streaming request that holds the slot until `stack` closes."""
    lines = _stream(stack, url, prompt=COUNTING, max_tokens_to_sample=900)
    while not next(lines).startswith("event: completion"):
        pass  # pings while the prompt is processed
    stack.callback(lines.close)


def _idle(engine: Any) -> None:
    for _ in range(3000):
        if engine.stats().running == 0 and engine.stats().waiting == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"engine still busy: {engine.stats()}")


def test_overload_is_an_sdk_overloaded_error_with_retry_after(one_slot: tuple[str, Any]) -> None:
    url, engine = one_slot
    with ExitStack() as outer:
        with ExitStack() as holder:
            _hold(holder, url)
            waiting = _stream(outer, url)  # takes the one place in the queue
            assert next(waiting) == "event: ping"
            client = outer.enter_context(anthropic.Anthropic(base_url=url, api_key="none", max_retries=0))
            with pytest.raises(anthropic.OverloadedError) as caught:
                greedy(client)
            assert caught.value.response.headers["retry-after"] == "1"
        # The slot is free: the queued stream, which only got pings so far, now completes.
        names = [line[7:] for line in waiting if line.startswith("event: ")]
        assert "completion" not in names[: names.index("completion")]
        assert names[-1] == "completion"
    _idle(engine)


def test_a_client_that_hangs_up_frees_its_slot(one_slot: tuple[str, Any]) -> None:
    url, engine = one_slot
    with ExitStack() as holder:
        _hold(holder, url)
        assert engine.stats().running == 1
    _idle(engine)
    with anthropic.Anthropic(base_url=url, api_key="none", max_retries=0) as client:
        assert greedy(client).completion


def test_a_hundred_abandoned_streams_leave_no_slot_busy(one_slot: tuple[str, Any]) -> None:
    url, engine = one_slot
    for _ in range(100):
        with ExitStack() as stack:
            lines = _stream(stack, url, prompt=COUNTING, max_tokens_to_sample=200)
            assert next(lines).startswith("event: ")  # it started (a ping or the first text); then hang up
    _idle(engine)
    assert engine.stats().running == 0 and engine.stats().waiting == 0
    with anthropic.Anthropic(base_url=url, api_key="none", max_retries=0) as client:
        assert greedy(client).completion  # still serving


@pytest.mark.parametrize("model", ["claude-2.1", "claude-instant-1.2"])
def test_text_completions_era_ids_are_served_by_the_default_model(client: anthropic.Anthropic, model: str) -> None:
    completion = greedy(client, model=model, max_tokens_to_sample=8)
    assert completion.model == model
    assert completion.completion and completion.stop_reason in ("stop_sequence", "max_tokens")
    with client.completions.create(model=model, prompt=PROMPT, max_tokens_to_sample=8, temperature=0,
                                   stream=True) as stream:  # fmt: skip
        events = list(stream)
    assert {event.model for event in events} == {model}
    assert "".join(event.completion for event in events) == completion.completion  # greedy: the same text


QUOTE = (
    f"{anthropic.HUMAN_PROMPT} Copy the following paragraph word for word:\n\nThe committee met on Tuesday to review"
    " the budget for the new library. After a long discussion, the members agreed to fund the children's section,"
    f" the reading room and the archive.{anthropic.AI_PROMPT} Here is the paragraph:\n\n"
)


def speculation_counts(base_url: str) -> tuple[float, float]:
    """(drafted, accepted) tokens from /metrics."""
    values = {}
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        name, _, value = line.partition("{")[0], None, line.rpartition(" ")[2]
        if name in ("tcserve_speculative_drafted_tokens_total", "tcserve_speculative_accepted_tokens_total"):
            values[name] = float(value)
    return values["tcserve_speculative_drafted_tokens_total"], values["tcserve_speculative_accepted_tokens_total"]


def test_a_quoting_answer_is_speculated_and_streams_its_whole_text(client: anthropic.Anthropic, base_url: str) -> None:
    drafted, accepted = speculation_counts(base_url)
    whole = greedy(client, prompt=QUOTE, max_tokens_to_sample=48)
    assert "reading room" in whole.completion  # the model quotes, so the drafts from the prompt are right
    streamed = "".join(e.completion for e in greedy(client, prompt=QUOTE, max_tokens_to_sample=48, stream=True))
    assert streamed == whole.completion
    drafted_after, accepted_after = speculation_counts(base_url)
    assert accepted_after - accepted > 20
    assert drafted_after - drafted >= accepted_after - accepted
