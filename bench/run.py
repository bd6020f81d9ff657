"""Benchmark tcserve against llama.cpp's own llama-server and llama-cpp-python's
OpenAI server, on the same GGUF, the same threads and the same per-slot context.

Why: tcserve embeds llama.cpp through llama-cpp-python. To know what its own
layers (HTTP, SSE, scheduling, batching) cost or gain, it has to be measured
side by side with servers on the very same inference code: llama-server (C++,
built from the llama.cpp sources vendored in the installed llama-cpp-python,
see build_llama_server.sh) and llama_cpp.server (Python, same wheel as
tcserve). One command starts each server, waits for /health, drives it with
streaming greedy requests (closed loop at several concurrencies, an open-loop
fixed rate, a 5-turn conversation for prefix reuse, grounded prompts whose
answers repeat them, and ~1,900-token prompts), stops it, and prints one table
with ratios and issue 12's targets. llama-server also runs with its best n-gram
speculation (`llama-server[spec]`), on the rows speculation is about. Output
tokens are counted by re-tokenising the received text with the model's own
tokenizer, identically for every server, so tokens/s does not depend on what a
server says about itself.

Run: .venv/bin/python bench/run.py            (see --help, and bench/README.md)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from load import ModeRun, all_modes, closed_loop_prompts, is_conversation, level_label, run_server_modes
from machine import environment, wait_for_quiet
from peers import (
    default_gguf,
    ensure_llama_server,
    flags_supported,
    free_port,
    help_text,
    kill_leftovers,
    running,
    server_spec,
)
from report import TokenCounter, aggregate, error_examples, fmt, method_notes, render, save, utc_stamp
from settings import (
    DEFAULTS,
    NO_REUSE,
    NO_SPEC,
    QUICK,
    REUSE_ALL,
    ROOT,
    SERVERS,
    SPEC,
    WORKLOADS,
    Settings,
    cli_text,
    flag_help,
    flag_name,
)


def spec_row(mode: str) -> bool:
    """What the speculating servers and tcserve[no-spec] run: the grounded rows, where
    speculation pays, and free-text c=1, where it must not cost (kept short: 2 cores)."""
    return mode.startswith("grounded") or mode == level_label(1)


SLOW = "llama-cpp-python"
"""Serves one request at a time: it skips the grounded and long rows (minutes at c=4)."""


def server_modes(name: str, modes: list[str]) -> list[str]:
    """The modes `name` runs, of the run's `modes`."""
    if name in (NO_REUSE, REUSE_ALL):
        return [m for m in modes if is_conversation(m)]
    if name in (SPEC, NO_SPEC):
        return [m for m in modes if spec_row(m)]
    if name == SLOW:
        return [m for m in modes if not m.startswith(("grounded", "long"))]
    return modes


async def run_one_server(
    name: str,
    cfg: Settings,
    round_no: int,
    modes: list[str],
    prompts: dict[str, list[str]],
    tc_help: str,
    tag: str,
    retries: int = 2,
) -> tuple[list[ModeRun], dict[str, Any]]:
    """Start `name`, run its modes, stop it. Retries a failed start (tcserve may be mid-edit)."""
    for attempt in range(retries + 1):
        await wait_for_quiet(cfg.idle_wait)
        port = free_port()
        spec = server_spec(name, cfg, port, tc_help)
        print(f"  [{name}] starting: {shlex.join(spec.argv)}", flush=True)
        try:
            async with running(spec, port, cfg.startup_timeout, tag) as server:
                runs = await run_server_modes(server, cfg, round_no, modes, prompts)
            info = {
                "argv": spec.argv,
                "peak_rss_mib": server.final_peak_rss_mib,
                "log": str(server.log_path.relative_to(ROOT)),
            }
            print(f"  [{name}] stopped; peak RSS {fmt(server.final_peak_rss_mib, 0)} MiB", flush=True)
            return runs, info
        except RuntimeError as exc:
            print(f"  [{name}] failed to start (attempt {attempt + 1}): {exc}", flush=True)
            if attempt < retries:
                await asyncio.sleep(15)
    return [], {"argv": spec.argv, "error": "failed to start"}


async def run_all(
    cfg: Settings, stamp: str, prompts: dict[str, list[str]]
) -> tuple[list[ModeRun], dict[str, Any], list[str]]:
    tc_help = (
        help_text([sys.executable, "-m", "tcserve", "serve"])
        if any(s.startswith("tcserve") for s in cfg.servers)
        else ""
    )
    notes: list[str] = []
    if "tcserve" in cfg.servers:
        if "--parallel" in tc_help:
            notes.append(f"tcserve supports --parallel: passed --parallel {cfg.parallel}.")
        else:
            notes.append("tcserve serve --help has no --parallel: it ran without it.")
    modes = all_modes(cfg)
    # tcserve variants, each on the rows its flags are about (server_modes): without prefix
    # reuse and reusing generated tokens too (conversations), without speculation.
    variants = []
    for variant, flags in (
        (NO_SPEC, cfg.tcserve_no_spec_args),
        (NO_REUSE, cfg.tcserve_no_reuse_args),
        (REUSE_ALL, cfg.tcserve_reuse_all_args),
    ):
        rows = server_modes(variant, modes)
        if "tcserve" not in cfg.servers or not rows:
            continue
        if flags_supported(flags, tc_help):
            variants.append(variant)
        else:
            notes.append(f"{variant} {', '.join(rows)}: n/a (serve --help lacks {shlex.join(flags) or 'its flag'}).")
    if SLOW in cfg.servers and server_modes(SLOW, modes) != modes:
        notes.append(f"{SLOW} skips the grounded and long rows (one request at a time: minutes at c=4).")
    if SPEC in cfg.servers:
        spec_flags = shlex.join(cfg.llama_server_spec_args)
        notes.append(f"{SPEC} = llama-server + {spec_flags}; it runs the grounded and c=1 rows only.")
    runs: list[ModeRun] = []
    servers_info: dict[str, Any] = {}
    for round_no in range(cfg.repeats):
        order = list(cfg.servers) if round_no % 2 == 0 else list(reversed(cfg.servers))
        order += variants
        print(f"round {round_no + 1}/{cfg.repeats}: {', '.join(order)}", flush=True)
        for name in order:
            wanted = server_modes(name, modes)
            if not wanted:
                continue
            got, info = await run_one_server(name, cfg, round_no, wanted, prompts, tc_help, f"{stamp}-r{round_no + 1}")
            runs += got
            servers_info.setdefault(name, []).append(info)
    return runs, servers_info, notes


