"""The embedded llama.cpp engine on the real Gemma 3 270M model, below the HTTP edge:
batching, prefix reuse, determinism, cancellation, admission and context limits.

Nothing here asserts on time: cancellation and "a long prompt does not stall
running streams" are shown by what the engine did (its counters, the order of
events), never by how long it took.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tcserve.config import LlamaCppModel
from tcserve.core.request import EngineEvent, Finished, GenerationRequest, SamplingParams, TextDelta
from tcserve.core.transcript import HUMAN_TURN
from tcserve.engines.factory import build_engine
from tcserve.engines.llamacpp.engine import PREFILL_CHUNK, LlamaCppEngine, default_model_path
from tcserve.engines.llamacpp.native import ContextParams, Model
from tcserve.engines.llamacpp.sampling import Sampler
from tcserve.engines.llamacpp.scheduler import BURST_BUDGET, Job, Outcome, Scheduler
from tcserve.errors import EngineFailure, EngineNotReady, Overloaded

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]


def llamacpp_engine(**config: Any) -> LlamaCppEngine:
    """The engine as the server builds it from a model's config (with its defaults)."""
    engine = build_engine(LlamaCppModel(name="gemma", **config))
    assert isinstance(engine, LlamaCppEngine)
    return engine


SYSTEM = "You are a helpful assistant who answers questions about geography in plain words. " * 24
"""Long enough for several whole prefill chunks."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    engine = llamacpp_engine(context_size=1024, threads=2, parallel=4, max_queue=2)
    await engine.start()
    yield engine
    await engine.aclose()


def request(prompt: str, max_tokens: int = 30, **sampling: Any) -> GenerationRequest:
    return GenerationRequest("req_test", prompt, max_tokens, SamplingParams(**{"temperature": 0.0, **sampling}))


async def run(engine: LlamaCppEngine, req: GenerationRequest) -> list[EngineEvent]:
    return [event async for event in await engine.generate(req)]


def text_of(events: list[EngineEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def settled(engine: LlamaCppEngine) -> None:
    """Wait until the scheduler has processed every cancellation (it does so at its next step)."""
    for _ in range(3000):
        stats = engine.stats()
        if stats.running == 0 and stats.waiting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine still busy: {engine.stats()}")


async def test_counts_tokens_with_bos(engine: LlamaCppEngine) -> None:
    assert (await engine.tokenize(request(""))).count == 1
    tokens = await engine.tokenize(request("\n\nHuman: Hello\n\nAssistant:"))
    assert tokens.count is not None and tokens.count > 4
    assert tokens.ids is not None and len(tokens.ids) == tokens.count  # handed to generate: no second tokenize


async def test_max_tokens_ends_the_generation(engine: LlamaCppEngine) -> None:
    *deltas, finished = await run(engine, request("\n\nHuman: Tell me a long story.\n\nAssistant:", 7))
    assert isinstance(finished, Finished)
    assert finished.reason == "max_tokens"
    assert all(isinstance(d, TextDelta) for d in deltas)
    assert sum(d.tokens for d in deltas if isinstance(d, TextDelta)) == 7  # one delta per token


async def test_multibyte_characters_arrive_whole(engine: LlamaCppEngine) -> None:
    events = await run(engine, request("\n\nHuman: 用中文写一首诗。\n\nAssistant: 春天", 40))
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert any(ord(ch) > 0x2E80 for ch in "".join(texts))  # it did write CJK characters
    assert all("\ufffd" not in text for text in texts)


async def test_sampling_runs_and_respects_top_k_1(engine: LlamaCppEngine) -> None:
    prompt = "\n\nHuman: Name a colour.\n\nAssistant:"
    sampled = text_of(await run(engine, request(prompt, 12, temperature=1.0, top_p=0.9)))
    assert sampled
    # top_k=1 is greedy whatever the temperature.
    assert text_of(await run(engine, request(prompt, 12, temperature=1.0, top_k=1))) == text_of(
        await run(engine, request(prompt, 12))
    )


async def test_greedy_is_deterministic_with_prefix_reuse(engine: LlamaCppEngine) -> None:
    prompt = f"{SYSTEM}\n\nHuman: What is the capital of Italy?\n\nAssistant:"
    assert (await engine.tokenize(request(prompt))).count > 2 * PREFILL_CHUNK
    reused_before = engine.scheduler_stats.reused_tokens  # type: ignore[attr-defined]
    texts = [text_of(await run(engine, request(prompt, 24))) for _ in range(3)]
    assert engine.scheduler_stats.reused_tokens - reused_before >= 2 * 2 * PREFILL_CHUNK  # type: ignore[attr-defined]
    assert texts[0] == texts[1] == texts[2]
    # And the same text as an engine that never reuses anything.
    fresh = llamacpp_engine(context_size=1024, threads=2, parallel=1, prefix_cache=False)
    await fresh.start()
    try:
        assert text_of(await run(fresh, request(prompt, 24))) == texts[0]
        assert fresh.scheduler_stats.reused_tokens == 0  # type: ignore[attr-defined]
    finally:
        await fresh.aclose()


async def test_a_conversation_reuses_its_earlier_turns(engine: LlamaCppEngine) -> None:
    prompt = f"{SYSTEM}\n\nHuman: Where is Paris?\n\nAssistant:"
    answer = text_of(await run(engine, request(prompt, 16)))
    before = engine.scheduler_stats.reused_tokens  # type: ignore[attr-defined]
    turn_2 = f"{prompt}{answer}\n\nHuman: And Rome?\n\nAssistant:"
    assert text_of(await run(engine, request(turn_2, 8)))
    reused = engine.scheduler_stats.reused_tokens - before  # type: ignore[attr-defined]
    assert reused >= ((await engine.tokenize(request(prompt))).count) // PREFILL_CHUNK * PREFILL_CHUNK - PREFILL_CHUNK


async def test_reuse_generated_reuses_the_earlier_answer_too() -> None:
    """With --reuse-generated, turn 2 computes only what is new: the earlier answer's
    tokens come from the cache (the default keeps only whole prompt chunks)."""
    engine = llamacpp_engine(context_size=1024, threads=2, parallel=1, reuse_generated=True)
    await engine.start()
    try:
        prompt = "\n\nHuman: Where is Paris?\n\nAssistant:"
        answer = text_of(await run(engine, request(prompt, 16)))
        before = engine.scheduler_stats.reused_tokens  # type: ignore[attr-defined]
        follow_up = "\n\nHuman: And Rome?\n\nAssistant:"
        assert text_of(await run(engine, request(f"{prompt}{answer}{follow_up}", 8)))
        reused = engine.scheduler_stats.reused_tokens - before  # type: ignore[attr-defined]
        # Everything but the follow-up came from the cache, less the answer's last sampled token (never
        # decoded) and a token merged across the seam; with whole chunks only, a prompt this short (less
        # than one chunk) would reuse nothing.
        assert reused >= (await engine.tokenize(request(f"{prompt}{answer}"))).count - 2
    finally:
        await engine.aclose()


async def test_concurrent_requests_share_the_batch(engine: LlamaCppEngine) -> None:
    questions = ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna"]  # more than the 4 slots
    prompts = [f"\n\nHuman: Tell me about {city}.\n\nAssistant:" for city in questions]
    results = await asyncio.gather(*(run(engine, request(p, 16)) for p in prompts))
    for events in results:
        finished = events[-1]
        assert isinstance(finished, Finished) and len(events) >= 2
        assert text_of(events).strip()  # content, not bytes: batching may change greedy results


async def test_a_long_prompt_does_not_stall_running_streams(engine: LlamaCppEngine) -> None:
    order: list[str] = []

    async def consume(name: str, req: GenerationRequest, first_only: bool = False) -> None:
        async with aclosing(await engine.generate(req)) as events:  # type: ignore[type-var]
            async for _event in events:
                order.append(name)
                if first_only:
                    return

    runner = asyncio.create_task(consume("running", request("\n\nHuman: Count to 200.\n\nAssistant:", 200)))
    while "running" not in order:
        await asyncio.sleep(0.01)
    long_prompt = f"{SYSTEM}{SYSTEM}\n\nHuman: Summarise.\n\nAssistant:"
    chunks = -(-((await engine.tokenize(request(long_prompt))).count) // PREFILL_CHUNK)
    assert chunks >= 4
    await consume("newcomer", request(long_prompt, 1), first_only=True)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    start = order.index("running")
    during_prefill = order[start : order.index("newcomer")].count("running")
    # One prompt chunk per step (the budget, 240, holds one; one newcomer does not outnumber one stream):
    # the running stream got a token in (nearly) every step of the prefill.
    assert during_prefill >= chunks - 1
    await settled(engine)


async def test_a_burst_of_newcomers_is_prefilled_in_one_step() -> None:
    """Prompts that arrive together on an idle engine are computed in one step, though
    they hold more than one budget (up to BURST_BUDGET budgets): every first token
    comes in the step's hand-off."""
    budget = PREFILL_CHUNK
    model = Model(default_model_path(), ContextParams(slots=8, slot_context=512, batch_tokens=8 + budget, threads=2))
    handoffs: list[tuple[int, list[Job]]] = []  # (steps done when handed off, the jobs)
    finished = threading.Event()
    topics = ("rivers", "volcanoes", "the history of chess", "bees", "glaciers", "the Silk Road")
    ask = "\n\nHuman: Write a long, detailed essay about {}. Use many paragraphs and explain everything.\n\nAssistant:"
    jobs = [Job(request(ask.format(t), 3), Sampler(SamplingParams(temperature=0.0)), None) for t in topics]

    ended: set[int] = set()

    def deliver(outbox: list[tuple[Job, Outcome]]) -> None:  # on the scheduler's thread
        handoffs.append((scheduler.stats.steps, [job for job, _ in outbox]))
        ended.update(id(job) for job, event in outbox if isinstance(event, Finished))
        if len(ended) == len(jobs):
            finished.set()

    scheduler = Scheduler(model, deliver, slots=8, chunk=PREFILL_CHUNK, prefill_budget=budget)
    for job in jobs:  # all queued before the scheduler runs: one burst
        scheduler.submit(job)
    thread = threading.Thread(target=scheduler.run)
    thread.start()
    try:
        assert await asyncio.to_thread(finished.wait, 120)
    finally:
        scheduler.stop()
        thread.join()
        model.close()

    assert budget < sum(len(job.prompt) for job in jobs) <= BURST_BUDGET * budget  # the case shown
    first = [next(steps for steps, batch in handoffs if job in batch) for job in jobs]
    assert first == [1] * len(jobs)  # handed off once the first step was done


