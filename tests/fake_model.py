"""A fake of `engines.llamacpp.model.Model` for the scheduler's tests: no weights, no llama.cpp.

It keeps what llama.cpp keeps, one token list per sequence ("slot"), and checks what
llama.cpp would reject: a token must sit right after its sequence's cached tokens and
inside the slot's context. Its next token is a hash of everything its sequence has
cached, so a wrong cache (a bad copy, a missed trim, a stale prefix) changes the text.

The vocabulary is bytes: BOS, EOS, then one token per byte value, so a character of
two or more UTF-8 bytes always spans tokens.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tcserve.engines.llamacpp.speculation import ubatches

BOS = 0
EOS = 1
_BYTE0 = 2
VOCAB_SIZE = _BYTE0 + 256

NextToken = Callable[[Sequence[int]], int]
"""The fake model's "weights": the next token after a sequence's whole cache."""

_PLAIN = b"abcdefghijklmnopqrstuvwxyz "


def token_of(byte: int) -> int:
    return _BYTE0 + byte


def tokens_of(text: str) -> list[int]:
    """The tokens of `text` without BOS (a prompt's tokens are `[BOS, *tokens_of(text)]`)."""
    return [token_of(byte) for byte in text.encode("utf-8")]


def hashed(context: Sequence[int]) -> int:
    """The default weights: a plain letter picked by a hash of the whole sequence and its length."""
    digest = zlib.crc32(np.asarray(context, dtype=np.int32).tobytes(), len(context))
    return token_of(_PLAIN[digest % len(_PLAIN)])


def replying(reply: str, after: str = "A:") -> NextToken:
    """Weights that answer `reply` (then EOS) after the last `after` in the sequence."""
    marker, answer = tokens_of(after), tokens_of(reply)

    def next_token(context: Sequence[int]) -> int:
        ends = [
            i + len(marker) for i in range(len(context) - len(marker) + 1) if context[i : i + len(marker)] == marker
        ]
        if not ends:
            return hashed(context)
        done = len(context) - ends[-1]
        return answer[done] if done < len(answer) else EOS

    return next_token


class FakeVocab:
    size = VOCAB_SIZE

    def tokenize(self, text: str) -> list[int]:
        return [BOS, *tokens_of(text)]

    def piece(self, token: int) -> bytes:
        return bytes([token - _BYTE0]) if token >= _BYTE0 else b""

    def is_end(self, token: int) -> bool:
        return token == EOS


@dataclass(frozen=True)
class Entry:
    token: int
    position: int
    slot: int
    wants_logits: bool


def _rows_per_slot(entries: list[Entry]) -> list[tuple[int, int]]:
    counts: dict[int, int] = {}
    for entry in entries:
        counts[entry.slot] = counts.get(entry.slot, 0) + 1
    return sorted(counts.items())


class FakeBatch:
    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def add(self, token: int, position: int, slot: int, wants_logits: bool) -> int:
        self.entries.append(Entry(token, position, slot, wants_logits))
        return len(self.entries) - 1

    def clear(self) -> None:
        self.entries = []


class FakeModelError(AssertionError):
    """The scheduler asked for something that llama.cpp would refuse or corrupt."""


class FakeModel:
    def __init__(
        self,
        *,
        slots: int,
        slot_context: int = 64,
        next_token: NextToken = hashed,
        step_seconds: Callable[[int], float] = lambda rows: 0.01,
        window: int = 0,
        cells: int | None = None,
    ) -> None:
        self.vocab = FakeVocab()
        self.slot_context = slot_context
        self.batch = FakeBatch()
        self.caches: list[list[int]] = [[] for _ in range(slots)]
        """What each sequence's KV cache holds, position by position."""
        self.decoded: list[list[Entry]] = []
        """Every batch that `decode` ran (failed ones included), in order."""
        self.copies: list[tuple[int, int]] = []
        self.fail_next: int = 0
        """A status for the next `decode` to return (nothing is computed then); 0: succeed."""
        self._next_token = next_token
        self._rows: dict[int, npt.NDArray[np.float32]] = {}
        self._step_seconds = step_seconds
        self.window = window
        """Like a sliding-window layer: a token at p needs the cache of p - window .. p - 1."""
        self._cells = cells
        """With a window: the positions a sequence holds (its latest ones); None: all."""
        self._held_from = [0] * slots
        self.seconds = 0.0
        """A clock that each `decode` advances by what its passes cost: `step_seconds(rows)`
        for each, one pass per run of consecutive slots, as llama.cpp makes them
        (`speculation.ubatches`)."""

    def decode(self) -> int:
        entries = list(self.batch.entries)
        self.decoded.append(entries)
        self.seconds += sum(self._step_seconds(one.rows) for one in ubatches(_rows_per_slot(entries)))
        self._rows = {}
        if status := self.fail_next:
            self.fail_next = 0
            return status
        for index, entry in enumerate(entries):
            cache = self.caches[entry.slot]
            if entry.position != len(cache):
                raise FakeModelError(f"slot {entry.slot}: token at {entry.position} after {len(cache)} cached")
            if entry.position >= self.slot_context:
                raise FakeModelError(f"slot {entry.slot}: position {entry.position} past the context")
            if self.window and max(0, entry.position - self.window) < self._held_from[entry.slot]:
                raise FakeModelError(f"slot {entry.slot}: position {entry.position} attends to dropped positions")
            cache.append(entry.token)
            if entry.wants_logits:
                self._rows[index] = self._logit_row(self._next_token(cache))
        if self._cells is not None:  # llama.cpp drops what fell out of the window after the batch
            for slot, cache in enumerate(self.caches):
                self._held_from[slot] = max(self._held_from[slot], len(cache) - self._cells)
        return 0

    def earliest(self, slot: int) -> int:
        return self._held_from[slot] if self.caches[slot] else -1

    def logits(self, batch_index: int) -> npt.NDArray[np.float32]:
        if batch_index not in self._rows:
            raise FakeModelError(f"no logits for batch index {batch_index}")
        return self._rows[batch_index]

    def forget(self, slot: int, from_position: int = 0) -> None:
        del self.caches[slot][from_position:]
        if not self.caches[slot]:
            self._held_from[slot] = 0

    def copy(self, source: int, target: int) -> None:
        self.copies.append((source, target))
        self.caches[target] = list(self.caches[source])
        self._held_from[target] = self._held_from[source]

    @staticmethod
    def _logit_row(token: int) -> npt.NDArray[np.float32]:
        row = np.zeros(VOCAB_SIZE, dtype=np.float32)
        row[token] = 10.0
        return row
