"""Resident memory of tcserve and llama-server at the benchmark's settings: VmRSS once
healthy, then VmRSS and VmHWM after rounds of `parallel` concurrent requests (the
benchmark's prompts, greedy). `tcserve[swa-local]` is tcserve with swa_full=False and
`tcserve[fake]` the server with only the fake engine (the Python baseline).

    python bench/probes/server_rss.py --parallel 1,4,16 [--servers ...] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from load import load_prompts, stream_request
from peers import ServerSpec, default_gguf, free_port, llama_server_argv, running, status_mib
from settings import DEFAULT_LLAMA_SERVER

PATCH = (
    "import sys; from tcserve.engines.llamacpp import native as n; o = n._context_params; "
    "n._context_params = lambda p: (lambda c: (setattr(c, 'swa_full', {swa}), "
    "setattr(c, 'n_outputs_max', {out}), c)[2])(o(p)); "
    "from tcserve.cli import main; sys.exit(main(sys.argv[1:]))"
)


def spec(name: str, gguf: str, parallel: int, port: int, fake_config: Path) -> ServerSpec:
    common = ["--threads", "2", "--ctx-size", "2048", "--host", "127.0.0.1", "--port", str(port)]
    common += ["--parallel", str(parallel), "--model-path", gguf]
    if name == "llama-server":
        return ServerSpec(
            name, llama_server_argv(str(DEFAULT_LLAMA_SERVER), gguf, 2, 2048, parallel, port), "/health", "openai"
        )
    if name == "tcserve":
        return ServerSpec(name, [sys.executable, "-m", "tcserve", "serve", *common], "/health", "anthropic")
    if name == "tcserve[fake]":
        argv = [sys.executable, "-m", "tcserve", "serve", "--config", str(fake_config), "--port", str(port)]
        return ServerSpec(name, [*argv, "--host", "127.0.0.1"], "/health", "anthropic")
    swa, out = {"tcserve[swa-local]": ("False", 0), "tcserve[swa-local,out]": ("False", parallel)}[name]
    return ServerSpec(
        name, [sys.executable, "-c", PATCH.format(swa=swa, out=out), "serve", *common], "/health", "anthropic"
    )


async def measure(name: str, gguf: str, parallel: int, rounds: int, fake_config: Path) -> str:
    port = free_port()
    async with running(spec(name, gguf, parallel, port, fake_config), port, 120, f"rss-{parallel}") as server:
        pid = server.proc.pid
        idle = status_mib(pid, "VmRSS")
        errors = 0
        if name != "tcserve[fake]":
            async with httpx.AsyncClient(trust_env=False, timeout=300) as client:
                for r in range(rounds):
                    prompts = load_prompts(parallel, 1000 * parallel + r * parallel)
                    sends = [stream_request(client, server.base_url, server.spec.api, p, 64) for p in prompts]
                    errors += sum(1 for s in await asyncio.gather(*sends) if s.error)
        rss, hwm = status_mib(pid, "VmRSS"), status_mib(pid, "VmHWM")
    return f"| {name} | {parallel} | {idle:.0f} | {rss:.0f} | {hwm:.0f} | {errors} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", default="1,4,16")
    parser.add_argument("--servers", default="tcserve[fake],tcserve,tcserve[swa-local],llama-server")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    gguf = default_gguf()
    fake_config = Path("/tmp") / "server_rss_fake.toml"
    fake_config.write_text("[[models]]\nname = 'base'\nengine = 'fake'\n")
    print("| server | parallel | VmRSS idle MiB | VmRSS after MiB | VmHWM MiB | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for parallel in (int(p) for p in args.parallel.split(",")):
        for name in args.servers.split(","):
            if name == "tcserve[fake]" and parallel != 1:
                continue
            print(await measure(name, gguf, parallel, args.rounds, fake_config), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
