"""A folder of GGUF files (`--models-dir`): which file is served under which name.

The rule, documented in the README ("A folder of models"): every `*.gguf` file
directly in the folder (not in subfolders; the extension in any case) is served
under its file name without the extension, lowercased, with every character
other than `a-z 0-9 . _ -` replaced by `-`. `Qwen2.5 0.5B Instruct.Q4_K_M.gguf`
is `qwen2.5-0.5b-instruct.q4_k_m`. Two files with one name, or a file named like
a configured model id, are a start-up error; a file added later whose name is
taken is skipped with a warning (the server is running: nothing to refuse).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

from tcserve.config import ConfigError, LlamaCppModel

log = logging.getLogger("tcserve")

_NOT_IN_NAMES = re.compile(r"[^a-z0-9._-]")


def model_name(file_name: str) -> str:
    return _NOT_IN_NAMES.sub("-", file_name[: -len(".gguf")].lower())


class ModelFolder:
    """The folder's models, each a copy of `template` with its own name, path and
    keep_alive. `scan` finds the files added since the last scan."""

    def __init__(self, path: Path, template: LlamaCppModel, keep_alive: float, taken: Collection[str]) -> None:
        self.path = path
        self._template = template
        self._keep_alive = keep_alive
        self._taken = set(taken)
        self._known: dict[Path, str] = {}

    def first_scan(self) -> list[LlamaCppModel]:
        """The models found at start-up; collisions are a `ConfigError`."""
        if not self.path.is_dir():
            raise ConfigError(f"--models-dir {self.path}: no such folder")
        found: dict[str, Path] = {}
        for file in self._gguf_files():
            name = model_name(file.name)
            if name in self._taken or name in found:
                other = found.get(name)
                clash = f"file {other.name}" if other else "a configured model id"
                raise ConfigError(f"--models-dir: {file.name} would be served as {name!r}, like {clash}")
            found[name] = file
        return self._adopt(found)

    def scan(self) -> list[LlamaCppModel]:
        """The models of files added since the last scan (a cheap directory listing)."""
        found: dict[str, Path] = {}
        for file in self._gguf_files():
            if file in self._known:
                continue
            name = model_name(file.name)
            if name in self._taken or name in found:
                log.warning("--models-dir: %s is not served: the name %r is taken", file.name, name)
                self._known[file] = name
                continue
            found[name] = file
        return self._adopt(found)

    def _adopt(self, found: dict[str, Path]) -> list[LlamaCppModel]:
        models = []
        for name, file in found.items():
            self._known[file] = name
            self._taken.add(name)
            created = datetime.fromtimestamp(file.stat().st_mtime, tz=UTC)
            fields = {"name": name, "path": file, "keep_alive": self._keep_alive, "created_at": created}
            models.append(self._template.model_copy(update=fields))
            log.info("--models-dir: serving %s as %r (loaded on its first request)", file.name, name)
        return models

    def _gguf_files(self) -> list[Path]:
        try:
            entries = sorted(self.path.iterdir())
        except OSError as error:
            log.warning("--models-dir %s cannot be read: %s", self.path, error.strerror)
            return []
        return [entry for entry in entries if entry.name.lower().endswith(".gguf") and entry.is_file()]
