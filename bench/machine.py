"""The machine the benchmark runs on: what it is (recorded with every result)
and how busy other processes keep it (a shared 2-core VM is often busy, and a
noisy neighbour must show up in the table, not just as slower numbers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from settings import ROOT, Settings


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


def command_output(argv: list[str]) -> str:
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

    dirty = command_output(["git", "status", "--porcelain", "--", "src"])
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": os_name(),
        "python": platform.python_version(),
        "tcserve_version": version("tcserve"),
        "tcserve_commit": command_output(["git", "rev-parse", "--short", "HEAD"]),
        "tcserve_src_dirty": bool(dirty) and not dirty.startswith("unavailable"),
        "llama_cpp_python_version": version("llama-cpp-python"),
        "llama_server_version": (
            command_output([cfg.llama_server_bin, "--version"])
            if any(s.startswith("llama-server") for s in cfg.servers)
            else "not used"
        ),
        "gguf": {"path": cfg.gguf, "size_bytes": os.path.getsize(cfg.gguf), "sha256": sha256(cfg.gguf)},
    }
