"""From samples to results: output tokens counted with the model's own tokenizer,
the metrics of each mode, the table and ratios, and the results files
(bench/results/<UTC>.json and .md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import statistics
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from load import ASSISTANT, CONV_LABEL, HUMAN, QUESTIONS, ModeRun, Sample, conversation_system, is_conversation
from settings import NO_REUSE, NO_SPEC, RESULTS, REUSE_ALL, SPEC, Settings
from texts import copied_tokens

# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Counter(Protocol):
    """Counts the tokens of a text with a model's own tokenizer."""

    def count(self, text: str) -> int: ...


class TokenCounter:
    """The model's own tokenizer (vocab only), used identically for every server."""

    def __init__(self, gguf: str) -> None:
        from llama_cpp import Llama

        with quiet_stderr():  # llama.cpp logs a context warning even with verbose=False
            self._llm = Llama(model_path=gguf, vocab_only=True, verbose=False)

    def ids(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode(), add_bos=False, special=False)) if text else []

    def count(self, text: str) -> int:
        return len(self.ids(text))


class HfTokenCounter:
    """A Hugging Face `tokenizer.json` (a vLLM upstream's model), used like TokenCounter."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids) if text else 0


BURST_S = 0.001
"""Deltas closer than this to the one before are one burst: a speculating server
(llama-server[spec]) sends each token of an accepted draft as its own event, all at
once, and a 0 ms gap per token would say nothing about how fast text arrives."""


def bursts(sample: Sample) -> list[tuple[float, str]]:
    """The sample's deltas with those of one burst joined (at the first one's time)."""
    out: list[tuple[float, str]] = []
    last = float("-inf")
    for t, delta in sample.deltas:
        if out and t - last < BURST_S:
            out[-1] = (out[-1][0], out[-1][1] + delta)
        else:
            out.append((t, delta))
        last = t
    return out


def itl_samples(sample: Sample, counter: Counter) -> list[float]:
    """Gap between successive bursts of non-empty deltas divided by the tokens that
    burst added (re-tokenising the text received so far; at least 1)."""
    out: list[float] = []
    text, tokens_before = "", 0
    deltas = bursts(sample)
    for i, (t, delta) in enumerate(deltas):
        text += delta
        tokens_now = counter.count(text)
        if i > 0:
            out.append((t - deltas[i - 1][0]) / max(1, tokens_now - tokens_before))
        tokens_before = tokens_now
    return out


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class ModeStats:
    """Metrics of one mode on one server, over all rounds."""

    server: str
    mode: str
    requests: int
    errors: int
    tok_s_rounds: list[float]
    tokens_per_request: float | None
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    peak_rss_mib: float | None
    finish_reasons: dict[str, int]
    reported_tokens: int | None
    counted_tokens: int
    other_cpu_pct: float | None
    prompt_tokens_turn5: float | None = None
    prompt_tokens: float | None = None  # mean, BOS included
    prefill_tok_s: float | None = None  # median over requests of prompt tokens / TTFT (long rows)
    copied_share: float | None = None  # output tokens that repeat a 3-gram of the text so far (grounded rows)

    @property
    def tok_s(self) -> float | None:
        return statistics.median(self.tok_s_rounds) if self.tok_s_rounds else None


def summarize(runs: list[ModeRun], counter: TokenCounter, conv_prompts: dict[int, int]) -> ModeStats:
    samples = [s for r in runs for s in r.samples]
    ok = [s for s in samples if s.error is None]
    tokens = {id(s): counter.count(s.text) for s in samples}
    tok_s_rounds = [sum(tokens[id(s)] for s in r.samples) / r.wall_s for r in runs if r.wall_s > 0]
    timed = [s for s in ok if s.turn == 5] if is_conversation(runs[0].mode) else ok
    ttfts = [s.ttft for s in timed if s.ttft is not None]
    itls = [g for s in ok for g in itl_samples(s, counter)]
    finishes: dict[str, int] = {}
    for s in ok:
        finishes[str(s.finish)] = finishes.get(str(s.finish), 0) + 1
    reported = [s.reported_tokens for s in ok if s.reported_tokens is not None]
    rss = [r.peak_rss_mib for r in runs if r.peak_rss_mib is not None]
    noise = [r.other_cpu_pct for r in runs if r.other_cpu_pct is not None]
    mode = runs[0].mode
    prompt_tokens = {id(s): counter.count(s.prompt) + 1 for s in ok} if not is_conversation(mode) else {}
    prefill = [prompt_tokens[id(s)] / s.ttft for s in ok if s.ttft and mode.startswith("long")]
    copied = sum(copied_tokens(counter.ids(s.prompt), counter.ids(s.text)) for s in ok) if "grounded" in mode else 0
    out_tokens = sum(tokens[id(s)] for s in ok)
    return ModeStats(
        server=runs[0].server,
        mode=runs[0].mode,
        requests=len(samples),
        errors=len(samples) - len(ok),
        tok_s_rounds=tok_s_rounds,
        tokens_per_request=statistics.mean(tokens[id(s)] for s in ok) if ok else None,
        ttft_p50=pct(ttfts, 50),
        ttft_p99=pct(ttfts, 99),
        itl_p50=pct(itls, 50),
        itl_p99=pct(itls, 99),
        peak_rss_mib=max(rss) if rss else None,
        finish_reasons=finishes,
        reported_tokens=sum(reported) if len(reported) == len(ok) and ok else None,
        counted_tokens=sum(tokens[id(s)] for s in ok),
        other_cpu_pct=max(noise) if noise else None,
        prompt_tokens_turn5=statistics.mean(conv_prompts.values()) if conv_prompts else None,
        prompt_tokens=statistics.mean(prompt_tokens.values()) if prompt_tokens else None,
        prefill_tok_s=statistics.median(prefill) if prefill else None,
        copied_share=copied / out_tokens if "grounded" in mode and out_tokens else None,
    )


def turn5_prompt_tokens(runs: list[ModeRun], counter: TokenCounter) -> dict[int, int]:
    """Prompt tokens of each turn-5 request, rebuilt from the completions received."""
    out: dict[int, int] = {}
    for r in runs:
        if not is_conversation(r.mode):
            continue
        per_conv = [r.samples[i : i + len(QUESTIONS)] for i in range(0, len(r.samples), len(QUESTIONS))]
        for k, turns in enumerate(per_conv):
            prompt = conversation_system(k)
            for turn, (question, sample) in enumerate(zip(QUESTIONS, turns, strict=False), start=1):
                prompt += f"{HUMAN} {question}{ASSISTANT}"
                if turn == 5:
                    out[len(out)] = counter.count(prompt) + 1  # + BOS
                prompt += sample.text
    return out


def error_examples(runs: list[ModeRun], limit: int = 3) -> list[str]:
    return [s.error for r in runs for s in r.samples if s.error][:limit]


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def utc_stamp() -> str:
    """Now, as the results files are named: 20261125T211412Z."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def fmt(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


