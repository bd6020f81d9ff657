"""What tcserve adds in front of an OpenAI-compatible engine, measured side by side.

One upstream, one tcserve in front of it (`engine = "upstream"`). The same greedy
streaming requests go to the upstream directly (`/v1/completions`) and through tcserve
(`/v1/complete`), alternating, at each concurrency level. The table gives output
tokens/s (re-tokenised with the model's own tokenizer), time to first token and
inter-token latency for both paths, their ratios, and the targets of issue 12 (through
tcserve: tok/s at least 0.95x, TTFT p50 at most 10 ms more).

Two upstreams:

- `--upstream llama-server` (default): llama.cpp's C++ server, the one bench/run.py
  builds, on the packaged Gemma GGUF, at concurrency 1 and 4. Both servers share this
  machine's cores, so tcserve's own CPU use is part of what is measured.

      .venv/bin/python bench/upstream_overhead.py [--requests 8] [--max-tokens 128]

- `--upstream vllm`: vLLM's OpenAI server, run by the python of a venv that has vLLM
  (`--vllm-python`; default the tests' `.venv-vllm`, vLLM's CPU build), at concurrency
  1, 16 and 64. The model is a Llama of realistic size with random weights, built here
  once (`--model-shape 1b`: TinyLlama-1.1B's layers, 1.0B parameters in bf16, with a
  tokenizer trained here; nothing comes from a hub; tests/vllm_support.py builds it),
  or any Hugging Face model folder (`--model-dir`). On a machine with vLLM's GPU build:

      .venv/bin/python bench/upstream_overhead.py --upstream vllm --vllm-python VENV/bin/python

  The model is built once, under bench/.cache/ (17.5 s and 1.9 GB on a 2-core Xeon). The
  requests are 2 rounds x 2 paths of max(--requests, 2 x level) requests of 128 tokens:
  about 2,000, 8,000 and 33,000 tokens a pass at c=1, 16 and 64. A smoke run on a
  CPU-only machine, on the tests' tiny model and vLLM's CPU build:

      VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/upstream_overhead.py --upstream vllm \\
          --model-shape tiny --levels 1,4 --vllm-args "--dtype float32 --enforce-eager"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))

import load
import machine
import peers
import report
import vllm_support
from report import fmt
from settings import CACHE, DEFAULTS, RESULTS

UPSTREAM_MODEL = "upstream-model"
"""The name vLLM serves its model under (llama-server ignores it)."""
TOK_S_TARGET = 0.95
"""Through tcserve, at least this share of the upstream's own tok/s (issue 12)."""
TTFT_TARGET_MS = 10.0
"""Through tcserve, at most this many ms more TTFT p50 (issue 12)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--upstream", choices=("llama-server", "vllm"), default="llama-server", help="the engine behind tcserve"
    )
    parser.add_argument(
        "--requests", type=int, default=8, help="requests per level, path and round, at least twice the level (8)"
    )
    d = DEFAULTS  # the same defaults as run.py's, where the flag means the same
    parser.add_argument(
        "--max-tokens", type=int, default=d.max_tokens, help=f"tokens per request (default {d.max_tokens})"
    )
    parser.add_argument("--levels", help="concurrency levels (default 1,4 for llama-server, 1,16,64 for vllm)")
    parser.add_argument("--ctx-size", type=int, default=d.ctx_size, help=f"context per request (default {d.ctx_size})")
    parser.add_argument("--out", default=str(RESULTS), help="where the results go (default bench/results)")
    llama = parser.add_argument_group("llama-server upstream")
    llama.add_argument("--threads", type=int, default=d.threads, help=f"llama-server threads (default {d.threads})")
    llama.add_argument("--parallel", type=int, default=4, help="llama-server slots (default 4)")
    llama.add_argument("--llama-server-bin", default=d.llama_server_bin, help="llama-server binary")
    vllm = parser.add_argument_group("vllm upstream")
    vllm.add_argument(
        "--vllm-python", default=str(vllm_support.VLLM_PYTHON), help="a python that has vLLM (default .venv-vllm's)"
    )
    vllm.add_argument("--model-dir", help="a Hugging Face model folder to serve (default: a random model built here)")
    vllm.add_argument(
        "--model-shape",
        choices=sorted(vllm_support.SHAPES),
        default="1b",
        help="the random model's size when --model-dir is not given (default 1b; tiny: the tests' model)",
    )
    vllm.add_argument(
        "--vllm-args",
        default="",
        help='more vLLM flags, e.g. "--dtype float32 --enforce-eager" (one flag: --vllm-args=--enforce-eager)',
    )
    vllm.add_argument("--vllm-timeout", type=float, default=900, help="seconds vLLM may take to start (default 900)")
    args = parser.parse_args()
    if args.levels is None:
        args.levels = "1,4" if args.upstream == "llama-server" else "1,16,64"
    return args


@dataclass
class Upstream:
    """The engine tcserve fronts, with what the table needs to know of it."""

    spec: peers.ServerSpec
    counter: report.Counter
    """Counts output tokens with the upstream model's own tokenizer."""
    model: str | None
    """The name to ask the upstream for (None: it serves one model and ignores the field)."""
    description: str
    version: str


