"""What the batching scheduler needs of a model: the seam between scheduling and llama.cpp.

`native.Model` is the real one; `tests/fake_model.py` is a few lines of Python with
the same shape, so the scheduler's policies (slot choice, prefix reuse, the prefill
budget, cancellation, context checks) are tested in milliseconds without weights.
Members are read-only properties so that plain attributes satisfy them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt


class Vocab(Protocol):
    def tokenize(self, text: str) -> list[int]:
        """Token ids as the model is fed them (BOS first when the model wants one)."""
        ...

    def piece(self, token: int) -> bytes:
        """A token's bytes; one character may be split over several tokens."""
        ...

    def is_end(self, token: int) -> bool:
        """Whether the token ends a generation (end of sequence or of turn)."""
        ...


class Batch(Protocol):
    def add(self, token: int, position: int, slot: int, wants_logits: bool) -> int:
        """Append a token of sequence `slot` at `position`; returns its index in the batch."""
        ...

    def clear(self) -> None: ...


class Model(Protocol):
    """One context with independent sequences ("slots"), each with its own KV cache."""

    @property
    def vocab(self) -> Vocab: ...

    @property
    def slot_context(self) -> int:
        """Tokens of cache in each sequence."""
        ...

    @property
    def batch(self) -> Batch:
        """The one batch that `decode` runs."""
        ...

    def decode(self) -> int:
        """Run the filled batch; 0 on success."""
        ...

    def logits(self, batch_index: int) -> npt.NDArray[np.float32]:
        """The logit row of a token added with `wants_logits` (valid until the next decode)."""
        ...

    @property
    def window(self) -> int:
        """Tokens a sliding-window layer attends to; 0 when the model has none."""
        ...

    def earliest(self, slot: int) -> int:
        """The earliest position a sequence's cache still holds in every layer (-1: none).
        Sliding-window layers drop what falls out of their window, so a sequence can
        go on from position p only if `max(0, p - window) >= earliest`."""
        ...

    def forget(self, slot: int, from_position: int = 0) -> None:
        """Drop a sequence's cache from `from_position` on."""
        ...

    def copy(self, source: int, target: int) -> None:
        """Replace `target`'s cache with the whole of `source`'s."""
        ...