COLUMNS = (
    "server",
    "mode",
    "reqs",
    "out tok/s",
    "tok/s range",
    "tok/req",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "errors",
    "peak RSS MiB",
    "prefill tok/s",
    "other CPU %",
)


def table_row(st: ModeStats) -> list[str]:
    rng = f"{min(st.tok_s_rounds):.1f}-{max(st.tok_s_rounds):.1f}" if len(st.tok_s_rounds) > 1 else "-"
    return [
        st.server,
        st.mode,
        str(st.requests),
        fmt(st.tok_s),
        rng,
        fmt(st.tokens_per_request),
        fmt(st.ttft_p50, 0, 1000),
        fmt(st.ttft_p99, 0, 1000),
        fmt(st.itl_p50, 1, 1000),
        fmt(st.itl_p99, 1, 1000),
        str(st.errors),
        fmt(st.peak_rss_mib, 0),
        fmt(st.prefill_tok_s, 0),
        fmt(st.other_cpu_pct, 0),
    ]


def markdown_table(header: Iterable[str], rows: list[list[str]]) -> str:
    header = list(header)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


RATIO_COLUMNS = (
    "ratio",
    "mode",
    "out tok/s",
    "TTFT p50",
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "peak RSS",
    "prefill tok/s",
)
PEERS = ("llama-server", SPEC, "llama-cpp-python")


