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
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = create_app(settings(api_keys=(KEY,)), [LlamaCppModel(name="gemma-3-270m", context_size=2048)])
    with serve_app(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key=KEY, max_retries=0)


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
    stranger = anthropic.Anthropic(base_url=base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        greedy(stranger)
    assert denied.value.request_id is not None


def test_health_answers_while_a_long_completion_runs(client: anthropic.Anthropic, base_url: str) -> None:
    started = threading.Event()
    outcome: list[str] = []

    def long_completion() -> None:
        stream = greedy(client, prompt=f"{anthropic.HUMAN_PROMPT} Count to 500.{anthropic.AI_PROMPT}",
                        max_tokens_to_sample=400, stop_sequences=["@@@"], stream=True)  # fmt: skip
        for event in stream:
            started.set()
            if event.stop_reason:
                outcome.append(event.stop_reason)

    worker = threading.Thread(target=long_completion)
    worker.start()
    assert started.wait(60)
    health = httpx.get(f"{base_url}/health", timeout=5)  # would time out if llama.cpp held the loop
    running_while_answered = worker.is_alive()
    worker.join(120)
    assert health.status_code == 200
    assert running_while_answered and outcome


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