def _add_flag(p: argparse.ArgumentParser, f: dataclasses.Field[Any]) -> None:
    """One flag from one Settings field: its name, default and help come from there."""
    cli, default, help, flag = f.metadata["cli"], getattr(DEFAULTS, f.name), flag_help(f), flag_name(f)
    if cli in ("switch", "negated"):
        p.add_argument(flag, action="store_true", help=help)
    elif cli == "model-path":
        p.add_argument(flag, default=None, help=help)
    elif cli == "csv":
        p.add_argument(flag, default=cli_text(default), help=help)
    elif cli == "shell":
        p.add_argument(flag, default=shlex.join(default), help=help)
    else:
        p.add_argument(flag, type=type(default), default=default, help=help)


def _from_flag(p: argparse.ArgumentParser, f: dataclasses.Field[Any], value: Any) -> Any:
    """A parsed flag's value as the Settings field holds it."""
    cli = f.metadata["cli"]
    if cli == "negated":
        return not value
    if cli == "model-path":
        return str(Path(value or default_gguf()).resolve())
    if cli == "shell":
        return shlex.split(value)
    if cli == "csv" and f.name.endswith("levels"):
        return [int(x) for x in value.split(",") if x.strip()]
    if cli == "csv":
        names = [s.strip() for s in value.split(",") if s.strip()]
        known = SERVERS if f.name == "servers" else WORKLOADS
        if unknown := [s for s in names if s not in known]:
            p.error(f"unknown {f.name}: {', '.join(unknown)}")
        return names
    return value


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        description="Benchmark tcserve against llama-server (C++) and llama-cpp-python's OpenAI "
        "server on the same GGUF, threads and per-slot context. Starts and stops "
        "every server itself (127.0.0.1, free port); writes bench/results/<UTC>.json "
        "and .md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    flags = [f for f in dataclasses.fields(Settings) if "cli" in f.metadata]
    for f in flags:
        _add_flag(p, f)
    args = p.parse_args(argv)
    explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    if args.quick:
        for attr, value in QUICK.items():  # requests_per_worker has no flag: set below
            if "--" + attr.replace("_", "-") not in explicit and hasattr(args, attr):
                setattr(args, attr, cli_text(value) if isinstance(value, list) else value)
    values = {f.name: _from_flag(p, f, getattr(args, flag_name(f)[2:].replace("-", "_"))) for f in flags}
    if args.quick:
        values["requests_per_worker"] = QUICK["requests_per_worker"]
    return Settings(**values)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds like Ctrl-C: every server is stopped


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: `&` jobs inherit it ignored
        signal.signal(sig, _terminate)
    cfg = parse_args(argv)
    ensure_llama_server(cfg)
    stamp = utc_stamp()
    env = environment(cfg)
    counter = TokenCounter(cfg.gguf)
    prompts = closed_loop_prompts(cfg, counter.count)
    load_before = os.getloadavg()
    try:
        runs, servers_info, notes = asyncio.run(run_all(cfg, stamp, prompts))
    except KeyboardInterrupt as exc:
        kill_leftovers()
        print(f"interrupted ({exc or 'Ctrl-C'}); every server was stopped, nothing recorded")
        return 130
    env["loadavg_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
    stats = aggregate(runs, counter)
    for (server, mode), st in stats.items():
        if is_conversation(mode) and st.prompt_tokens_turn5:
            notes.append(f"{server} {mode}: prompt of turn 5 = {st.prompt_tokens_turn5:.0f} tokens.")
        if st.copied_share is not None:
            notes.append(
                f"{server} {mode}: {st.copied_share:.0%} of output tokens repeat a 3-gram of the prompt or "
                f"output before them (prompts {st.prompt_tokens:.0f} tokens on average)."
            )
        if mode.startswith("long") and st.prompt_tokens:
            notes.append(f"{server} {mode}: prompts {st.prompt_tokens:.0f} tokens on average (BOS included).")
        if st.errors:
            examples = error_examples([r for r in runs if (r.server, r.mode) == (server, mode)])
            notes.append(f"{server} {mode}: {st.errors} error(s), e.g. {examples[0]}")
    for name, infos in servers_info.items():
        if any("error" in i for i in infos):
            notes.append(f"{name}: failed to start in some round(s); see bench/.cache/logs/.")
    table = render(stats, all_modes(cfg), cfg, method_notes(cfg) + notes)
    path = save(stamp, cfg, env, servers_info, stats, runs, table)
    print()
    print(table)
    print(f"\nwrote {path.relative_to(ROOT)} and {path.with_suffix('.md').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