def llama_server_upstream(args: argparse.Namespace, port: int) -> Upstream:
    gguf = peers.default_gguf()
    argv = peers.llama_server_argv(args.llama_server_bin, gguf, args.threads, args.ctx_size, args.parallel, port)
    return Upstream(
        peers.ServerSpec("llama-server", argv, "/health", "openai"),
        report.TokenCounter(gguf),
        None,
        f"llama-server `{shlex.join(argv[:1])}` -t {args.threads} -np {args.parallel}",
        machine.command_output([args.llama_server_bin, "--version"]),
    )


def vllm_upstream(args: argparse.Namespace, port: int, scratch: Path) -> Upstream:
    model_dir = Path(args.model_dir) if args.model_dir else random_model(args.model_shape, Path(args.vllm_python))
    argv = [
        args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", UPSTREAM_MODEL, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(args.ctx_size), "--seed", str(vllm_support.SEED), "--disable-log-stats",
        *shlex.split(args.vllm_args),
    ]  # fmt: skip
    env = vllm_support.offline_env(scratch / "vllm")
    if "VLLM_CPU_KVCACHE_SPACE" in os.environ:  # the CPU build's KV cache, in GiB
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ["VLLM_CPU_KVCACHE_SPACE"]
    version = machine.command_output([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"])
    return Upstream(
        peers.ServerSpec("vllm", argv, "/health", "openai", env=env),
        report.HfTokenCounter(model_dir / "tokenizer.json"),
        UPSTREAM_MODEL,
        f"vLLM {version} on `{model_dir.name}` {shlex.join(shlex.split(args.vllm_args))}".rstrip(),
        version,
    )


def random_model(shape: str, python: Path) -> Path:
    """The random-weight model of `shape`, built under bench/.cache once (by `python`)."""
    directory = CACHE / f"random-llama-{shape}"
    if not directory.exists():
        print(f"building a random {shape} Llama in {directory} (once)", file=sys.stderr)
        partial = directory.with_name(f"{directory.name}.partial")  # a build cut short is never taken for one
        shutil.rmtree(partial, ignore_errors=True)
        vllm_support.build_random_model(partial, shape, timeout=1800, python=python)
        partial.rename(directory)
    return directory


async def measure(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    upstream_port, tcserve_port = peers.free_port(), peers.free_port()
    with tempfile.TemporaryDirectory() as scratch:
        if args.upstream == "vllm":
            upstream = vllm_upstream(args, upstream_port, Path(scratch))
        else:
            upstream = llama_server_upstream(args, upstream_port)
        config = Path(scratch) / "tcserve.toml"
        # stop_limit = 0: llama-server drops a matched stop without naming it, so
        # tcserve finds "\n\nHuman:" itself (and closes the upstream stream there).
        config.write_text(
            "[[models]]\nname = 'claude-sonnet-4-5'\nengine = 'upstream'\n"
            f"urls = ['http://127.0.0.1:{upstream_port}']\nupstream_model = '{upstream.model or 'gemma'}'\n"
            f"context_size = {args.ctx_size}\nstop_limit = 0\nhealth_interval = 1\n"
        )
        tcserve = peers.ServerSpec(
            "tcserve",
            [sys.executable, "-m", "tcserve", "serve", "--config", str(config), "--port", str(tcserve_port)],
            "/health",
            "anthropic",
        )
        tag = report.utc_stamp()
        start_timeout = args.vllm_timeout if args.upstream == "vllm" else 180
        async with (
            peers.running(upstream.spec, upstream_port, start_timeout, f"{tag}-overhead") as up,
            peers.running(tcserve, tcserve_port, 180, f"{tag}-overhead") as front,
            httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), trust_env=False) as client,
        ):
            rows: dict[str, Any] = {}
            offset = 0  # every pass gets prompts of its own: no whole-prompt cache hit
            for level in [int(x) for x in args.levels.split(",")]:
                count = max(args.requests, 2 * level)
                for path, server in (("direct", up), ("via tcserve", front), ("direct", up), ("via tcserve", front)):
                    api, prompts = server.spec.api, load.load_prompts(count, offset)
                    offset += count

                    async def send(prompt: str, max_tokens: int, turn: int, base: str = server.base_url,
                                   kind: str = api) -> load.Sample:  # fmt: skip
                        return await load.stream_request(client, base, kind, prompt, max_tokens, turn, upstream.model)

                    wall, samples = await load.closed_loop(send, prompts, level, args.max_tokens)
                    rows.setdefault(f"{path} c={level}", []).append((wall, samples))
            table, data = render(rows, upstream.counter)
    header = (
        f"upstream: {upstream.description}, {args.max_tokens} tokens a request, at least {args.requests} "
        "requests (twice the level) per level, path and round, greedy, two alternating rounds, no prompt sent twice"
    )
    environment = {"cpu": machine.cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                   "tcserve_commit": machine.command_output(["git", "rev-parse", "--short", "HEAD"]),
                   "upstream_version": upstream.version}  # fmt: skip
    return {"settings": vars(args), "rows": data, "environment": environment}, header + "\n\n" + table


def render(rows: dict[str, Any], counter: report.Counter) -> tuple[str, dict[str, Any]]:
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
            "tok_req": tokens / len(ok) if ok else None,
            "ttft_p50_ms": _ms(report.pct(ttfts, 50)), "ttft_p99_ms": _ms(report.pct(ttfts, 99)),
            "itl_p50_ms": _ms(report.pct(itls, 50)), "itl_p99_ms": _ms(report.pct(itls, 99)),
        }  # fmt: skip
    lines = ["| path | requests | errors | out tok/s | tok/req | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in data.items():
        cells = [row["requests"], row["errors"], fmt(row["tok_s"]), fmt(row["tok_req"]), fmt(row["ttft_p50_ms"]),
                 fmt(row["ttft_p99_ms"]), fmt(row["itl_p50_ms"]), fmt(row["itl_p99_ms"])]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| level | tok/s via tcserve / direct | TTFT p50 via tcserve - direct (ms) | targets |",
              "|---|---|---|---|"]  # fmt: skip
    for name in data:
        if name.startswith("direct "):
            level = name.removeprefix("direct ")
            direct, front = data[name], data[f"via tcserve {level}"]
            tok = front["tok_s"] / direct["tok_s"] if direct["tok_s"] and front["tok_s"] else None
            ttft = front["ttft_p50_ms"] - direct["ttft_p50_ms"] if None not in (
                front["ttft_p50_ms"], direct["ttft_p50_ms"]) else None  # fmt: skip
            lines.append(f"| {level} | {fmt(tok, 2)}x | {fmt(ttft)} | {_verdict(tok, ttft)} |")
    return "\n".join(lines), data


