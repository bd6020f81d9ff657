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
import secrets
import time
import tomllib
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tcserve.config import ConfigError

log = logging.getLogger("tcserve.keys")
KEY_PREFIX = "sk-tc-"
_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


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


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(40))


def unlimited(key: str, index: int) -> KeyRecord:
    """A key from the command line: every model, no limits."""
    return KeyRecord(name=f"cli-key-{index}", sha256=digest(key))


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

    Each request costs one `stat`; the file is read again when that shows a
    change, or when it was modified in the last few seconds (file timestamps can
    be too coarse to tell two quick writes apart), and parsed again only when
    its bytes differ. A configured keys file always means keys are required,
    even while it holds none or is missing (then only command-line keys get in):
    emptying or deleting the file locks everybody out rather than opening the
    server. A file that turns out unreadable or invalid is logged, and the keys
    read before stay in force.
    """

    def __init__(self, path: Path | None, fixed: Iterable[KeyRecord] = ()) -> None:
        self.path = path
        self.fixed = tuple(fixed)
        self._stat = _stat(path) if path else None
        self._text = _text(path) if path else None
        self._ring = KeyRing([*(read_keys(path) if path else []), *self.fixed])  # at start, errors are fatal

    @property
    def required(self) -> bool:
        return self.path is not None or bool(self.fixed)

    def current(self) -> KeyRing:
        if self.path is None:
            return self._ring
        stat = _stat(self.path)
        if stat == self._stat and not _recently_modified(stat):
            return self._ring
        self._stat, text = stat, _text(self.path)
        if text == self._text:
            return self._ring
        self._text = text
        try:
            self._ring = KeyRing([*read_keys(self.path), *self.fixed])
        except ConfigError as error:
            log.error("%s; keeping the %d keys read before", error, len(self._ring.records))
        else:
            log.info("keys file %s changed: %d keys", self.path, len(self._ring.records))
        return self._ring


_RECENT_NS = 3 * 10**9


def _stat(path: Path) -> tuple[int, ...] | None:
    """Inode, size and times (None: the file does not exist)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    except OSError:
        return (-1,)  # unreadable now: read_keys will say why
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _recently_modified(stat: tuple[int, ...] | None) -> bool:
    return stat is not None and len(stat) == 4 and time.time_ns() - max(stat[2], stat[3]) < _RECENT_NS


def _text(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def read_keys(path: Path) -> list[KeyRecord]:
    if not path.exists():
        return []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return _KeysFile.model_validate(data).keys
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"keys file {path}: {error}") from None
    except ValidationError as error:
        first = error.errors()[0]
        raise ConfigError(f"keys file {path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


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
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)
