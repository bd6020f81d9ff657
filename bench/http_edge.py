"""What tcserve's HTTP protocol (api/server.py `EdgeProtocol`: JSON 400s with a request
id, pipelining kept, HTTP/1.0 streams, the header deadline) costs against uvicorn's own
httptools and h11 protocols, on the fake engine so that only the HTTP layer differs.

Each protocol serves the same app in a subprocess of its own; the rounds alternate
between them so that a busy machine slows them alike; the table gives the median
requests/s over the rounds and the ratio to uvicorn's httptools protocol.

    python bench/http_edge.py --seconds 5 --rounds 3 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import free_port

PROTOCOLS = {
    "tcserve EdgeProtocol": "from tcserve.api.server import edge_protocol; http = edge_protocol(10.0)",
    "uvicorn httptools": "http = 'httptools'",
    "uvicorn h11": "http = 'h11'",
}
SERVER = """
import uvicorn
from tcserve.api.app import create_app
from tcserve.config import FakeModel, Settings
{choice}
app = create_app(Settings(), [FakeModel(name="fake", engine="fake", reply=" one two three four")])
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning", access_log=False, http=http)
"""
BODY = {"model": "fake", "prompt": "\n\nHuman: Hi\n\nAssistant:", "max_tokens_to_sample": 4}
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "unused"}


async def load(url: str, seconds: float, clients: int) -> float:
    """Requests/s of `clients` keep-alive clients sending non-streaming completions."""
    done = 0
    stop_at = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            response = await http.post(f"{url}/v1/complete", json=BODY, headers=HEADERS)
            response.raise_for_status()
            done += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return done / (time.monotonic() - started)


def start(name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    code = SERVER.format(choice=PROTOCOLS[name], port=port)
    process = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{name} did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="load per round and protocol (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the protocols (default 3)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients (default 16)")
    args = parser.parse_args()
    servers = {name: start(name) for name in PROTOCOLS}
    rates: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    try:
        for _ in range(args.rounds):
            for name, (_, url) in servers.items():
                asyncio.run(load(url, 1.0, args.clients))  # warm the connections
                rates[name].append(asyncio.run(load(url, args.seconds, args.clients)))
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)
    base = statistics.median(rates["uvicorn httptools"])
    print(f"{'protocol':<22} {'req/s (median)':>15} {'rounds':>24} {'ratio':>7}")
    for name, values in rates.items():
        median = statistics.median(values)
        shown = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:<22} {median:>15.0f} {shown:>24} {median / base:>6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