async def test_closing_a_stream_frees_its_slot(engine: LlamaCppEngine) -> None:
    streams = [await engine.generate(request("\n\nHuman: Count to 1000.\n\nAssistant:", 900)) for _ in range(3)]
    for stream in streams:
        await anext(stream)
    assert engine.stats().running == 3
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined]
    await settled(engine)
    assert engine.stats().running == 0


async def test_a_dropped_stream_is_cancelled_too(engine: LlamaCppEngine) -> None:
    stream = await engine.generate(request("\n\nHuman: Count to 1000.\n\nAssistant:", 900))
    await anext(stream)
    del stream  # never closed: the engine must notice all the same
    await settled(engine)


async def test_a_full_queue_is_overloaded(engine: LlamaCppEngine) -> None:
    long = request("\n\nHuman: Count to 1000.\n\nAssistant:", 900)
    held = [await engine.generate(long) for _ in range(4 + 2)]  # 4 slots + 2 queued
    try:
        with pytest.raises(Overloaded) as caught:
            await engine.generate(long)
        assert caught.value.retry_after > 0
    finally:
        for stream in held:
            await stream.aclose()  # type: ignore[attr-defined]
    await settled(engine)
    assert text_of(await run(engine, request("\n\nHuman: Hi\n\nAssistant:", 3)))  # admitted again


