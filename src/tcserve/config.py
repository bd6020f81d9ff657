"""Settings: CLI flags and `TCSERVE_*` variables -> one object; a TOML file -> the model table.

Config flows one way: `cli/main.py` parses flags (generated from `Settings` by
`cli/flags.py`) into a `Settings`, `load_models` reads the model table, and
`api.app.create_app(settings)` builds the server.
"""

from __future__ import annotations

import logging
import os
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tcserve.errors import validation_message

DEFAULT_MODEL_NAME = "gemma-3-270m"
DEFAULT_CONTEXT_SIZE = 8192
DEFAULT_PARALLEL = 8
"""On 2 to 8 cores llama.cpp's batched decode keeps gaining up to ~16 sequences;
8 slots x 8192 tokens of Gemma 3 270M's cache is about 1.2 GB."""
DEFAULT_PREFILL_BUDGET = 240
"""256 measured best of 128/256/512 at 16 concurrent clients (README, "Batching"). A
step computes its prompt pieces in llama_decodes of their own, so the budget does not
size llama.cpp's batch; newcomers that outnumber the generating streams get up to 4
budgets (`scheduler.BURST_BUDGET`)."""
DEFAULT_MAX_QUEUE = 64
MiB = 1024 * 1024


class ConfigError(Exception):
    """The config file or a setting is wrong; the message says where and how."""


class _ModelBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="The id clients send as `model`.")
    display_name: str | None = Field(None, description="Shown by GET /v1/models; defaults to the name.")
    aliases: tuple[str, ...] = Field((), description="Other ids that reach this model.")
    context_size: int = Field(DEFAULT_CONTEXT_SIZE, ge=16, description="Tokens of context (prompt + completion).")
    check_transcript: bool = Field(
        True, description="Enforce the Human/Assistant prompt rules; false for raw completion on base models."
    )
    created_at: datetime | None = Field(None, description="Listed by /v1/models; defaults to the file's date.")
    keep_alive: float | None = Field(
        None,
        ge=-1,
        description="Seconds idle before the model is unloaded (it loads again on its next request); -1 or none:"
        " kept loaded for ever. Models of --models-dir take --keep-alive.",
    )

    @field_validator("keep_alive")
    @classmethod
    def _minus_one_or_more(cls, value: float | None) -> float | None:
        if value is not None and -1 < value < 0:
            raise ValueError("keep_alive must be -1 (for ever) or at least 0 seconds")
        return value


class LlamaCppModel(_ModelBase):
    """A GGUF file served by the embedded llama.cpp engine."""

    engine: Literal["llamacpp"] = "llamacpp"
    path: Path | None = Field(None, description="GGUF file; default: the packaged Gemma 3 270M.")
    threads: int | None = Field(None, ge=1, description="CPU threads; default: every core.")
    parallel: int = Field(DEFAULT_PARALLEL, ge=1, le=256, description="Sequences decoded together in one batch.")
    max_queue: int = Field(DEFAULT_MAX_QUEUE, ge=0, description="Requests that may wait for a slot; more get 529.")
    prefix_cache: bool = Field(True, description="Reuse the cache of a shared prompt prefix.")
    prefill_budget: int = Field(
        DEFAULT_PREFILL_BUDGET, ge=1, le=8192, description="Prompt tokens of newcomers one batching step may add."
    )
    reuse_generated: bool = Field(
        False, description="Reuse cached generated tokens too: faster follow-up turns, greedy text may vary."
    )
    speculative: bool = Field(
        True,
        description="Speculative decoding of greedy requests from n-grams of the prompt and the text so far, when"
        " the measured step costs say it pays.",
    )
    prompt_format: Literal["auto", "raw", "chat"] = Field(
        "auto",
        description="How a transcript is fed: chat renders it with the model's chat template, raw feeds the"
        " Human/Assistant text; auto is chat when the GGUF has tokenizer.chat_template (or chat_template is set).",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template overriding the GGUF's: the template itself (text with `{{` or `{%`)"
        " or a file (relative to the config file).",
    )

    @model_validator(mode="after")
    def _chat_needs_a_transcript(self) -> LlamaCppModel:
        if self.prompt_format == "chat" and not self.check_transcript:
            raise ValueError(
                "prompt_format = 'chat' needs check_transcript = true: a raw prompt has no turns to render"
            )
        return self

    @property
    def chat_template_is_inline(self) -> bool:
        return self.chat_template is not None and ("{{" in self.chat_template or "{%" in self.chat_template)


class FakeModel(_ModelBase):
    """A scripted engine for tests and demos: it answers `reply`, one word per token."""

    engine: Literal["fake"]
    reply: str = " Hello! I am a scripted test model."
    token_delay: float = Field(0.0, ge=0, description="Seconds to wait before each token.")
    load_delay: float = Field(0.0, ge=0, description="Seconds to 'load' before /health turns ready.")
    fail_after: int | None = Field(None, ge=0, description="Raise an engine failure after this many tokens.")
    capacity: int = Field(1000, ge=0, description="Requests it holds at once; more get 529.")


