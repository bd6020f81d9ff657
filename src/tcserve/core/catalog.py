"""Which model ids the server answers to, and which configured model serves each.

Every Claude id of the SDKs' model list (the Go SDK's `Model` constants), and
the Text Completions era's ids (`claude-2.1`, `claude-instant-1.2`, ...), are
accepted out of the box and served by the default (first) model, unless the
model table claims that id itself. An
id nobody claims is a `ModelNotFound`: there is no silent fallback.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from tcserve.config import ServedModel
from tcserve.core.folder import ModelFolder
from tcserve.errors import ModelNotFound

# id -> (display name, created_at date). The date is the one in the id or in its
# dated sibling; claude-opus-4-6 has no dated sibling and counts as newest (ours).
CLAUDE_MODELS: dict[str, tuple[str, str]] = {
    "claude-opus-4-6": ("Claude Opus 4.6", "2026-02-01"),
    "claude-opus-4-5-20251101": ("Claude Opus 4.5", "2025-11-01"),
    "claude-opus-4-5": ("Claude Opus 4.5", "2025-11-01"),
    "claude-3-7-sonnet-latest": ("Claude Sonnet 3.7", "2025-02-19"),
    "claude-3-7-sonnet-20250219": ("Claude Sonnet 3.7", "2025-02-19"),
    "claude-3-5-haiku-latest": ("Claude Haiku 3.5", "2024-10-22"),
    "claude-3-5-haiku-20241022": ("Claude Haiku 3.5", "2024-10-22"),
    "claude-haiku-4-5": ("Claude Haiku 4.5", "2025-10-01"),
    "claude-haiku-4-5-20251001": ("Claude Haiku 4.5", "2025-10-01"),
    "claude-sonnet-4-20250514": ("Claude Sonnet 4", "2025-05-14"),
    "claude-sonnet-4-0": ("Claude Sonnet 4", "2025-05-14"),
    "claude-4-sonnet-20250514": ("Claude Sonnet 4", "2025-05-14"),
    "claude-sonnet-4-5": ("Claude Sonnet 4.5", "2025-09-29"),
    "claude-sonnet-4-5-20250929": ("Claude Sonnet 4.5", "2025-09-29"),
    "claude-opus-4-0": ("Claude Opus 4", "2025-05-14"),
    "claude-opus-4-20250514": ("Claude Opus 4", "2025-05-14"),
    "claude-4-opus-20250514": ("Claude Opus 4", "2025-05-14"),
    "claude-opus-4-1-20250805": ("Claude Opus 4.1", "2025-08-05"),
    "claude-3-opus-latest": ("Claude Opus 3", "2024-02-29"),
    "claude-3-opus-20240229": ("Claude Opus 3", "2024-02-29"),
    "claude-3-haiku-20240307": ("Claude Haiku 3", "2024-03-07"),
}

# The ids of the Text Completions era, which legacy code still sends (LiteLLM's
# `anthropic_text` provider, for one, knows only claude-2 and claude-instant-1):
# id -> (display name, the release date of that version).
LEGACY_MODELS: dict[str, tuple[str, str]] = {
    "claude-2.1": ("Claude 2.1", "2023-11-21"),
    "claude-2.0": ("Claude 2.0", "2023-07-11"),
    "claude-2": ("Claude 2", "2023-07-11"),
    "claude-instant-1.2": ("Claude Instant 1.2", "2023-08-09"),
    "claude-instant-1.1": ("Claude Instant 1.1", "2023-03-14"),
    "claude-instant-1": ("Claude Instant 1", "2023-03-14"),
}


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One id as /v1/models lists it, and the configured model behind it."""

    id: str
    display_name: str
    created_at: datetime
    served_by: ServedModel


class Catalog:
    def __init__(self, entries: Sequence[ModelEntry], folder: ModelFolder | None = None) -> None:
        self._by_id: dict[str, ModelEntry] = {}
        self.entries: list[ModelEntry] = []
        self._add(entries)
        self._folder = folder
        self._scanned = time.monotonic()

    def _add(self, entries: Sequence[ModelEntry]) -> None:
        self._by_id.update({entry.id: entry for entry in entries})
        # Newest first, ties by id (docs/wire.md, "Models").
        self.entries = sorted(self._by_id.values(), key=lambda e: e.id)
        self.entries.sort(key=lambda e: e.created_at, reverse=True)

    def rescan(self, *, unless_within: float = 0.0) -> None:
        """Learn the files added to --models-dir since the last scan (a directory
        listing: cheap, but /v1/models skips it when the last one is recent)."""
        if self._folder is None or time.monotonic() - self._scanned < unless_within:
            return
        self._scanned = time.monotonic()
        self._add([entry for model in self._folder.scan() for entry in _entry(model, datetime.now(UTC))])

    def models(self) -> list[ServedModel]:
        """Every model that serves an id, once each, in the table's order then the folder's."""
        return list({id(entry.served_by): entry.served_by for entry in self._by_id.values()}.values())

    @classmethod
    def build(
        cls,
        models: Sequence[ServedModel],
        created: dict[str, datetime],
        *,
        claude_ids: bool = True,
        folder: ModelFolder | None = None,
    ) -> Catalog:
        """`created` gives each configured model's fallback date (its file's date).
        The folder's models at start-up come after the table's (`folder.first_scan`)."""
        folder_models = folder.first_scan() if folder is not None else []
        entries: list[ModelEntry] = []
        for model in [*models, *folder_models]:
            entries += _entry(model, created.get(model.name) or datetime.now(UTC))
        if claude_ids:
            claimed = {entry.id for entry in entries}
            for model_id, (shown, day) in {**CLAUDE_MODELS, **LEGACY_MODELS}.items():
                if model_id not in claimed:
                    when = datetime.fromisoformat(day).replace(tzinfo=UTC)
                    entries.append(ModelEntry(model_id, shown, when, models[0]))
        return cls(entries, folder)

    def resolve(self, model_id: str) -> ModelEntry:
        """The id's entry; an unknown id first looks for a file just added to the folder."""
        if model_id not in self._by_id:
            self.rescan()
        try:
            return self._by_id[model_id]
        except KeyError:
            raise ModelNotFound(model_id) from None

    def find(self, model_id: str) -> ModelEntry | None:
        return self._by_id.get(model_id)

    def index_of(self, model_id: str) -> int | None:
        entry = self._by_id.get(model_id)
        return None if entry is None else self.entries.index(entry)


def _entry(model: ServedModel, fallback: datetime) -> list[ModelEntry]:
    when = model.created_at or fallback
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    shown = model.display_name or model.name
    return [ModelEntry(i, shown, when, model) for i in (model.name, *model.aliases)]