async def test_a_sequence_past_its_context_fails_alone() -> None:
    # The API never lets this through (prompt + max_tokens is checked first); the engine
    # must still end that one request cleanly, never abort the process or the batch.
    small = llamacpp_engine(context_size=256, threads=2, parallel=3)
    await small.start()
    try:
        too_long = request("\n\nHuman: hi\n\nAssistant:" + " word" * 300, 5)
        overrun = request("\n\nHuman: Count to 2000.\n\nAssistant:", 400)
        bystander = request("\n\nHuman: Say hi.\n\nAssistant:", 5)
        results = await asyncio.gather(
            run(small, too_long), run(small, overrun), run(small, bystander), return_exceptions=True
        )
        assert isinstance(results[0], EngineFailure) and isinstance(results[1], EngineFailure)
        assert isinstance(results[2], list) and isinstance(results[2][-1], Finished)
        await settled(small)
        assert text_of(await run(small, request("\n\nHuman: Hi\n\nAssistant:", 3)))  # still serving
    finally:
        await small.aclose()


async def test_not_ready_before_start() -> None:
    engine = llamacpp_engine(context_size=256, threads=1)
    with pytest.raises(EngineNotReady):
        await engine.tokenize(request("x"))
    with pytest.raises(EngineNotReady):
        await engine.generate(request("x"))
    await engine.aclose()


