"""The load generator: prompts, one streaming client for both APIs (Anthropic
`/v1/complete` and OpenAI `/v1/completions`), and the workloads (closed loop on
free-text, grounded and long prompts, open-loop Poisson arrivals, 5-turn
conversations) run against one server. The grounded and long texts are in texts.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

import texts
from machine import NoiseMeter
from peers import RunningServer
from settings import Settings

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
NEVER_STOP = "@@@@"  # a stop sequence the model never writes (tcserve's own "\n\nHuman:" still applies)

# ----------------------------------------------------------------------------
# Prompts: deterministic, identical for every server and round, and unique per
# request so no server gets a whole-prompt cache hit in the load levels.
# ----------------------------------------------------------------------------

TOPICS = (
    "the history of the printing press",
    "how bridges are designed",
    "the water cycle",
    "the life of honey bees",
    "the invention of the telephone",
    "volcanoes and plate tectonics",
    "the economics of coffee farming",
    "how computers store numbers",
    "the Roman road network",
    "the migration of birds",
    "the chemistry of bread baking",
    "the history of chess",
    "how vaccines train the immune system",
    "the architecture of Gothic cathedrals",
    "the causes of the French Revolution",
    "how airplanes fly",
    "the life cycle of stars",
    "the history of the bicycle",
    "how rivers shape valleys",
    "the Silk Road",
    "the development of writing systems",
    "how solar panels work",
    "the deep ocean",
    "the history of maps",
    "the rise of railways",
    "how the human heart works",
    "the culture of tea in Japan",
    "the story of the Moon landing",
    "the life of octopuses",
    "the history of medicine",
    "how glaciers form",
    "the invention of paper",
    "the physics of sound",
    "the history of the Olympic games",
    "how cities grow",
    "the science of weather forecasting",
    "the ancient library of Alexandria",
    "how forests recover from fire",
    "the history of photography",
    "the game of football",
)
STYLES = (
    "Write a long, detailed essay about {t}. Use many paragraphs and explain everything in depth.",
    "Write a very long article about {t}, with an introduction, several sections and a conclusion.",
    "Explain {t} to a curious student in a long and thorough lesson with many examples.",
    "Tell me everything you know about {t}. Be detailed and write at least ten paragraphs.",
)


WARMUP_PROMPT = f"{HUMAN} Hello!{ASSISTANT}"


def load_prompts(count: int, offset: int) -> list[str]:
    """`count` transcripts starting at global index `offset`; index i always gives the
    same prompt, and different indexes give different prompts."""
    out = []
    for i in range(offset, offset + count):
        topic, rest = TOPICS[i % len(TOPICS)], i // len(TOPICS)
        text = STYLES[rest % len(STYLES)].format(t=topic)
        if rest >= len(STYLES):
            text += f" This is request number {i}."
        out.append(f"{HUMAN} {text}{ASSISTANT}")
    return out


SYSTEM_PROMPT = (
    "You are a patient, knowledgeable assistant who works for a small public library in a "
    "coastal town. Visitors ask you about books, local history, the sea, fishing, boats, "
    "weather and the natural world, and sometimes about practical matters such as opening "
    "hours, membership cards, printing, or how to find a book on the shelves. Always answer "
    "politely and clearly. Give concrete details when you know them, and say so plainly when "
    "you do not know something instead of inventing an answer. Prefer short paragraphs. When "
    "a visitor asks for a recommendation, suggest two or three books and say in one sentence "
    "why each might suit them. When a visitor asks about local history, mention the old "
    "lighthouse, the harbour wall built in the nineteenth century, the fish market, the "
    "shipyard that closed decades ago, and the storm that flooded the lower streets. When a "
    "visitor asks about the sea, talk about tides, currents, seabirds, seals, and the rock "
    "pools on the northern beach, and remind them to check the tide tables before walking "
    "on the sands. The library opens at nine in the morning and closes at six in the evening "
    "on weekdays, and closes at one in the afternoon on Saturdays; it is closed on Sundays. "
    "Membership is free for residents and costs a small fee for visitors, and a card lets a "
    "member borrow up to ten books for three weeks. Printing costs ten pence a page in black "
    "and white and fifty pence in colour. The children's corner has story time on Wednesday "
    "afternoons, and the reading group meets on the first Thursday of every month to discuss "
    "a novel chosen by its members. The local history room holds old photographs, parish "
    "records, newspapers going back more than a century, and charts of the coastline that "
    "fishermen once used. Visitors may look at these records but must not take them out of "
    "the room, and they must use pencils, not pens, when taking notes. If a question is "
    "about something outside the library, answer it as well as you can and suggest where the "
    "visitor might learn more."
)
QUESTIONS = (
    "Can you tell me about the history of the old lighthouse?",
    "What books would you recommend for someone who loves the sea?",
    "How do the tides work, and when is it safe to walk on the sands?",
    "What can I find in the local history room?",
    "Please summarise everything we have talked about so far.",
)


def conversation_system(index: int) -> str:
    """A distinct opening per conversation, so conversation k cannot reuse conversation k-1."""
    return f"Conversation {index + 1}. {SYSTEM_PROMPT}"


# ----------------------------------------------------------------------------
# Streaming clients
# ----------------------------------------------------------------------------


@dataclass
class Sample:
    """One streamed request, as the client saw it (times from time.perf_counter)."""

    start: float
    end: float = 0.0
    deltas: list[tuple[float, str]] = field(default_factory=list)
    error: str | None = None
    finish: str | None = None
    reported_tokens: int | None = None  # what the server says, when it says it
    turn: int = 0
    prompt: str = ""

    @property
    def text(self) -> str:
        return "".join(d for _, d in self.deltas)

    @property
    def ttft(self) -> float | None:
        return self.deltas[0][0] - self.start if self.deltas else None


def anthropic_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "prompt": prompt,
        "max_tokens_to_sample": max_tokens,
        "temperature": 0,
        "stream": True,
        "stop_sequences": [NEVER_STOP],
    }


def openai_body(prompt: str, max_tokens: int, model: str | None = None) -> dict[str, Any]:
    # repeat_penalty 1.0: llama-cpp-python's default is 1.1, which is not plain greedy
    # (llama-server's default is already 1.0; tcserve has no penalties). The llama.cpp
    # servers ignore `model`; vLLM checks it against its served name.
    return {
        **({"model": model} if model else {}),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
        "stream": True,
        "stop": [HUMAN],
    }


def _anthropic_event(sample: Sample, event: str, data: dict[str, Any], now: float) -> None:
    if event == "completion":
        if data.get("completion"):
            sample.deltas.append((now, data["completion"]))
        sample.finish = data.get("stop_reason") or sample.finish
    elif event == "error":
        sample.error = f"SSE error: {data.get('error', data)}"


def _openai_chunk(sample: Sample, data: dict[str, Any], now: float) -> None:
    if "error" in data:
        sample.error = f"SSE error: {data['error']}"
        return
    choices = data.get("choices") or [{}]
    if choices[0].get("text"):
        sample.deltas.append((now, choices[0]["text"]))
    sample.finish = choices[0].get("finish_reason") or sample.finish
    usage, timings = data.get("usage") or {}, data.get("timings") or {}
    reported = usage.get("completion_tokens") or timings.get("predicted_n")
    if reported:
        sample.reported_tokens = int(reported)


async def stream_request(
    client: httpx.AsyncClient,
    base_url: str,
    api: str,
    prompt: str,
    max_tokens: int,
    turn: int = 0,
    model: str | None = None,
) -> Sample:
    """Send one streaming completion; never raises (errors land in the sample)."""
    if api == "anthropic":
        url, body = base_url + "/v1/complete", anthropic_body(prompt, max_tokens)
        headers = {"anthropic-version": "2023-06-01"}
    else:
        url, body, headers = base_url + "/v1/completions", openai_body(prompt, max_tokens, model), {}
    sample = Sample(start=time.perf_counter(), turn=turn, prompt=prompt)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:300]
                sample.error = f"HTTP {response.status_code}: {text}"
                return sample
            await _read_sse(response, api, sample)
    except Exception as exc:  # every failure is a counted error
        sample.error = f"{type(exc).__name__}: {exc}"
    finally:
        sample.end = time.perf_counter()
    return sample


async def _read_sse(response: httpx.Response, api: str, sample: Sample) -> None:
    event = "message"
    async for line in response.aiter_lines():
        now = time.perf_counter()
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("error:"):
            sample.error = "SSE " + line
        elif line.startswith("data:"):
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            with contextlib.suppress(json.JSONDecodeError):
                data = json.loads(payload)
                if api == "anthropic":
                    _anthropic_event(sample, event, data, now)
                else:
                    _openai_chunk(sample, data, now)
        elif not line:
            event = "message"


def make_client(cfg: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(cfg.request_timeout, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


# ----------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------


@dataclass
class ModeRun:
    """One workload mode on one server in one round."""

    server: str
    mode: str
    round: int
    wall_s: float
    samples: list[Sample]
    peak_rss_mib: float | None  # VmHWM when the mode finished (cumulative since start)
    other_cpu_pct: float | None  # CPU used by other processes during the mode, % of all cores


Send = Callable[[str, int, int], Awaitable[Sample]]


async def closed_loop(send: Send, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[float, list[Sample]]:
    """`concurrency` workers, each sending the next prompt as soon as its last one ends."""
    pending, samples = list(prompts), []

    async def worker() -> None:
        while pending:
            samples.append(await send(pending.pop(0), max_tokens, 0))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, samples


def arrival_times(rate: float, duration: float, seed: int) -> list[float]:
    """Poisson arrivals (exponential gaps) in [0, duration); the same for every server."""
    rng, t = random.Random(seed), 0.0
    out: list[float] = []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


async def open_loop(
    send: Send, prompts: list[str], arrivals: list[float], max_tokens: int
) -> tuple[float, list[Sample]]:
    """Send prompt i at arrivals[i] whatever the server is doing; wait for all to end."""
    t0 = time.perf_counter()

    async def fire(at: float, prompt: str) -> Sample:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        return await send(prompt, max_tokens, 0)

    samples = await asyncio.gather(*(fire(a, p) for a, p in zip(arrivals, prompts, strict=True)))
    return time.perf_counter() - t0, list(samples)


async def conversation(send: Send, index: int, max_tokens: int, pause: float = 0.0) -> list[Sample]:
    """5 turns; turn k's prompt is turn k-1's prompt + its completion + a new question,
    sent `pause` seconds after the answer (a person reading it; 0: an agent's loop)."""
    prompt, samples = conversation_system(index), []
    for turn, question in enumerate(QUESTIONS, start=1):
        if turn > 1 and pause > 0:
            await asyncio.sleep(pause)
        prompt += f"{HUMAN} {question}{ASSISTANT}"
        sample = await send(prompt, max_tokens, turn)
        samples.append(sample)
        prompt += sample.text
    return samples


def level_label(concurrency: int) -> str:
    return f"c={concurrency}"


def grounded_label(concurrency: int) -> str:
    return f"grounded c={concurrency}"


def long_label(concurrency: int) -> str:
    return f"long c={concurrency}"


def rate_label(cfg: Settings) -> str:
    return f"rate {cfg.rate:g}/s"


CONV_LABEL = "conv turn 5"
"""The conversation row, `conv_pause` between turns; `read_label` is the other one."""


def read_label(cfg: Settings) -> str:
    return f"{CONV_LABEL} +{cfg.conv_read_pause:g}s"


def is_conversation(mode: str) -> bool:
    return mode.startswith(CONV_LABEL)


Workload = Callable[[], Awaitable[tuple[float, list[Sample]]]]


async def measured(server: RunningServer, round_no: int, mode: str, workload: Workload) -> ModeRun:
    meter = NoiseMeter(server.proc.pid)
    wall, samples = await workload()
    run = ModeRun(server.spec.name, mode, round_no, wall, samples, server.peak_rss(), meter.other_cpu_pct())
    print(
        f"    {mode:>12}: {len(samples)} requests in {wall:.1f} s "
        f"(other processes used {run.other_cpu_pct:.0f}% of the CPU)",
        flush=True,
    )
    return run


def closed_loop_prompts(cfg: Settings, count_tokens: Callable[[str], int]) -> dict[str, list[str]]:
    """The prompts of every closed-loop and open-loop mode, built once per run so every
    server and round gets the very same ones; indexes never repeat within a kind."""
    out: dict[str, list[str]] = {}
    offset = 0
    for c in cfg.levels:
        out[level_label(c)] = load_prompts(cfg.requests_for(c), offset)
        offset += cfg.requests_for(c)
    if cfg.rate > 0:
        out[rate_label(cfg)] = load_prompts(len(arrival_times(cfg.rate, cfg.duration, cfg.seed)), offset)
    offset = 0
    for c in cfg.grounded_levels:
        count = cfg.requests or cfg.grounded_requests_per_worker * c
        out[grounded_label(c)] = texts.grounded_prompts(count, offset)
        offset += count
    offset, target = 0, cfg.long_prompt_budget()
    for c in cfg.long_levels if "long" in cfg.workloads else []:
        out[long_label(c)] = texts.long_prompts(cfg.requests_for(c), offset, target, count_tokens)
        offset += cfg.requests_for(c)
    return out


async def run_server_modes(
    server: RunningServer, cfg: Settings, round_no: int, modes: list[str], prompts: dict[str, list[str]]
) -> list[ModeRun]:
    """Drive one running server through the requested modes, in all_modes' order."""
    runs: list[ModeRun] = []
    async with make_client(cfg) as client:

        async def send(prompt: str, max_tokens: int, turn: int) -> Sample:
            return await stream_request(client, server.base_url, server.spec.api, prompt, max_tokens, turn)

        async def conversations(pause: float) -> tuple[float, list[Sample]]:
            t0, samples = time.perf_counter(), []
            for i in range(cfg.conversations):
                samples += await conversation(send, i, cfg.conv_max_tokens, pause)
            return time.perf_counter() - t0, samples

        if cfg.warmup:
            await send(WARMUP_PROMPT, 8, 0)
        for mode in [m for m in all_modes(cfg) if m in modes]:
            workload: Workload
            if mode == CONV_LABEL:
                workload = functools.partial(conversations, cfg.conv_pause)
            elif mode == read_label(cfg):
                workload = functools.partial(conversations, cfg.conv_read_pause)
            elif mode == rate_label(cfg):
                arrivals = arrival_times(cfg.rate, cfg.duration, cfg.seed)
                workload = functools.partial(open_loop, send, prompts[mode], arrivals, cfg.max_tokens)
            else:
                concurrency = int(mode.rsplit("=", 1)[1])
                max_tokens = cfg.long_max_tokens if mode.startswith("long") else cfg.max_tokens
                workload = functools.partial(closed_loop, send, prompts[mode], concurrency, max_tokens)
            runs.append(await measured(server, round_no, mode, workload))
    return runs


def all_modes(cfg: Settings) -> list[str]:
    """Every mode of the run, in the order each server runs them: long prompts last,
    so their memory does not count in the other rows' peak RSS."""
    modes = [level_label(c) for c in cfg.levels] if "text" in cfg.workloads else []
    if cfg.rate > 0 and "rate" in cfg.workloads:
        modes.append(rate_label(cfg))
    if cfg.conversations > 0 and "conv" in cfg.workloads:
        modes.append(CONV_LABEL)
        if cfg.conv_read_pause > 0:
            modes.append(read_label(cfg))
    if "grounded" in cfg.workloads:
        modes += [grounded_label(c) for c in cfg.grounded_levels]
    if "long" in cfg.workloads:
        modes += [long_label(c) for c in cfg.long_levels]
    return modes