def _verdict(tok: float | None, ttft: float | None) -> str:
    """Whether a level met issue 12's targets for tcserve in front of an upstream."""
    if tok is None or ttft is None:
        return "n/a"
    tok_ok, ttft_ok = tok >= TOK_S_TARGET, ttft <= TTFT_TARGET_MS
    parts = [f"tok/s >= {TOK_S_TARGET}x {'met' if tok_ok else 'missed'}",
             f"TTFT <= +{TTFT_TARGET_MS:.0f} ms {'met' if ttft_ok else 'missed'}"]  # fmt: skip
    return ", ".join(parts)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def main() -> int:
    args = parse_args()
    if args.upstream == "llama-server" and not Path(args.llama_server_bin).exists():
        print(f"no llama-server at {args.llama_server_bin}: run bench/build_llama_server.sh first", file=sys.stderr)
        return 2
    if args.upstream == "vllm" and not Path(args.vllm_python).exists():
        print(f"no python at {args.vllm_python}: give --vllm-python (`make test` makes .venv-vllm)", file=sys.stderr)
        return 2
    if args.upstream == "vllm" and args.model_dir and not (Path(args.model_dir) / "tokenizer.json").exists():
        print(f"no tokenizer.json in {args.model_dir}: the tokens are counted with it", file=sys.stderr)
        return 2
    data, table = asyncio.run(measure(args))
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = report.utc_stamp()
    (out / f"{stamp}-upstream-overhead.json").write_text(json.dumps(data, indent=2))
    (out / f"{stamp}-upstream-overhead.md").write_text(f"# tcserve in front of an upstream {stamp}\n\n{table}\n")
    print(f"\nwrote {out / f'{stamp}-upstream-overhead.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
