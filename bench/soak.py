"""Load and soak: many clients, mixed streaming and not, random stop sequences,
some abandoned mid-way; then check that nothing was lost or mixed up.

Every request must end as exactly one of: a complete, well-formed completion;
an SSE `error` event; a 529/429 with `retry-after`; or abandoned by its client
on purpose. Afterwards /metrics must show 0 running sequences, and the server's
resident memory must be within 10% of its level after warm-up.

    make soak                                          # 64 clients x 100 requests, embedded model (~25 min)
    .venv/bin/python bench/soak.py --clients 8 --requests 10

`make test` runs a small version (tests/test_soak.py) through `run_soak`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from peers import free_port, status_mib

HEADERS = {"anthropic-version": "2023-06-01"}
TOPICS = ["rivers", "bees", "glass", "trains", "salt", "maps", "bread", "clocks", "the moon", "chess"]


@dataclass
class Report:
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def line(self) -> str:
        return f"{self.requests} requests: {dict(self.outcomes)}; problems: {len(self.problems)}"


async def run_soak(base_url: str, clients: int, requests: int, seed: int = 7, max_tokens: int = 24) -> Report:
    report = Report()
    timeout = httpx.Timeout(600, connect=30)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, headers=HEADERS, timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(_client(client, random.Random(seed + i), requests, max_tokens, report)
                               for i in range(clients)))  # fmt: skip
    return report


async def _client(
    client: httpx.AsyncClient, rng: random.Random, requests: int, max_tokens: int, report: Report
) -> None:
    for _ in range(requests):
        topic = rng.choice(TOPICS)
        marker = f"[{rng.randrange(10**6)}]"  # each request asks for its own marker: mixed-up streams would show
        body = {
            "model": "claude-sonnet-4-5",
            "prompt": f"\n\nHuman: Write about {topic}.\n\nAssistant: {marker}",
            "max_tokens_to_sample": max_tokens,
            "temperature": rng.choice([0, 0.7, 1.0]),
            "stream": rng.random() < 0.5,
            "stop_sequences": rng.sample(["\n\n", ".", " the", "ing", "zz"], k=rng.randrange(0, 3)),
        }
        # Half the requests stream; a fifth of those are abandoned: a tenth of all requests.
        abandon_after = rng.randrange(1, 4) if rng.random() < 0.2 else None
        outcome, problem = await _one(client, body, abandon_after)
        report.outcomes[outcome] += 1
        if problem:
            report.problems.append(problem)


async def _one(client: httpx.AsyncClient, body: dict[str, object], abandon_after: int | None) -> tuple[str, str | None]:
    try:
        async with client.stream("POST", "/v1/complete", json=body) as response:
            if response.status_code in (429, 529):
                ok = "retry-after" in response.headers
                return "refused", None if ok else f"{response.status_code} without retry-after"
            if response.status_code != 200:
                return "bad status", f"status {response.status_code}: {(await response.aread())[:200]!r}"
            if not body["stream"]:
                return _check_whole(json.loads(await response.aread()))
            return await _check_stream(response, abandon_after)
    except httpx.HTTPError as error:
        return "transport error", repr(error)


def _check_whole(data: dict[str, object]) -> tuple[str, str | None]:
    if data.get("type") != "completion" or data.get("stop_reason") not in ("stop_sequence", "max_tokens"):
        return "malformed", f"whole completion: {data}"
    return "complete", None


async def _check_stream(response: httpx.Response, abandon_after: int | None) -> tuple[str, str | None]:
    events, ids, name = 0, set(), ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            if name == "error":
                return "error event", None
            if name != "completion":
                continue
            events += 1
            ids.add(data["id"])
            if len(ids) > 1:
                return "mixed up", f"one stream carried ids {ids}"
            if data["stop_reason"] is not None:
                return "complete", None
            if abandon_after is not None and events >= abandon_after:
                return "abandoned", None  # leaving the `async with` closes the connection
    return "truncated", "the stream ended without a final event or an error event"


async def running_sequences(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("tcserve_running_sequences{"))


def resident_mib(pid: int) -> float:
    return status_mib(pid, "VmRSS") or 0.0


async def _main(args: argparse.Namespace) -> int:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tcserve", "serve", "--port", str(port), "--parallel", "16",
                               "--ctx-size", "1024", "--max-queue", "32"], stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for _ in range(600):
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            await run_soak(url, clients=16, requests=2)  # warm-up
            warm = resident_mib(server.pid)
            started = time.monotonic()
            report = await run_soak(url, args.clients, args.requests, args.seed)
            elapsed = time.monotonic() - started
            await asyncio.sleep(1)
            running, after = await running_sequences(client), resident_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"{args.clients} clients x {args.requests} requests in {elapsed:.0f} s: {report.line()}")
    print(f"running sequences after the run: {running:.0f}; RSS after warm-up {warm:.0f} MiB, after {after:.0f} MiB "
          f"({(after - warm) / warm * 100:+.1f}%)")  # fmt: skip
    for problem in report.problems[:10]:
        print("  problem:", problem)
    return 0 if not report.problems and running == 0 and after <= warm * 1.1 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--requests", type=int, default=100, help="requests per client (default 100)")
    parser.add_argument("--seed", type=int, default=7, help="seed of every random choice (default 7)")
    raise SystemExit(asyncio.run(_main(parser.parse_args())))
