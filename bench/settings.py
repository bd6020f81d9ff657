"""The benchmark's settings: one dataclass whose defaults and help texts are the
command line's (run.py builds its argparse parser from these fields), and the
paths and server names the other bench modules share.

Why one place: bench/run.py and bench/upstream_overhead.py take the same kind of
flags (threads, context, tokens, the llama-server binary); a default typed twice
drifts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"
LOGS = CACHE / "logs"
DEFAULT_LLAMA_SERVER = CACHE / "llama-server-build" / "bin" / "llama-server"
BUILD_SCRIPT = BENCH / "build_llama_server.sh"

SPEC = "llama-server[spec]"
SERVERS = ("tcserve", "llama-server", SPEC, "llama-cpp-python")
NO_REUSE = "tcserve[no-reuse]"
REUSE_ALL = "tcserve[reuse-generated]"
NO_SPEC = "tcserve[no-spec]"
WORKLOADS = ("text", "rate", "conv", "grounded", "long")
"""Free-text closed loop (c=N rows), open loop, conversations, grounded and long prompts."""

Cli = Literal["value", "csv", "shell", "switch", "negated", "model-path"]
"""How a field appears on the command line: a plain typed value; a comma-separated
list; one shell-quoted string of extra flags; a store_true switch; a store_true
`--no-<field>` that turns the field off; the optional GGUF path."""


def _flag(help: str, cli: Cli = "value", flag: str | None = None) -> dict[str, Any]:
    """A field's command line: its help text, how it is written, and its flag if not `--<field>`."""
    return {"help": help, "cli": cli, "flag": flag}


_NO_REUSE_HELP = (
    "flags that turn tcserve's prefix reuse off, for the extra conversation "
    "row; used only if `serve --help` mentions them, else the row is n/a"
)
_NO_SPEC_HELP = (
    "flags that turn tcserve's speculative decoding off, for the tcserve[no-spec] rows (grounded and c=1); "
    "used only if `serve --help` mentions them, else the rows are n/a"
)
_SPEC_HELP = (
    "flags added to llama-server's command line for the llama-server[spec] rows: its best n-gram "
    "speculation mode on the grounded workload at c=1 (bench/spec_modes.py measures the modes)"
)
_REUSE_ALL_HELP = (
    "flags that make tcserve reuse generated tokens too, for another conversation row "
    "(n/a if `serve --help` lacks them)"
)