class UpstreamModel(_ModelBase):
    """A model served by OpenAI-compatible `/v1/completions` servers (vLLM, SGLang,
    llama-server, TGI): tcserve keeps the wire, the upstream does the compute."""

    engine: Literal["upstream"]
    urls: tuple[AnyHttpUrl, ...] = Field(min_length=1, description="Replicas, e.g. http://gpu-1:8000.")
    api: Literal["completions", "chat", "messages"] = Field(
        "completions",
        description="The upstream's API: OpenAI /v1/completions (the transcript as text), OpenAI"
        " /v1/chat/completions or Anthropic's /v1/messages (the transcript as turns).",
    )
    upstream_model: str | None = Field(
        None,
        description="The model name the upstream serves; default: name. `{model}` in it is replaced by the id the"
        " caller asked for, so one entry can serve many ids (needs context_size).",
    )
    api_key: SecretStr | None = Field(
        None, description="The upstream's key (`Authorization: Bearer`; `x-api-key` for api = messages)."
    )
    api_key_env: str | None = Field(
        None, min_length=1, description="The environment variable that holds the upstream's key (better than api_key)."
    )
    context_size: int | None = Field(  # type: ignore[assignment]
        None, ge=16, description="Default: the upstream's max_model_len from its /v1/models."
    )
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to a replica.")
    read_timeout: float = Field(120.0, gt=0, description="Seconds without a byte from the upstream.")
    health_interval: float = Field(5.0, gt=0, description="Seconds between health checks of each replica.")
    stop_limit: int = Field(
        16,
        ge=0,
        description="Stop sequences sent upstream (tcserve enforces all of them). 0 for upstreams that drop the"
        " stop text without naming the stop (llama-cpp-python's server), so that tcserve sees and reports it.",
    )
    max_in_flight: int = Field(256, ge=1, description="Requests in flight over all replicas; more get 529.")

    @model_validator(mode="after")
    def _consistent(self) -> UpstreamModel:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("set api_key or api_key_env, not both")
        if self.api != "completions" and not self.check_transcript:
            raise ValueError(f"api = {self.api!r} sends the transcript as turns: it needs check_transcript = true")
        if "{model}" in (self.upstream_model or "") and self.context_size is None:
            raise ValueError("an upstream_model with {model} serves many models: set context_size")
        return self


ServedModel = LlamaCppModel | FakeModel | UpstreamModel
ModelConfig = Annotated[ServedModel, Field(discriminator="engine")]


class _ModelTable(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelConfig] = Field(min_length=1)

    @field_validator("models", mode="before")
    @classmethod
    def _engine_defaults_to_llamacpp(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"engine": "llamacpp", **m} if isinstance(m, dict) else m for m in value]
        return value


def cli(
    flag: str | None = None,
    *,
    metavar: str | None = None,
    repeat: bool = False,
    const: bool | None = None,
    default: str | None = None,
    model_default: str | None = None,
) -> dict[str, Any]:
    """How a setting appears on `tcserve serve`'s command line (cli/flags.py reads it):
    `flag` (default: the field's name with dashes; "" for none), a repeatable flag
    (`repeat`), a switch that stores `const`, the default as `--help` shows it, or the
    field of the default model's config whose default applies (`model_default`)."""
    return {"cli": {"flag": flag, "metavar": metavar, "repeat": repeat, "const": const, "default": default,
                    "model_default": model_default}}  # fmt: skip


