"""The embedded llama.cpp engine on the real Gemma 3 270M model, below the HTTP edge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from support import VERSION, serve_app, settings
from tcserve.api.app import create_app
from tcserve.config import LlamaCppModel
from tcserve.engines.llamacpp import LlamaCppEngine
from tcserve.errors import EngineFailure, EngineNotReady
from tcserve.generation import Finished, GenerationRequest, SamplingParams, TextDelta

pytestmark = pytest.mark.model


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    engine = LlamaCppEngine(None, context_size=1024, threads=2)
    await engine.start()
    yield engine
    await engine.aclose()


def request(prompt: str, max_tokens: int = 30, temperature: float = 0.0) -> GenerationRequest:
    return GenerationRequest("req_test", prompt, max_tokens, SamplingParams(temperature=temperature))


async def events_of(engine: LlamaCppEngine, req: GenerationRequest) -> list[TextDelta | Finished]:
    return [event async for event in engine.generate(req)]


@pytest.mark.asyncio(loop_scope="module")
async def test_counts_tokens_with_bos(engine: LlamaCppEngine) -> None:
    assert await engine.count_tokens("") == 1
    assert await engine.count_tokens("\n\nHuman: Hello\n\nAssistant:") > 4


@pytest.mark.asyncio(loop_scope="module")
async def test_max_tokens_ends_the_generation(engine: LlamaCppEngine) -> None:
    *deltas, finished = await events_of(engine, request("\n\nHuman: Tell me a long story.\n\nAssistant:", 7))
    assert isinstance(finished, Finished)
    assert finished.reason == "max_tokens" and finished.completion_tokens == 7
    assert all(isinstance(d, TextDelta) for d in deltas) and deltas


@pytest.mark.asyncio(loop_scope="module")
async def test_multibyte_characters_arrive_whole(engine: LlamaCppEngine) -> None:
    events = await events_of(engine, request("\n\nHuman: 用中文写一首诗。\n\nAssistant: 春天", 40))
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert any(ord(ch) > 0x2E80 for ch in "".join(texts))  # it did write CJK characters
    assert all("\ufffd" not in text for text in texts)


@pytest.mark.asyncio(loop_scope="module")
async def test_closing_a_generation_frees_the_engine(engine: LlamaCppEngine) -> None:
    stream = engine.generate(request("\n\nHuman: Count to 1000.\n\nAssistant:", 900))
    received = [await anext(stream) for _ in range(3)]
    assert engine.busy
    await stream.aclose()  # type: ignore[attr-defined]
    assert not engine.busy  # the worker stopped before aclose returned
    assert all(isinstance(e, TextDelta) for e in received)
    # And the context is usable again at once, with the same greedy result as ever.
    first = await events_of(engine, request("\n\nHuman: Hi\n\nAssistant:", 10))
    again = await events_of(engine, request("\n\nHuman: Hi\n\nAssistant:", 10))
    assert first == again


async def test_not_ready_before_start() -> None:
    engine = LlamaCppEngine(None, context_size=256, threads=1)
    with pytest.raises(EngineNotReady):
        await engine.count_tokens("x")
    await engine.aclose()


async def test_a_file_that_is_not_gguf_fails_to_load(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a model" * 100)
    engine = LlamaCppEngine(bogus, context_size=256, threads=1)
    with pytest.raises(EngineFailure, match="could not load"):
        await engine.start()
    await engine.aclose()


def test_a_model_that_fails_to_load_is_a_500_not_a_hang(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    app = create_app(settings(), [LlamaCppModel(name="broken", path=bogus)])
    with serve_app(app, wait_ready=False) as url:
        for _ in range(500):
            health = httpx.get(f"{url}/health")
            if health.json().get("models") == {"broken": "failed"}:
                break
        assert health.status_code == 503 and health.json()["models"] == {"broken": "failed"}
        response = httpx.post(f"{url}/v1/complete", headers=VERSION,
                              json={"model": "broken", "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 5})  # fmt: skip
    assert response.status_code == 500
    assert response.json()["error"] == {"type": "api_error", "message": "model broken failed to load; see the server log"}