@dataclass
class Settings:
    servers: list[str] = field(
        default_factory=lambda: list(SERVERS), metadata=_flag("comma-separated subset of: " + ", ".join(SERVERS), "csv")
    )
    workloads: list[str] = field(
        default_factory=lambda: list(WORKLOADS),
        metadata=_flag("comma-separated subset of: " + ", ".join(WORKLOADS), "csv"),
    )
    levels: list[int] = field(
        default_factory=lambda: [1, 4, 16], metadata=_flag("closed-loop concurrency levels", "csv")
    )
    grounded_levels: list[int] = field(
        default_factory=lambda: [1, 4],
        metadata=_flag("concurrency levels of the grounded workload (answers that repeat their prompt)", "csv"),
    )
    long_levels: list[int] = field(
        default_factory=lambda: [1, 4], metadata=_flag("concurrency levels of the long-prompt workload", "csv")
    )
    long_prompt_tokens: int = field(
        default=1900,
        metadata=_flag("prompt tokens of each long prompt, BOS included (at most ctx-size - long-max-tokens - 16)"),
    )
    long_max_tokens: int = field(default=32, metadata=_flag("tokens to generate per long-prompt request"))
    requests: int = field(
        default=0,
        metadata=_flag(
            "requests per closed-loop level (0: {requests_per_worker} x concurrency, {quick} x with --quick; "
            "grounded rows {grounded} x concurrency)"
        ),
    )
    requests_per_worker: int = 2  # used when requests is 0; QUICK's with --quick
    grounded_requests_per_worker: int = 3  # one of each grounded kind per worker (also with --quick)
    max_tokens: int = field(default=128, metadata=_flag("tokens to generate per request"))
    threads: int = field(default=2, metadata=_flag("CPU threads for every server"))
    ctx_size: int = field(
        default=2048, metadata=_flag("context tokens per slot (llama-server gets ctx-size x parallel)")
    )
    parallel: int = field(
        default=16, metadata=_flag("slots: llama-server -np, and tcserve --parallel if its serve --help has it")
    )
    repeats: int = field(
        default=2,
        metadata=_flag("rounds; server order alternates (forward, reversed, ...); tok/s is the median over rounds"),
    )
    rate: float = field(
        default=0.5, metadata=_flag("open-loop Poisson arrival rate in requests/s (0: skip the open-loop mode)")
    )
    duration: float = field(default=30.0, metadata=_flag("open-loop arrival window, seconds"))
    seed: int = field(default=1234, metadata=_flag("seed of the open-loop arrival schedule"))
    conversations: int = field(
        default=2, metadata=_flag("5-turn conversations per server for the prefix-reuse mode (0: skip)")
    )
    conv_max_tokens: int = field(default=64, metadata=_flag("tokens per conversation turn"))
    conv_pause: float = field(
        default=0.0,
        metadata=_flag(
            "seconds between a conversation turn's answer and the next question (a person reading; "
            "0: back to back, like an agent loop); turn-5 TTFT is measured either way"
        ),
    )
    conv_read_pause: float = field(
        default=1.0,
        metadata=_flag(
            "a second conversation row, 'conv turn 5 +Ns', with this pause between turns (a person reading the "
            "answer; tcserve's idle engine recomputes it meanwhile) (0: skip)"
        ),
    )
    warmup: bool = field(
        default=True, metadata=_flag("skip the one short unmeasured request sent after each server starts", "negated")
    )
    gguf: str = field(
        default="", metadata=_flag("GGUF (default: the packaged Gemma 3 270M)", "model-path", "--model-path")
    )
    llama_server_bin: str = field(
        default=str(DEFAULT_LLAMA_SERVER),
        metadata=_flag("llama-server binary (the default path is built on first use by bench/build_llama_server.sh)"),
    )
    tcserve_args: list[str] = field(
        default_factory=list, metadata=_flag("extra flags for `tcserve serve` (one string)", "shell")
    )
    tcserve_no_reuse_args: list[str] = field(
        default_factory=lambda: ["--no-prefix-cache"], metadata=_flag(_NO_REUSE_HELP, "shell")
    )
    tcserve_reuse_all_args: list[str] = field(
        default_factory=lambda: ["--reuse-generated"], metadata=_flag(_REUSE_ALL_HELP, "shell")
    )
    tcserve_no_spec_args: list[str] = field(
        default_factory=lambda: ["--no-speculative"], metadata=_flag(_NO_SPEC_HELP, "shell")
    )
    llama_server_args: list[str] = field(default_factory=list, metadata=_flag("extra flags for llama-server", "shell"))
    llama_server_spec_args: list[str] = field(
        default_factory=lambda: ["--spec-type", "ngram-mod"], metadata=_flag(_SPEC_HELP, "shell")
    )
    llama_cpp_python_args: list[str] = field(
        default_factory=list, metadata=_flag("extra flags for python -m llama_cpp.server", "shell")
    )
    startup_timeout: float = field(default=180.0, metadata=_flag("seconds to wait for health"))
    request_timeout: float = field(default=900.0, metadata=_flag("per-request read timeout, seconds (no retries)"))
    idle_wait: float = field(
        default=120.0,
        metadata=_flag(
            "before each server starts, wait up to this many seconds for other processes to "
            "leave the CPU idle (<10%% busy); 0: do not wait"
        ),
    )
    quick: bool = field(
        default=False,
        metadata=_flag(
            "smoke run: levels {levels}, C requests per level, {max_tokens} tokens, {repeats} round, {duration} s of "
            "open loop, {conversations} conversation of {conv_max_tokens}-token turns, grounded and long levels "
            "{grounded_levels} and {long_levels} (explicit flags still win)",
            "switch",
        ),
    )

    def requests_for(self, concurrency: int) -> int:
        return self.requests or self.requests_per_worker * concurrency

    def long_prompt_budget(self) -> int:
        """Long-prompt tokens that leave room for the output in one slot (16 to spare)."""
        return min(self.long_prompt_tokens, self.ctx_size - self.long_max_tokens - 16)


QUICK: dict[str, Any] = {
    "levels": [1, 4],
    "grounded_levels": [1],
    "long_levels": [1],
    "max_tokens": 32,
    "repeats": 1,
    "duration": 8.0,
    "conversations": 1,
    "conv_max_tokens": 32,
    "requests_per_worker": 1,
}
"""What --quick changes (a flag given explicitly still wins, except requests_per_worker)."""

DEFAULTS = Settings()


def flag_name(f: dataclasses.Field[Any]) -> str:
    """The command-line flag that sets field `f` (`--max-tokens` for max_tokens)."""
    if f.metadata.get("flag"):
        return str(f.metadata["flag"])
    prefix = "--no-" if f.metadata.get("cli") == "negated" else "--"
    return prefix + f.name.replace("_", "-")


def cli_text(value: Any) -> str:
    """How a default reads on the command line and in help texts."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def flag_help(f: dataclasses.Field[Any]) -> str:
    """A field's help, with the defaults and --quick values it names filled in."""
    text: str = f.metadata["help"]
    if f.name == "quick":
        return text.format(**{k: cli_text(v) for k, v in QUICK.items()})
    if f.name == "requests":
        per_worker, quick = DEFAULTS.requests_per_worker, QUICK["requests_per_worker"]
        return text.format(requests_per_worker=per_worker, quick=quick, grounded=DEFAULTS.grounded_requests_per_worker)
    return text