async def test_a_file_that_is_not_gguf_fails_to_load(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a model" * 100)
    engine = llamacpp_engine(path=bogus, context_size=256, threads=1)
    with pytest.raises(EngineFailure, match="could not load"):
        await engine.start()
    await engine.aclose()


async def test_a_recomputed_answer_is_reused_by_the_next_turn_with_the_same_text() -> None:
    """An idle engine recomputes a finished answer as prompt pieces, up to where the
    next turn starts, so the next turn reuses all of it and still gets exactly the
    text an engine that reuses nothing computes. (Without speculation: each engine
    times its own batch costs at load, so two engines may draft differently.)"""
    engine = llamacpp_engine(context_size=1024, threads=2, parallel=1, speculative=False)
    await engine.start()
    try:
        prompt = f"{SYSTEM}\n\nHuman: Describe the rivers of Europe.\n\nAssistant:"
        # What the API would return: the text before the built-in stop sequence.
        answer = text_of(await run(engine, request(prompt, 2 * PREFILL_CHUNK))).split(HUMAN_TURN)[0]
        turn = engine._require_model().vocab.tokenize(prompt + answer)
        slot = engine._require_scheduler()._slots[0]
        stats = engine.scheduler_stats
        assert stats is not None
        for _ in range(3000):  # the scheduler starts after IDLE_BEFORE_RECOMPUTE; a piece takes ~0.1-1 s
            if not slot.recompute:  # done
                break
            await asyncio.sleep(0.01)
        assert not slot.recompute and stats.recomputed_tokens > 0
        turn_2 = f"{prompt}{answer}{HUMAN_TURN} And the longest one?\n\nAssistant:"
        reused = stats.reused_tokens
        text = text_of(await run(engine, request(turn_2, 16)))
        # The whole answer came from the cache (and the start of the marker it wrote: loose rows).
        assert stats.reused_tokens - reused >= len(turn)
    finally:
        await engine.aclose()
    fresh = llamacpp_engine(context_size=1024, threads=2, parallel=1, prefix_cache=False, speculative=False)
    await fresh.start()
    try:
        assert text_of(await run(fresh, request(turn_2, 16))) == text
    finally:
        await fresh.aclose()


async def test_a_prefix_far_behind_the_end_of_a_cached_sequence_is_computed_again() -> None:
    """Gemma's sliding-window layers keep only their last 768 cells of a sequence, so a
    prefix that ends more than a window before the cached end cannot be reused: the
    prompt is computed again, and its text is the text of an engine that reuses nothing."""
    engine = llamacpp_engine(context_size=2048, threads=2, parallel=1)
    await engine.start()
    try:
        long_prompt = f"{SYSTEM}{SYSTEM}{SYSTEM}\n\nHuman: Go on.\n\nAssistant:"
        assert (await engine.tokenize(request(long_prompt))).count > 768 + 128  # more than the window layers hold
        await run(engine, request(long_prompt, 2))
        stats = engine.scheduler_stats
        assert stats is not None
        short = f"{SYSTEM}\n\nHuman: What is the capital of Spain?\n\nAssistant:"
        reused = stats.reused_tokens
        text = text_of(await run(engine, request(short, 24)))
        assert stats.reused_tokens == reused  # the shared chunks lie more than a window behind
        again = text_of(await run(engine, request(short, 24)))  # right behind the end now: reused
        assert stats.reused_tokens - reused >= 2 * PREFILL_CHUNK
    finally:
        await engine.aclose()
    fresh = llamacpp_engine(context_size=2048, threads=2, parallel=1, prefix_cache=False)
    await fresh.start()
    try:
        assert text_of(await run(fresh, request(short, 24))) == text == again
    finally:
        await fresh.aclose()


async def test_the_calibration_runs_on_the_thread_that_decodes_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """ggml's OpenMP threads belong to the thread that calls llama_decode: a calibration
    on another thread left every later step about 20% slower."""
    threads: dict[str, threading.Thread] = {}
    calibrate, decode = Scheduler.calibrate, Model.decode

    def calibrating(scheduler: Scheduler, *args: Any) -> None:
        threads["calibration"] = threading.current_thread()
        calibrate(scheduler, *args)

    def decoding(model: Model) -> int:
        threads.setdefault("step", threading.current_thread())
        return decode(model)

    monkeypatch.setattr(Scheduler, "calibrate", calibrating)
    engine = llamacpp_engine(context_size=256, threads=2, parallel=1)
    await engine.start()
    try:
        monkeypatch.setattr(Model, "decode", decoding)
        assert text_of(await run(engine, request("Hello", max_tokens=2)))
    finally:
        await engine.aclose()
    assert threads["calibration"] is threads["step"] is not threading.main_thread()


async def test_a_load_whose_calibration_fails_closes_its_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(scheduler: Scheduler, *args: Any) -> None:
        raise EngineFailure("llama_decode returned -3 while timing a 1-row batch")

    closed: list[Model] = []
    close = Model.close
    monkeypatch.setattr(Scheduler, "calibrate", failing)
    monkeypatch.setattr(Model, "close", lambda model: (closed.append(model), close(model))[1])
    engine = llamacpp_engine(context_size=256, threads=2, parallel=1)
    with pytest.raises(EngineFailure, match="while timing"):
        await engine.start()
    assert len(closed) == 1 and not engine.ready