class Settings(BaseSettings):
    """Everything the server needs, from flags (highest), `TCSERVE_*` variables, then
    defaults. This is the one definition of every server setting: `tcserve serve`'s
    flags, their help and their defaults are generated from it."""

    model_config = SettingsConfigDict(env_prefix="TCSERVE_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8080, ge=0, le=65535, description="port to bind")
    config: Path | None = Field(
        None, description="TOML model table (see README)", json_schema_extra=cli(metavar="FILE")
    )
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="accept this key in x-api-key or Authorization: Bearer; repeat for several "
        "(env: comma-separated); with none the server is open",
        json_schema_extra=cli("--api-key", metavar="KEY", repeat=True, default="none"),
    )
    keys_file: Path | None = Field(
        None,
        description="named keys with model permissions and per-minute limits, re-read when it changes "
        "(see `tcserve keys`)",
        json_schema_extra=cli(metavar="FILE"),
    )
    data_dir: Path | None = Field(
        None,
        description="folder for the usage ledger (usage.sqlite3); without it nothing is recorded",
        json_schema_extra=cli(metavar="DIR"),
    )
    model_path: Path | None = Field(
        None,
        description="GGUF file to serve as the default model",
        json_schema_extra=cli(metavar="FILE", default="the packaged Gemma 3 270M"),
    )
    ctx_size: int | None = Field(
        None,
        ge=16,
        description="context tokens of each request, prompt + completion",
        json_schema_extra=cli(metavar="N", model_default="context_size"),
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for llama.cpp", json_schema_extra=cli(metavar="N", default="every core")
    )
    parallel: int | None = Field(
        None,
        ge=1,
        le=256,
        description="sequences decoded together in one batch; each gets --ctx-size tokens",
        json_schema_extra=cli(metavar="N", model_default="parallel"),
    )
    max_queue: int | None = Field(
        None,
        ge=0,
        description="requests that may wait for a free sequence; beyond that, 529",
        json_schema_extra=cli(metavar="N", model_default="max_queue"),
    )
    prefill_budget: int | None = Field(
        None,
        ge=1,
        le=8192,
        description="prompt tokens of newcomers one batching step may add beside the running sequences (up to 4 "
        "times as many while newcomers outnumber them): lower pauses running streams less, higher processes "
        "long prompts under load faster; at least one 128-token chunk",
        json_schema_extra=cli(metavar="N", model_default="prefill_budget"),
    )
    reuse_generated: bool | None = Field(
        None,
        description="also reuse the cache of generated tokens (a conversation's earlier answers): the next turn "
        "computes only its new text, but a greedy request's text may then depend on what was cached before",
        json_schema_extra=cli(const=True, default="off"),
    )
    prefix_cache: bool | None = Field(
        None,
        description="do not reuse the cache of a shared prompt prefix (for benchmarks)",
        json_schema_extra=cli("--no-prefix-cache", const=False, default="reuse on"),
    )
    speculative: bool | None = Field(
        None,
        description="do not speculate: by default a greedy request (temperature 0) drafts tokens from n-grams of "
        "its prompt and text so far and verifies them in the batch, when the measured step costs say it pays "
        "(the text is the same greedy text); sampled requests never speculate",
        json_schema_extra=cli("--no-speculative", const=False, default="speculation on"),
    )
    models_dir: Path | None = Field(
        None,
        description="also serve every *.gguf file of this folder, loaded on its first request, under its file "
        "name lowercased without .gguf (characters other than a-z 0-9 . _ - become -); files added later are "
        "served too; names that collide are a start-up error",
        json_schema_extra=cli(metavar="DIR"),
    )
    keep_alive: float = Field(
        300.0,
        ge=-1,
        description="seconds a model of --models-dir stays loaded while idle; -1: for ever (configured models "
        "take their own keep_alive, by default for ever)",
        json_schema_extra=cli(metavar="SECONDS"),
    )
    max_loaded_models: int | None = Field(
        None,
        ge=1,
        description="local models loaded at once, kept ones included: loading one more first unloads the least "
        "recently used idle model that is not kept for ever; a model that cannot fit gets an error",
        json_schema_extra=cli(metavar="N", default="no limit"),
    )
    load_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a request waits for its model to load before it gets 529 with retry-after (the "
        "load goes on, and the SDKs retry)",
        json_schema_extra=cli(metavar="SECONDS"),
    )
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM/Ctrl-C, seconds running requests may finish before they are ended",
        json_schema_extra=cli(metavar="SECONDS"),
    )
    max_body_bytes: int = Field(
        32 * MiB,
        ge=1,
        description="larger request bodies get 413",
        json_schema_extra=cli(metavar="N", default="32 MiB"),
    )
    max_prompt_chars: int = Field(
        4 * MiB,
        ge=1,
        description="longer prompts get 400 before they are tokenized",
        json_schema_extra=cli(metavar="N", default="4 Mi"),
    )
    max_stop_sequences: int = Field(
        64, ge=0, description="more stop_sequences get 400", json_schema_extra=cli(metavar="N")
    )
    max_stop_chars: int = Field(
        1024, ge=1, description="a longer stop sequence gets 400", json_schema_extra=cli(metavar="N")
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="allow browser requests from this origin (repeat; env: comma-separated)",
        json_schema_extra=cli("--cors-origin", metavar="ORIGIN", repeat=True, default="CORS off"),
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a client may take to send a request's headers before it is disconnected",
        json_schema_extra=cli(metavar="SECONDS"),
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a client may take to send its request body",
        json_schema_extra=cli(metavar="SECONDS"),
    )
    request_timeout: float = Field(
        600.0,
        gt=0,
        description="seconds a completion may run before it is ended",
        json_schema_extra=cli(metavar="SECONDS"),
    )
    slow_reader_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a streaming client may stop reading before its stream is ended",
        json_schema_extra=cli(metavar="SECONDS"),
    )
    ping_interval: float = Field(
        15.0,
        gt=0,
        description="seconds of silence before a stream gets a ping event",
        json_schema_extra=cli(metavar="SECONDS"),
    )
    playground: bool = Field(
        True,
        description="do not serve the browser playground at / and /playground",
        json_schema_extra=cli("--no-playground", const=False, default="served"),
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")
    claude_model_ids: bool = Field(
        True,
        description="answer every Claude id of the SDKs' model list (served by the default model); false: only "
        "configured names and aliases (no flag; TCSERVE_CLAUDE_MODEL_IDS)",
        json_schema_extra=cli(""),
    )

    @model_validator(mode="before")
    @classmethod
    def _deprecated_seed_variable(cls, data: object) -> object:
        """TCSERVE_SEED_MODEL_IDS was this setting's first name; it keeps working for now."""
        old = os.environ.get("TCSERVE_SEED_MODEL_IDS")
        if old is None or "TCSERVE_CLAUDE_MODEL_IDS" in os.environ or not isinstance(data, dict):
            return data
        logging.getLogger("tcserve").warning(
            "TCSERVE_SEED_MODEL_IDS is deprecated and will be removed: use TCSERVE_CLAUDE_MODEL_IDS"
        )
        return {"claude_model_ids": old, **data}

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):  # TCSERVE_API_KEYS=key1,key2
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value


