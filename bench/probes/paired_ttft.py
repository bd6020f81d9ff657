"""Long-prompt TTFT of tcserve and llama-server measured side by side: both servers
run at once (each idle while the other works), and every prompt goes to one and
then the other, the order alternating, so that the machine's drift over minutes,
which `bench/run.py` meets one server after the other, hits both alike. Prints each
pair and the median of the paired ratios.

    .venv/bin/python bench/probes/paired_ttft.py [--pairs 10] [--tokens 1900]

Both run the benchmark's settings (threads 2, 16 slots x 2048 tokens); the prompts
are the benchmark's long ones (`texts.long_prompt`), numbered apart from its own.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import texts
from load import stream_request
from peers import default_gguf, free_port, running, server_spec
from report import TokenCounter
from settings import DEFAULTS

SERVERS = ("tcserve", "llama-server")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=DEFAULTS.long_prompt_tokens, help="prompt tokens, BOS included")
    args = parser.parse_args()
    cfg = dataclasses.replace(DEFAULTS, gguf=default_gguf())
    counter = TokenCounter(cfg.gguf)
    async with AsyncExitStack() as stack:
        servers = {}
        for name in SERVERS:
            port = free_port()
            spec = server_spec(name, cfg, port, tc_help="--parallel")
            servers[name] = await stack.enter_async_context(running(spec, port, cfg.startup_timeout, "paired"))
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=600, trust_env=False))
        seconds: dict[str, list[float]] = {name: [] for name in SERVERS}
        for pair in range(args.pairs):
            prompt = texts.long_prompt(10_000 + pair, args.tokens, counter.count)
            for name in SERVERS if pair % 2 == 0 else reversed(SERVERS):
                server = servers[name]
                sample = await stream_request(client, server.base_url, server.spec.api, prompt, 4)
                if sample.error or sample.ttft is None:
                    sys.exit(f"{name}: {sample.error or 'no text'}")
                seconds[name].append(sample.ttft)
            print(f"pair {pair + 1}: " + ", ".join(f"{n} {seconds[n][-1] * 1000:.0f} ms" for n in SERVERS), flush=True)
    ratios = [a / b for a, b in zip(*seconds.values(), strict=True)]
    medians = ", ".join(f"{n} {statistics.median(seconds[n]) * 1000:.0f} ms" for n in SERVERS)
    print(f"TTFT median: {medians}; tcserve / llama-server paired: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
