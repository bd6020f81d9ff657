"""API keys with names, model permissions and per-minute limits, kept in a TOML file.

Keys are stored as SHA-256 hashes, never in clear: `tcserve keys add` prints a
new key once. Keys given with --api-key / TCSERVE_API_KEYS keep working as
unlimited keys for every model. A running server re-reads the file when it
changes, so `tcserve keys add|revoke` applies from the next request on.

    [[keys]]
    name = "alice"
    sha256 = "9f86d08..."
    models = ["claude-sonnet-4-5"]     # absent: every model
    requests_per_minute = 60           # absent: no limit
    input_tokens_per_minute = 100000
    output_tokens_per_minute = 20000
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import tomllib
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tcserve.clock import iso_z
from tcserve.config import ConfigError
from tcserve.errors import validation_message
from tcserve.ids import random_base58

log = logging.getLogger("tcserve.keys")
KEY_PREFIX = "sk-tc-"
CLI_KEY_PREFIX = "cli-key-"


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    models: tuple[str, ...] | None = None
    requests_per_minute: int | None = Field(None, ge=1)
    input_tokens_per_minute: int | None = Field(None, ge=1)
    output_tokens_per_minute: int | None = Field(None, ge=1)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def allows(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyRecord] = []

    @model_validator(mode="after")
    def _names_are_unique(self) -> _KeysFile:
        seen: list[KeyRecord] = []
        for record in self.keys:
            check_new_name(record.name, seen)
            seen.append(record)
        return self


def check_new_name(name: str, existing: Iterable[KeyRecord]) -> None:
    """Limits are kept per name: two keys with one name would share (and fight over)
    them, and so would a key named like the command line's keys."""
    if any(record.name == name for record in existing):
        raise ValueError(f"a key named {name!r} exists already")
    if name.startswith(CLI_KEY_PREFIX):
        raise ValueError(f"key name {name!r}: names starting with {CLI_KEY_PREFIX!r} are for --api-key keys")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + random_base58(40)


def unlimited(key: str, index: int) -> KeyRecord:
    """A key from the command line: every model, no limits."""
    return KeyRecord(name=f"{CLI_KEY_PREFIX}{index}", sha256=digest(key))


class KeyRing:
    """Finds the record of a presented key by comparing hashes in constant time."""

    def __init__(self, records: Iterable[KeyRecord]) -> None:
        self.records = tuple(records)
        self._digests = tuple(bytes.fromhex(r.sha256) for r in self.records)

    def find(self, presented: str) -> KeyRecord | None:
        wanted = hashlib.sha256(presented.encode()).digest()
        found = None
        for record, stored in zip(self.records, self._digests, strict=True):
            if hmac.compare_digest(wanted, stored):  # no early exit: every hash is compared
                found = record
        return found


class KeySource:
    """The keys a server accepts: the keys file's, re-read whenever the file
    changes, and the command line's.

    Each request costs one `stat`. The file is read again when that shows a
    change, and also while it was modified shortly before our last read (file
    timestamps can be too coarse to tell two quick writes apart: git's "racy"
    files); it is parsed again only when its bytes differ. A configured keys file
    always means keys are required, even while it holds none or is missing (then
    only command-line keys get in): emptying or deleting the file locks everybody
    out rather than opening the server. A file that turns out unreadable or
    invalid is logged, and the keys read before stay in force.
    """

    def __init__(self, path: Path | None, fixed: Iterable[KeyRecord] = ()) -> None:
        self.path = path
        self.fixed = tuple(fixed)
        self._stat: tuple[int, ...] | None = None
        self._read_ns = 0
        self._data: bytes | None = None
        records: list[KeyRecord] = []
        if path is not None:  # at start, errors are fatal
            self._stat, self._read_ns, self._data = _stat(path), time.time_ns(), _read(path)
            records = _parse(self._data, path)
        self._ring = KeyRing([*records, *self.fixed])

    @property
    def required(self) -> bool:
        return self.path is not None or bool(self.fixed)

    def current(self) -> KeyRing:
        if self.path is None:
            return self._ring
        stat = _stat(self.path)
        if stat == self._stat and not self._racy(stat):
            return self._ring
        self._stat, self._read_ns = stat, time.time_ns()
        try:
            data = _read(self.path)
            if data == self._data:
                return self._ring
            self._data = data
            self._ring = KeyRing([*_parse(data, self.path), *self.fixed])
        except ConfigError as error:
            log.error("%s; keeping the %d keys read before", error, len(self._ring.records))
        else:
            log.info("keys file %s changed: %d keys", self.path, len(self._ring.records))
        return self._ring

    def _racy(self, stat: tuple[int, ...] | None) -> bool:
        """Modified so shortly before our last read that a later write could look the same."""
        return stat is not None and len(stat) == 4 and max(stat[2], stat[3]) >= self._read_ns - _RACY_NS


_RACY_NS = 3 * 10**9


def _stat(path: Path) -> tuple[int, ...] | None:
    """Inode, size and times (None: the file does not exist)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    except OSError:
        return (-1,)  # unreadable now: _read will say why
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _read(path: Path) -> bytes | None:
    """The file's bytes, None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(f"keys file {path}: {error}") from None


def _parse(data: bytes | None, path: Path) -> list[KeyRecord]:
    if data is None:
        return []
    try:
        return _KeysFile.model_validate(tomllib.loads(data.decode("utf-8"))).keys
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"keys file {path}: {error}") from None
    except ValidationError as error:
        raise ConfigError(f"keys file {path}: {validation_message(error.errors())}") from None


def read_keys(path: Path) -> list[KeyRecord]:
    return _parse(_read(path), path)


def write_keys(path: Path, records: Iterable[KeyRecord]) -> None:
    lines = ["# tcserve keys: SHA-256 hashes only; `tcserve keys add` prints a new key once.", ""]
    for record in records:
        lines.append("[[keys]]")
        for field, value in record.model_dump(exclude_none=True).items():
            lines.append(f"{field} = {_toml(value)}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text("\n".join(lines), encoding="utf-8")
    temporary.chmod(0o600)
    temporary.replace(path)


def _toml(value: object) -> str:
    if isinstance(value, datetime):
        return iso_z(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)
