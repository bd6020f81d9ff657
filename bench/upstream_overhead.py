"""What tcserve adds in front of an OpenAI-compatible engine, measured side by side.

One upstream (llama.cpp's C++ `llama-server`, the same one bench/run.py builds),
one tcserve in front of it (`engine = "upstream"`). The same greedy streaming
requests go to the upstream directly (`/v1/completions`) and through tcserve
(`/v1/complete`), alternating, at concurrency 1 and 4. The table gives output
tokens/s (re-tokenised with the model's tokenizer), time to first token and
inter-token latency for both, and their ratios. Both servers share this
machine's cores, so tcserve's own CPU use is part of what is measured.

    .venv/bin/python bench/upstream_overhead.py [--requests 8] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load
import machine
import peers
import report
from report import fmt
from settings import DEFAULTS, RESULTS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8, help="requests per mode and path (default 8)")
    d = DEFAULTS  # the same defaults as run.py's, where the flag means the same
    parser.add_argument(
        "--max-tokens", type=int, default=d.max_tokens, help=f"tokens per request (default {d.max_tokens})"
    )
    parser.add_argument("--levels", default="1,4", help="concurrency levels (default 1,4)")
    parser.add_argument("--threads", type=int, default=d.threads, help=f"llama-server threads (default {d.threads})")
    parser.add_argument("--ctx-size", type=int, default=d.ctx_size, help=f"context per slot (default {d.ctx_size})")
    parser.add_argument("--parallel", type=int, default=4, help="llama-server slots (default 4)")
    parser.add_argument("--llama-server-bin", default=d.llama_server_bin, help="llama-server binary")
    return parser.parse_args()


async def measure(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    gguf = peers.default_gguf()
    upstream_port, tcserve_port = peers.free_port(), peers.free_port()
    argv = peers.llama_server_argv(
        args.llama_server_bin, gguf, args.threads, args.ctx_size, args.parallel, upstream_port
    )
    upstream = peers.ServerSpec("llama-server", argv, "/health", "openai")
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "tcserve.toml"
        # stop_limit = 0: llama-server drops a matched stop without naming it, so
        # tcserve finds "\n\nHuman:" itself (and closes the upstream stream there).
        config.write_text(
            "[[models]]\nname = 'claude-sonnet-4-5'\nengine = 'upstream'\n"
            f"urls = ['http://127.0.0.1:{upstream_port}']\nupstream_model = 'gemma'\n"
            f"context_size = {args.ctx_size}\nstop_limit = 0\nhealth_interval = 1\n"
        )
        tcserve = peers.ServerSpec(
            "tcserve",
            [sys.executable, "-m", "tcserve", "serve", "--config", str(config), "--port", str(tcserve_port)],
            "/health",
            "anthropic",
        )
        tag = report.utc_stamp()
        async with (
            peers.running(upstream, upstream_port, 180, f"{tag}-overhead") as up,
            peers.running(tcserve, tcserve_port, 180, f"{tag}-overhead") as front,
            httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), trust_env=False) as client,
        ):
            counter = report.TokenCounter(gguf)
            prompts = load.load_prompts(args.requests * 2, 0)
            rows: dict[str, Any] = {}
            for level in [int(x) for x in args.levels.split(",")]:
                for path, server in (("direct", up), ("via tcserve", front), ("direct", up), ("via tcserve", front)):
                    api = server.spec.api

                    async def send(prompt: str, max_tokens: int, turn: int, base: str = server.base_url,
                                   kind: str = api) -> load.Sample:  # fmt: skip
                        return await load.stream_request(client, base, kind, prompt, max_tokens, turn)

                    wall, samples = await load.closed_loop(send, prompts[: args.requests], level, args.max_tokens)
                    rows.setdefault(f"{path} c={level}", []).append((wall, samples))
            table, data = render(rows, counter)
    header = (
        f"upstream: llama-server `{shlex.join(upstream.argv[:1])}` -t {args.threads} -np {args.parallel}, "
        f"{args.requests} requests x {args.max_tokens} tokens per mode, greedy, two alternating rounds"
    )
    environment = {"cpu": machine.cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                   "tcserve_commit": machine.command_output(["git", "rev-parse", "--short", "HEAD"]),
                   "llama_server_version": machine.command_output([args.llama_server_bin, "--version"])}  # fmt: skip
    return {"settings": vars(args), "rows": data, "environment": environment}, header + "\n\n" + table


def render(rows: dict[str, Any], counter: report.TokenCounter) -> tuple[str, dict[str, Any]]:
    data: dict[str, Any] = {}
    for name, runs in rows.items():
        samples = [s for _, ss in runs for s in ss]
        ok = [s for s in samples if s.error is None]
        tokens = sum(counter.count(s.text) for s in ok)
        wall = sum(w for w, _ in runs)
        ttfts = [s.ttft for s in ok if s.ttft is not None]
        itls = [g for s in ok for g in report.itl_samples(s, counter)]
        data[name] = {
            "requests": len(samples), "errors": len(samples) - len(ok), "tok_s": tokens / wall if wall else None,
            "ttft_p50_ms": _ms(report.pct(ttfts, 50)), "ttft_p99_ms": _ms(report.pct(ttfts, 99)),
            "itl_p50_ms": _ms(report.pct(itls, 50)), "itl_p99_ms": _ms(report.pct(itls, 99)),
        }  # fmt: skip
    lines = ["| path | requests | errors | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in data.items():
        cells = [row["requests"], row["errors"], fmt(row["tok_s"]), fmt(row["ttft_p50_ms"]), fmt(row["ttft_p99_ms"]),
                 fmt(row["itl_p50_ms"]), fmt(row["itl_p99_ms"])]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| level | tok/s via tcserve / direct | TTFT p50 via tcserve - direct (ms) |", "|---|---|---|"]
    for name in data:
        if name.startswith("direct "):
            level = name.removeprefix("direct ")
            direct, front = data[name], data[f"via tcserve {level}"]
            tok = front["tok_s"] / direct["tok_s"] if direct["tok_s"] and front["tok_s"] else None
            ttft = front["ttft_p50_ms"] - direct["ttft_p50_ms"] if None not in (
                front["ttft_p50_ms"], direct["ttft_p50_ms"]) else None  # fmt: skip
            lines.append(f"| {level} | {fmt(tok, 2)}x | {fmt(ttft)} |")
    return "\n".join(lines), data


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def main() -> int:
    args = parse_args()
    if not Path(args.llama_server_bin).exists():
        print(f"no llama-server at {args.llama_server_bin}: run bench/build_llama_server.sh first", file=sys.stderr)
        return 2
    data, table = asyncio.run(measure(args))
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stamp = report.utc_stamp()
    (RESULTS / f"{stamp}-upstream-overhead.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{stamp}-upstream-overhead.md").write_text(f"# tcserve in front of an upstream {stamp}\n\n{table}\n")
    print(f"\nwrote bench/results/{stamp}-upstream-overhead.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
