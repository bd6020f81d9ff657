"""A thin, typed layer over llama-cpp-python's ctypes bindings: the only module that
touches llama.cpp pointers. Everything here runs on the engine's worker thread,
except `Vocab.tokenize` and `Vocab.piece`, which only read the vocabulary.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from tcserve.engines.llamacpp import pages
from tcserve.errors import EngineFailure

if TYPE_CHECKING:
    import llama_cpp.llama_cpp as llama

log = logging.getLogger("tcserve.llamacpp")


def _bindings() -> ModuleType:
    """llama-cpp-python's ctypes bindings (`llama_cpp.llama_cpp`), loaded without the
    package's `__init__`, which also imports its high-level `Llama` (jinja2, diskcache
    and more), code the server never uses: 3.4 MiB less peak RSS for a 16-slot server
    after three grounded requests (VmHWM 700.5 against 703.9 MiB; 10.7 MiB in a bare
    interpreter, where nothing else shares those imports). The package is put in
    `sys.modules` only while the bindings load, so a later `import llama_cpp` (a
    benchmark's tokenizer) runs the real package, which reuses them."""
    if "llama_cpp" in sys.modules:
        return importlib.import_module("llama_cpp.llama_cpp")
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("llama-cpp-python is not installed")
    sys.modules["llama_cpp"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module("llama_cpp.llama_cpp")
    finally:
        del sys.modules["llama_cpp"]


llama = _bindings()


def _forward_ggml_log(level: int, text: bytes, _user: object) -> None:
    # llama-cpp-python drops ggml's messages when verbose is off, errors included;
    # ours keeps errors and warnings and puts the chatter at debug.
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        log.log(logging.ERROR if level == 4 else logging.WARNING if level == 3 else logging.DEBUG, message)


_LOG_CALLBACK = llama.llama_log_callback(_forward_ggml_log)  # ctypes needs it kept alive

_CREATING = threading.Lock()
"""One model load and context creation at a time: the memory that a creation maps is
told apart from other threads' by when it appeared (`pages.give_back_zero_pages`)."""


@dataclass(frozen=True)
class ChatMetadata:
    template: str | None
    bos_token: str
    eos_token: str


class Vocab:
    def __init__(self, vocab: llama.llama_vocab_p) -> None:
        self._vocab = vocab
        self.native = vocab
        self.size: int = llama.llama_vocab_n_tokens(vocab)

    def tokenize(self, text: str, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids as the model is fed them: BOS first (when the model wants one and
        `add_bos`). `parse_special` turns special-token text (`<|im_end|>`) into its
        token, for a rendered chat template; raw prompts keep it as plain text."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama.llama_token * capacity)()
        count = llama.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_bos, parse_special)
        if count < 0:  # a negative count is the size it needs
            capacity = -count
            buffer = (llama.llama_token * capacity)()
            count = llama.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_bos, parse_special)
        return list(buffer[:count])

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary stores it (`<bos>`); "" for no token (-1)."""
        if token < 0:
            return ""
        text = llama.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def piece(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        size = llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:size]

    def is_end(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._vocab, token))


@dataclass(frozen=True)
class ContextParams:
    slots: int
    """Sequences decoded together (llama.cpp's n_seq_max)."""
    slot_context: int
    """Tokens of KV cache for each sequence; the context a request may use."""
    batch_tokens: int
    """Most tokens one llama_decode takes (n_batch = n_ubatch)."""
    threads: int


class Model:
    """A loaded GGUF file and one context with `slots` independent sequences.

    The KV cache is not unified: each sequence owns `slot_context` cells, so a
    request's limit is fixed and one busy sequence can never starve another of
    cache (a unified cache would share it and could run out mid-generation).
    Sliding-window layers (Gemma 3's, window 512) keep only their window and one
    batch: llama.cpp sizes that cache as 512 + n_ubatch cells a sequence, rounded
    up to 256 (768 cells with batches of at most 256 tokens), instead of the whole
    history (`swa_full`): 300 MiB less for Gemma 3 270M at 16 x 2048. A cached
    prefix can then be kept only while the window before it is still held
    (`window`, `earliest`; the scheduler checks).

    llama.cpp clears the cache when it creates the context, which makes all of it
    resident; those zero pages are given back, and the GGUF's pages until the first
    decode (`pages.py`), so memory grows with the cells sequences write.
    """

    def __init__(self, path: Path, params: ContextParams) -> None:
        llama.llama_log_set(_LOG_CALLBACK, None)
        llama.llama_backend_init()
        if not path.is_file():
            raise EngineFailure(f"model file not found: {path}")
        with _CREATING:
            model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
            if not model:
                raise EngineFailure(f"llama.cpp could not load {path} (not a GGUF model it supports?)")
            # The peak of a load is the model's pages and the freshly cleared cache
            # together: both are given back until they are used (`pages.py`).
            pages.drop_file_pages(path)
            before = pages.anonymous_ranges()
            context = llama.llama_init_from_model(model, _context_params(params))
            if not context:
                llama.llama_model_free(model)
                raise EngineFailure(f"llama.cpp could not create a context of {params.slots} x {params.slot_context}")
            given_back = pages.give_back_zero_pages(before)
        log.debug("gave back %.1f MiB of the new context's zero pages", given_back / 2**20)
        self._model = model
        self._ctx = context
        self._memory = llama.llama_get_memory(context)
        self.vocab = Vocab(llama.llama_model_get_vocab(model))
        self.slot_context: int = llama.llama_n_ctx_seq(context)
        self.batch = Batch(params.batch_tokens)
        self.window: int = max(0, int(llama.llama_model_n_swa(model)))
        """Tokens a sliding-window layer attends to (0: the model has none)."""

    def chat_metadata(self) -> ChatMetadata:
        """The GGUF's `tokenizer.chat_template` (None without one) and its BOS/EOS texts."""
        template = llama.llama_model_chat_template(self._model, None)
        vocab = self.vocab
        return ChatMetadata(
            template=template.decode("utf-8") if template else None,
            bos_token=vocab.token_text(llama.llama_vocab_bos(vocab.native)),
            eos_token=vocab.token_text(llama.llama_vocab_eos(vocab.native)),
        )

    def metadata(self, key: str) -> str | None:
        """One GGUF metadata value as text (llama.cpp's `llama_model_meta_val_str`)."""
        size = 256
        while True:
            buffer = ctypes.create_string_buffer(size)
            length = llama.llama_model_meta_val_str(self._model, key.encode(), buffer, size)
            if length < 0:
                return None
            if length < size:
                return buffer.value.decode("utf-8", errors="replace")
            size = length + 1

    def decode(self) -> int:
        """Run the filled batch; 0 on success (llama_decode's own status otherwise)."""
        return int(llama.llama_decode(self._ctx, self.batch.native))

    def logits(self, batch_index: int) -> npt.NDArray[np.float32]:
        """The logit row of a token that asked for one, as a view (valid until the next decode)."""
        pointer = llama.llama_get_logits_ith(self._ctx, batch_index)
        return np.ctypeslib.as_array(pointer, shape=(self.vocab.size,))

    def forget(self, slot: int, from_position: int = 0) -> None:
        """Drop a sequence's cache from `from_position` on (0: all of it)."""
        llama.llama_memory_seq_rm(self._memory, slot, from_position, -1)

    def earliest(self, slot: int) -> int:
        """The earliest position whose cache the sequence still holds in every layer (-1: none)."""
        return int(llama.llama_memory_seq_pos_min(self._memory, slot))

    def copy(self, source: int, target: int) -> None:
        """Copy a whole sequence's cache (a partial copy asserts on a split cache)."""
        llama.llama_memory_seq_rm(self._memory, target, 0, -1)
        llama.llama_memory_seq_cp(self._memory, source, target, -1, -1)

    def close(self) -> None:
        self.batch.close()
        llama.llama_free(self._ctx)
        llama.llama_model_free(self._model)


def _context_params(params: ContextParams) -> llama.llama_context_params:
    native = llama.llama_context_default_params()
    native.n_ctx = params.slot_context * params.slots
    native.n_batch = native.n_ubatch = params.batch_tokens
    native.n_seq_max = params.slots
    native.n_threads = native.n_threads_batch = params.threads
    native.kv_unified = False
    native.swa_full = False
    return native  # type: ignore[no-any-return]


class Batch:
    """A reusable llama_batch: fill with `add`, run with `Model.decode`, then `clear`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.native = llama.llama_batch_init(capacity, 0, 1)
        self.size = 0

    def add(self, token: int, position: int, slot: int, wants_logits: bool) -> int:
        """Append a token; returns its index in the batch (for `Model.logits`)."""
        index = self.size
        if index >= self.capacity:  # llama_batch has no bounds of its own: this would write past it
            raise IndexError(f"a llama batch of {self.capacity} tokens is full")
        native = self.native
        native.token[index] = token
        native.pos[index] = position
        native.n_seq_id[index] = 1
        native.seq_id[index][0] = slot
        native.logits[index] = wants_logits
        self.size += 1
        native.n_tokens = self.size
        return index

    def clear(self) -> None:
        self.size = 0
        self.native.n_tokens = 0

    def close(self) -> None:
        llama.llama_batch_free(self.native)