def ratio_row(tc: ModeStats, ot: ModeStats) -> list[str]:
    return [
        f"tcserve / {ot.server}",
        tc.mode,
        ratio(tc.tok_s, ot.tok_s),
        ratio(tc.ttft_p50, ot.ttft_p50),
        ratio(tc.ttft_p99, ot.ttft_p99),
        ratio(tc.itl_p50, ot.itl_p50),
        ratio(tc.itl_p99, ot.itl_p99),
        ratio(tc.peak_rss_mib, ot.peak_rss_mib),
        ratio(tc.prefill_tok_s, ot.prefill_tok_s),
    ]


def ratio_table(stats: dict[tuple[str, str], ModeStats], modes: list[str]) -> str:
    rows = []
    for other in PEERS:
        for mode in modes:
            tc, ot = stats.get(("tcserve", mode)), stats.get((other, mode))
            if tc is not None and ot is not None:
                rows.append(ratio_row(tc, ot))
    return markdown_table(RATIO_COLUMNS, rows) if rows else ""


# ----------------------------------------------------------------------------
# Targets of issue 12, each as the run shows it
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """tcserve's `metric` on `mode` over `peer`'s must be >= `bound` (`at_least`) or <= it."""

    label: str
    mode: str
    peer: str
    metric: str  # a ModeStats attribute
    bound: float
    at_least: bool


def targets(modes: list[str]) -> list[Target]:
    """The targets of issue 12; peak RSS at every mode of the run."""
    out = [
        Target("grounded c=1 tok/s vs llama-server[spec]", "grounded c=1", SPEC, "tok_s", 1.3, True),
        Target("grounded c=1 tok/s vs llama-server", "grounded c=1", "llama-server", "tok_s", 2.5, True),
        Target("grounded c=4 tok/s vs llama-server[spec]", "grounded c=4", SPEC, "tok_s", 1.0, True),
    ]
    out += [Target(f"free-text c={c} tok/s", f"c={c}", "llama-server", "tok_s", 1.0, True) for c in (1, 4, 16)]
    out.append(Target("conversation turn-5 TTFT p50", CONV_LABEL, "llama-server", "ttft_p50", 1.0, False))
    out += [Target(f"c=16 {m} p99", "c=16", "llama-server", f"{m.lower()}_p99", 1.0, False) for m in ("TTFT", "ITL")]
    out += [Target(f"long c={c} TTFT p50", f"long c={c}", "llama-server", "ttft_p50", 1.0, False) for c in (1, 4)]
    out += [Target(f"{m} peak RSS", m, "llama-server", "peak_rss_mib", 1.0, False) for m in modes]
    return out


def target_lines(stats: dict[tuple[str, str], ModeStats], modes: list[str]) -> list[str]:
    """One line per target the run can show, with its figure and met or missed; then
    the targets it cannot show (a mode or a server left out)."""
    lines, unshown = [], []
    for t in targets(modes):
        tc, ot = stats.get(("tcserve", t.mode)), stats.get((t.peer, t.mode))
        a = getattr(tc, t.metric) if tc else None
        b = getattr(ot, t.metric) if ot else None
        if a is None or not b:
            unshown.append(t.label)
            continue
        value, sign = a / b, ">=" if t.at_least else "<="
        met = value >= t.bound if t.at_least else value <= t.bound
        lines.append(f"- {t.label}: {value:.2f}x ({sign} {t.bound:g}x vs {t.peer}): {'met' if met else 'missed'}")
    if lines and unshown:
        lines.append(f"- not shown by this run: {', '.join(unshown)}")
    return lines


def render(stats: dict[tuple[str, str], ModeStats], modes: list[str], cfg: Settings, notes: list[str]) -> str:
    order = ["tcserve", NO_SPEC, NO_REUSE, REUSE_ALL, "llama-server", SPEC, "llama-cpp-python"]
    keys = sorted(stats, key=lambda k: (modes.index(k[1]), order.index(k[0])))
    parts = [markdown_table(COLUMNS, [table_row(stats[k]) for k in keys])]
    ratios = ratio_table(stats, modes)
    if ratios:
        parts += [
            "",
            "Ratios (tcserve / other; >1 means tcserve is higher: good for tok/s, bad for latency and memory):",
            "",
            ratios,
        ]
    if goals := target_lines(stats, modes):
        parts += ["", "Targets (issue 12; ratios tcserve / peer, this run):", "", *goals]
    parts += ["", *notes]
    if cfg.quick:
        parts.insert(0, "**QUICK SMOKE RUN - not a result.**\n")
    return "\n".join(parts)


