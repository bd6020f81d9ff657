"""The engines a server runs, keyed by model name: loading them (at start-up, or
on a model's first request), lending them to requests, unloading idle ones, and
closing them.

Each model is in one of four states: `unloaded`, `loading`, `ready` or `failed`.

- A request takes a `Lease` (`acquire`) and gives it back when its stream ends.
  A model with no lease out is idle.
- A model that is not loaded is loaded by the first request for it; requests
  that come meanwhile wait for the same load (one load, however many ask). A
  request waits up to `load_timeout` seconds, then gets 529 with `retry-after`
  while the load goes on (the SDKs retry). It waits *before* its response
  starts: a broken file, a model that cannot fit, or a prompt too long for the
  model's context are only known once the model is loaded, and they must still
  get their real status rather than an SSE `error` event after a 200.
- A model idle for its `keep_alive` seconds is unloaded (-1: never; configured
  models are kept for ever unless their table entry says otherwise).
- With `max_loaded` set, loading one more local model first unloads the least
  recently used idle model that is not kept for ever; when every loaded model
  is busy the request gets 529, and when the models kept for ever fill the
  budget it gets 500 `ModelUnavailable` naming them. Upstream models hold no
  local memory and do not count.
- A model that failed to load answers 500 naming it; the others keep serving.
- While the server drains every new request gets 529.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from tcserve.config import ServedModel, UpstreamModel
from tcserve.engines.base import Engine
from tcserve.errors import EngineNotReady, ModelUnavailable, Overloaded

log = logging.getLogger("tcserve")

ModelState = Literal["unloaded", "loading", "ready", "failed"]
EngineFactory = Callable[[ServedModel], Engine]


@dataclass
class LoadCounts:
    """Per model, for /metrics."""

    loads: int = 0
    load_seconds: float = 0.0
    """Summed over every load that succeeded."""
    unloads: dict[str, int] = field(default_factory=dict)
    """By reason: idle, evicted."""


@dataclass
class _Slot:
    model: ServedModel
    configured: bool
    """From the model table (loaded at start-up, /health waits for it)."""
    engine: Engine | None = None
    loading: asyncio.Task[None] | None = None
    failure: str | None = None
    failed_file: tuple[int, int] | None = None
    """The file's (size, mtime) when it failed: a replaced file is tried again."""
    leases: int = 0
    waiters: int = 0
    """Requests waiting for the load."""
    last_used: float = 0.0
    idle_timer: asyncio.TimerHandle | None = None
    counts: LoadCounts = field(default_factory=LoadCounts)

    @property
    def keep_alive(self) -> float:
        return -1.0 if self.model.keep_alive is None else self.model.keep_alive

    @property
    def local(self) -> bool:
        return not isinstance(self.model, UpstreamModel)

    @property
    def state(self) -> ModelState:
        if self.failure is not None:
            return "failed"
        if self.loading is not None:
            return "loading"
        if self.engine is None:
            return "unloaded"
        return "ready" if self.engine.ready else "loading"


class Lease:
    """A request's hold on a ready engine: the model is not unloaded while a lease is out."""

    def __init__(self, engines: Engines, slot: _Slot) -> None:
        self.engine: Engine = slot.engine  # type: ignore[assignment]  # acquire() hands out ready slots only
        self._engines = engines
        self._slot = slot
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._engines._release(self._slot)

    def __del__(self) -> None:
        # A stream dropped unread (never started, so its `finally` never ran).
        if self._held:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to unload
                self._engines._loop.call_soon_threadsafe(self.release)


