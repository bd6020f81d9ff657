"""Which of llama-server's n-gram speculation modes is best on the grounded workload
at c=1: the evidence behind `--llama-server-spec-args`' default in settings.py.

Why a script of its own: the benchmark compares tcserve with llama-server at its
best, so "best" has to be measured, side by side in one run (a shared 2-core VM's
speed drifts between runs; compare only the ratios of one run). Each mode gets a
fresh llama-server with bench/run.py's command line plus the mode's flags, one
unmeasured warm-up, then the same grounded prompts one at a time; the rounds go
over the modes in turn (reversed every other round). Prints tok/s, TTFT p50, the
share of output tokens that repeat a 3-gram of the text so far (texts.copied_tokens).

Run: .venv/bin/python bench/spec_modes.py [--requests 6 --max-tokens 128 --rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx

import load
import peers
import report
import texts
from settings import DEFAULTS

MODES = (
    "",
    "--spec-type ngram-simple",
    "--spec-type ngram-map-k",
    "--spec-type ngram-mod",
    "--spec-type ngram-mod --spec-ngram-mod-n-min 8 --spec-ngram-mod-n-max 32 --spec-ngram-mod-n-match 8",
    "--spec-type ngram-cache",
)
"""Each mode as extra llama-server flags ("" is no speculation); defaults of llama.cpp
0.3.36's vendored server unless the flags say otherwise."""


async def one_mode(flags: str, args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    port = peers.free_port()
    argv = peers.llama_server_argv(
        args.llama_server_bin, args.gguf, args.threads, DEFAULTS.ctx_size, DEFAULTS.parallel, port
    )
    name = "-".join(f.lstrip("-") for f in shlex.split(flags)) or "none"  # the log file name
    spec = peers.ServerSpec(name, [*argv, *shlex.split(flags)], "/health", "openai")
    async with (
        peers.running(spec, port, 180, f"{report.utc_stamp()}-spec-modes") as server,
        httpx.AsyncClient(timeout=600, trust_env=False) as client,
    ):
        await load.stream_request(client, server.base_url, "openai", load.WARMUP_PROMPT, 8)
        samples = [await load.stream_request(client, server.base_url, "openai", p, args.max_tokens) for p in prompts]
    return {"samples": samples, "wall": sum(s.end - s.start for s in samples)}


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds like Ctrl-C: the server in use is stopped


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=6, help="grounded prompts per mode and round (kinds in turn)")
    p.add_argument("--max-tokens", type=int, default=DEFAULTS.max_tokens)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=DEFAULTS.threads, help="1 is steadier on a busy machine")
    p.add_argument("--llama-server-bin", default=DEFAULTS.llama_server_bin)
    p.add_argument("--model-path", dest="gguf", default=None)
    args = p.parse_args()
    if not Path(args.llama_server_bin).exists():
        sys.exit(f"llama-server not found: {args.llama_server_bin} (make bench builds it: bench/build_llama_server.sh)")
    args.gguf = args.gguf or peers.default_gguf()
    counter = report.TokenCounter(args.gguf)
    prompts = texts.grounded_prompts(args.requests, 0)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for flags in MODES if r % 2 == 0 else reversed(MODES):
            print(f"round {r + 1}: {flags or 'no speculation'}", flush=True)
            results[flags].append(asyncio.run(one_mode(flags, args, prompts)))
    rows = []
    for flags, runs in results.items():
        samples = [s for run in runs for s in run["samples"]]
        tokens = [counter.count(s.text) for s in samples]
        tok_s = statistics.median(sum(counter.count(s.text) for s in run["samples"]) / run["wall"] for run in runs)
        copied = sum(texts.copied_tokens(counter.ids(s.prompt), counter.ids(s.text)) for s in samples)
        ttfts = [s.ttft for s in samples if s.ttft is not None]
        rows.append(
            [
                flags or "(none)",
                f"{tok_s:.1f}",
                report.fmt(report.pct(ttfts, 50), 0, 1000),
                f"{sum(tokens) / len(samples):.1f}",
                f"{copied / max(1, sum(tokens)):.2f}",
                str(sum(1 for s in samples if s.error)),
            ]
        )
    print(report.markdown_table(("llama-server flags", "tok/s", "TTFT p50 ms", "tok/req", "copied", "errors"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