def load_models(settings: Settings) -> list[ServedModel]:
    """The model table: the config file's, or the embedded default; flags then apply
    to the first (default) model."""
    models: list[ServedModel] = (
        _read_table(settings.config) if settings.config else [LlamaCppModel(name=DEFAULT_MODEL_NAME)]
    )
    first = models[0]
    given = engine_flags(settings)
    overrides = {"context_size": given.pop("context_size")} if "context_size" in given else {}
    if settings.model_path is not None:
        overrides["path"] = settings.model_path
    if isinstance(first, LlamaCppModel):
        overrides.update(given)
    elif "path" in overrides or (given and settings.models_dir is None):
        # Without a folder of models, these flags would silently do nothing.
        named = ", ".join(sorted({*given, *overrides} - {"context_size"}))
        raise ConfigError(f"{named}: these flags apply to a llama.cpp model, the first model is not one")
    else:
        overrides = {k: v for k, v in overrides.items() if k == "context_size"}
    models[0] = first.model_copy(update=overrides)
    _check_unique_ids(models)
    _check_files(models)
    return models


def engine_flags(settings: Settings) -> dict[str, object]:
    """The engine flags given on the command line, as model table fields: they apply to
    the default model and to every model of --models-dir."""
    flags = {
        "context_size": settings.ctx_size,
        "threads": settings.threads,
        "parallel": settings.parallel,
        "max_queue": settings.max_queue,
        "prefix_cache": settings.prefix_cache,
        "prefill_budget": settings.prefill_budget,
        "reuse_generated": settings.reuse_generated,
        "speculative": settings.speculative,
    }
    return {name: value for name, value in flags.items() if value is not None}


def _read_table(path: Path) -> list[ServedModel]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    try:
        table = _ModelTable.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"config file {path}: {validation_message(error.errors())}") from None
    return [_resolve_relative(m, path.parent) for m in table.models]


def _resolve_relative(model: ServedModel, base: Path) -> ServedModel:
    if not isinstance(model, LlamaCppModel):
        return model
    update: dict[str, object] = {}
    if model.path is not None and not model.path.is_absolute():
        update["path"] = base / model.path
    if model.chat_template is not None and not model.chat_template_is_inline:
        update["chat_template"] = str(base / model.chat_template)  # an absolute one stays as it is
    return model.model_copy(update=update)


def _check_unique_ids(models: list[ServedModel]) -> None:
    seen: set[str] = set()
    for model in models:
        for model_id in (model.name, *model.aliases):
            if model_id in seen:
                raise ConfigError(f"model id {model_id!r} is declared twice in the model table")
            seen.add(model_id)


def _check_files(models: list[ServedModel]) -> None:
    for model in models:
        if isinstance(model, LlamaCppModel) and model.path is not None and not model.path.is_file():
            raise ConfigError(f"model {model.name!r}: no such GGUF file: {model.path}")
        if isinstance(model, LlamaCppModel) and _missing_template_file(model):
            raise ConfigError(f"model {model.name!r}: no such chat template file: {model.chat_template}")
        if isinstance(model, UpstreamModel) and model.api_key_env and not os.environ.get(model.api_key_env):
            raise ConfigError(f"model {model.name!r}: the environment variable {model.api_key_env} is not set")


def _missing_template_file(model: LlamaCppModel) -> bool:
    template = model.chat_template
    return template is not None and not model.chat_template_is_inline and not Path(template).is_file()


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