def aggregate(runs: list[ModeRun], counter: TokenCounter) -> dict[tuple[str, str], ModeStats]:
    groups: dict[tuple[str, str], list[ModeRun]] = {}
    for r in runs:
        groups.setdefault((r.server, r.mode), []).append(r)
    return {key: summarize(group, counter, turn5_prompt_tokens(group, counter)) for key, group in groups.items()}


def method_notes(cfg: Settings) -> list[str]:
    return [
        f"Output tokens: received text re-tokenised with the GGUF's tokenizer (add_bos=False, "
        f"special=False). out tok/s = median over {cfg.repeats} round(s) of (output tokens of the "
        "mode / wall time of the mode); tok/s range = min-max over rounds.",
        "TTFT/ITL percentiles pool every request of every round. ITL = gap between successive "
        "non-empty text deltas / tokens that delta added (deltas < 1 ms apart count as one). "
        "Conversation rows: TTFT of turn 5 only.",
        "prefill tok/s (long rows) = median over requests of prompt tokens (BOS included) / TTFT.",
        "peak RSS = server VmHWM when the mode finished (cumulative since the server started; "
        "max over rounds). other CPU % = CPU used by processes other than the server and this "
        "harness during the mode, % of all cores (max over rounds); above ~5% the row is noisy.",
    ]


def save(
    stamp: str,
    cfg: Settings,
    env: dict[str, Any],
    servers_info: dict[str, Any],
    stats: dict[tuple[str, str], ModeStats],
    runs: list[ModeRun],
    table: str,
) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    per_request = [
        {
            "server": r.server,
            "mode": r.mode,
            "round": r.round,
            "turn": s.turn,
            "ttft_s": s.ttft,
            "duration_s": s.end - s.start,
            "deltas": len(s.deltas),
            "chars": len(s.text),
            "text": s.text,
            "finish": s.finish,
            "reported_tokens": s.reported_tokens,
            "prompt_chars": len(s.prompt),
            "error": s.error,
        }
        for r in runs
        for s in r.samples
    ]
    data = {
        "timestamp_utc": stamp,
        "environment": env,
        "settings": asdict(cfg),
        "servers": servers_info,
        "modes": [{**asdict(st), "tok_s": st.tok_s} for st in stats.values()],
        "mode_runs": [
            {
                "server": r.server,
                "mode": r.mode,
                "round": r.round,
                "wall_s": r.wall_s,
                "peak_rss_mib": r.peak_rss_mib,
                "other_cpu_pct": r.other_cpu_pct,
                "errors": error_examples([r]),
            }
            for r in runs
        ],
        "requests": per_request,
    }
    path = RESULTS / f"{stamp}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    header = (
        f"# tcserve benchmark {stamp}\n\n{env['cpu']}, {env['cores']} cores, "
        f"{env['ram_gib']} GiB; {env['os']}; Python {env['python']}; tcserve "
        f"{env['tcserve_version']} @ {env['tcserve_commit']}"
        f"{' (src dirty)' if env['tcserve_src_dirty'] else ''}; llama-cpp-python "
        f"{env['llama_cpp_python_version']}; GGUF {Path(cfg.gguf).name} "
        f"sha256 {env['gguf']['sha256'][:16]}...\n\nSettings: threads {cfg.threads}, ctx "
        f"{cfg.ctx_size}/slot, parallel {cfg.parallel}, max tokens {cfg.max_tokens}, "
        f"repeats {cfg.repeats}, levels {cfg.levels}, rate {cfg.rate}/s for {cfg.duration} s, "
        f"{cfg.conversations} conversation(s) x 5 turns at {cfg.conv_max_tokens} tokens "
        f"({cfg.conv_pause:g} s between turns; {cfg.conv_read_pause:g} s in the '+' row), workloads "
        f"{cfg.workloads}, grounded levels {cfg.grounded_levels}, long levels {cfg.long_levels} "
        f"({cfg.long_prompt_budget()}-token prompts, {cfg.long_max_tokens} tokens out). "
        f"Full settings in {path.name}.\n\n"
    )
    (RESULTS / f"{stamp}.md").write_text(header + table + "\n")
    return path