class Engines:
    def __init__(
        self,
        configured: Iterable[ServedModel],
        factory: EngineFactory,
        *,
        max_loaded: int | None,
        load_timeout: float,
    ) -> None:
        self._factory = factory
        self._slots: dict[str, _Slot] = {model.name: _Slot(model, configured=True) for model in configured}
        self._max_loaded = max_loaded
        self._load_timeout = load_timeout
        self._unloading: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self.draining = False
        """Set on SIGTERM / Ctrl-C: new requests get 529 while running ones finish."""
        self._closed = False

    # --- what the server shows -------------------------------------------------------

    @property
    def by_name(self) -> dict[str, Engine]:
        """The engines loaded or loading (tests and /metrics read them)."""
        return {name: slot.engine for name, slot in self._slots.items() if slot.engine is not None}

    @property
    def ready(self) -> bool:
        """Every configured model has loaded (and is ready, or has since been unloaded while idle)."""
        return all(
            s.state == "ready" or (s.state == "unloaded" and s.counts.loads)
            for s in self._slots.values()
            if s.configured
        )

    @property
    def failed(self) -> bool:
        return any(slot.configured and slot.failure is not None for slot in self._slots.values())

    def state(self, name: str) -> ModelState:
        slot = self._slots.get(name)
        return "unloaded" if slot is None else slot.state

    def status(self, models: Iterable[ServedModel] = ()) -> dict[str, ModelState]:
        """Each known model's state; `models` adds those never requested (`unloaded`)."""
        shown = {model.name: "unloaded" for model in models} | {n: s.state for n, s in self._slots.items()}
        return shown  # type: ignore[return-value]

    def counts(self) -> dict[str, LoadCounts]:
        return {name: slot.counts for name, slot in self._slots.items()}

    def warnings(self) -> dict[str, list[str]]:
        """What each ready model cannot do that a user would otherwise assume (for /health)."""
        return {name: found for name, engine in self.by_name.items() if (found := engine.warnings())}

    def formats(self) -> dict[str, str]:
        """How each ready model is fed a transcript ("raw" or "chat"), for /health."""
        return {name: engine.prompt_format for name, engine in self.by_name.items() if engine.ready}

    def busy(self) -> bool:
        return any(stats.running or stats.waiting for stats in (e.stats() for e in self.by_name.values()))

    # --- serving ---------------------------------------------------------------------

    def preload(self, name: str) -> asyncio.Task[None] | None:
        """Start loading a configured model (at start-up); the task ends when it is loaded or failed."""
        slot = self._slots[name]
        try:
            return self._start_loading(slot)
        except (ModelUnavailable, Overloaded) as error:
            log.error("model %s is not loaded at start-up: %s", name, error)
            return None

    async def acquire(self, model: ServedModel) -> Lease:
        """A lease on the model's engine, loading it first if need be (see the module's
        docstring for the waits and the errors)."""
        if self.draining:
            raise Overloaded("The server is shutting down", retry_after=5.0)
        slot = self._slots.setdefault(model.name, _Slot(model, configured=False))
        if slot.failure is not None and slot.failed_file != _file_signature(model):
            slot.failure = None  # the file was replaced since it failed: try it again
        if slot.failure is not None:
            raise ModelUnavailable(model.name)
        if slot.engine is None or slot.loading is not None:
            loading = self._start_loading(slot)
            slot.waiters += 1
            try:
                await asyncio.wait_for(asyncio.shield(loading), self._load_timeout)
            except TimeoutError:
                raise EngineNotReady(f"The model {model.name} is still loading") from None
            finally:
                slot.waiters -= 1
            return await self.acquire(model)  # loaded, or failed: look again
        if not slot.engine.ready:
            raise EngineNotReady()  # an upstream with no healthy replica
        if slot.idle_timer is not None:
            slot.idle_timer.cancel()
            slot.idle_timer = None
        slot.leases += 1
        slot.last_used = time.monotonic()
        return Lease(self, slot)

    def _release(self, slot: _Slot) -> None:
        slot.leases -= 1
        slot.last_used = time.monotonic()
        if slot.leases == 0 and slot.keep_alive >= 0 and not self._closed:
            slot.idle_timer = self._loop.call_later(slot.keep_alive, self._idle_expired, slot)

    def _idle_expired(self, slot: _Slot) -> None:
        slot.idle_timer = None
        if slot.leases == 0 and slot.engine is not None and slot.loading is None:
            self._unload(slot, f"idle for {slot.keep_alive:g} s", "idle")

    # --- loading and unloading -------------------------------------------------------

    def _start_loading(self, slot: _Slot) -> asyncio.Task[None]:
        """Make room (synchronously, so two loads never take the same room), then load in a task."""
        if slot.loading is not None:
            return slot.loading
        evicted = self._make_room_for(slot)
        slot.engine = self._factory(slot.model)
        slot.loading = asyncio.create_task(self._load(slot, evicted))
        return slot.loading

    def _make_room_for(self, slot: _Slot) -> list[asyncio.Task[None]]:
        if self._max_loaded is None or not slot.local:
            return []
        evicted: list[asyncio.Task[None]] = []
        while self._loaded_count() >= self._max_loaded:
            idle = [s for s in self._slots.values() if s.engine is not None and s.local and s.loading is None
                    and s.leases == 0 and s.waiters == 0 and s.keep_alive >= 0]  # fmt: skip
            if not idle:
                raise self._no_room(slot)
            victim = min(idle, key=lambda s: s.last_used)
            evicted.append(self._unload(victim, f"to make room for {slot.model.name}", "evicted"))
        return evicted

    def _loaded_count(self) -> int:
        return sum(1 for s in self._slots.values() if s.engine is not None and s.local)

    def _no_room(self, slot: _Slot) -> Exception:
        kept = [name for name, s in self._slots.items() if s.engine is not None and s.local and s.keep_alive < 0]
        if len(kept) >= (self._max_loaded or 0):
            return ModelUnavailable(
                slot.model.name,
                f"model {slot.model.name} cannot be loaded: --max-loaded-models {self._max_loaded} is taken by "
                f"models kept loaded for ever ({', '.join(kept)})",
            )
        return Overloaded(
            f"No room to load model {slot.model.name}: --max-loaded-models {self._max_loaded} models are loaded "
            "and busy",
            retry_after=5.0,
        )

    async def _load(self, slot: _Slot, evicted: list[asyncio.Task[None]]) -> None:
        name, engine = slot.model.name, slot.engine
        assert engine is not None
        try:
            await asyncio.gather(*evicted)  # their memory is free before this model takes its own
            log.info("loading model %s", name)
            started = time.monotonic()
            await engine.start()
        except Exception as error:
            slot.failure = str(error) or type(error).__name__
            slot.failed_file = _file_signature(slot.model)
            slot.engine = None
            log.error("model %s failed to load: %s (requests for it get 500)", name, slot.failure)
            await _close_quietly(engine)
            return
        finally:
            slot.loading = None
        seconds = time.monotonic() - started
        slot.counts.loads += 1
        slot.counts.load_seconds += seconds
        slot.last_used = time.monotonic()
        log.info("model %s is loaded (%.2f s; prompt format: %s)", name, seconds, engine.prompt_format)
        for warning in engine.warnings():
            log.warning("model %s: %s", name, warning)
        if slot.leases == 0 and slot.waiters == 0 and slot.keep_alive >= 0 and not slot.configured:
            # Loaded for requests that gave up waiting (529): idle from now on.
            slot.idle_timer = self._loop.call_later(slot.keep_alive, self._idle_expired, slot)

    def _unload(self, slot: _Slot, why: str, reason: str) -> asyncio.Task[None]:
        """Take the engine away now (no new lease can reach it) and close it in a task."""
        engine, slot.engine = slot.engine, None
        assert engine is not None
        slot.counts.unloads[reason] = slot.counts.unloads.get(reason, 0) + 1
        log.info("unloading model %s: %s", slot.model.name, why)
        task = asyncio.create_task(_close_quietly(engine))
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)
        return task

    async def close(self) -> None:
        """Close every engine once; their open streams end with an error."""
        if self._closed:
            return
        self._closed = True
        loads = [slot.loading for slot in self._slots.values() if slot.loading is not None]
        for slot in self._slots.values():
            if slot.idle_timer is not None:
                slot.idle_timer.cancel()
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, *self._unloading, return_exceptions=True)
        engines = [slot.engine for slot in self._slots.values() if slot.engine is not None]
        await asyncio.gather(*(engine.aclose() for engine in engines), return_exceptions=True)


def _file_signature(model: ServedModel) -> tuple[int, int] | None:
    path = getattr(model, "path", None)
    try:
        stat = path.stat() if path is not None else None
    except OSError:
        return None
    return None if stat is None else (stat.st_size, stat.st_mtime_ns)


async def _close_quietly(engine: Engine) -> None:
    try:
        await engine.aclose()
    except Exception as error:
        log.warning("closing an engine failed: %r", error)
