"""The engines a server runs, keyed by the configured model's name: loading them,
whether each can take work, and closing them.

A model that is still loading gets 529 with `retry-after` (the SDKs retry), one
that failed to load gets 500 naming it, and while the server drains every new
request gets 529.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from tcserve.engines.base import Engine
from tcserve.errors import EngineNotReady, ModelUnavailable, Overloaded

log = logging.getLogger("tcserve")


class Engines:
    def __init__(self, engines: Mapping[str, Engine]) -> None:
        self.by_name: dict[str, Engine] = dict(engines)
        self.load_failures: dict[str, str] = {}
        """Models whose engine failed to start, and why (for the log and /health)."""
        self.draining = False
        """Set on SIGTERM / Ctrl-C: new requests get 529 while running ones finish."""
        self._closed = False

    async def load(self, name: str) -> None:
        """Start one engine; a failure is recorded, logged and leaves the others serving."""
        log.info("loading model %s", name)
        try:
            await self.by_name[name].start()
        except Exception as error:
            self.load_failures[name] = str(error)
            log.error("model %s failed to load: %s (requests for it get 500; /health says 503)", name, error)
            return
        log.info("model %s is ready (prompt format: %s)", name, self.by_name[name].prompt_format)
        for warning in self.by_name[name].warnings():
            log.warning("model %s: %s", name, warning)

    @property
    def ready(self) -> bool:
        return all(engine.ready for engine in self.by_name.values())

    def status(self) -> dict[str, str]:
        def status(name: str, engine: Engine) -> str:
            return "failed" if name in self.load_failures else "ready" if engine.ready else "loading"

        return {name: status(name, engine) for name, engine in self.by_name.items()}

    def warnings(self) -> dict[str, list[str]]:
        """What each ready model cannot do that a user would otherwise assume (for /health)."""
        return {name: found for name, engine in self.by_name.items() if (found := engine.warnings())}

    def formats(self) -> dict[str, str]:
        """How each ready model is fed a transcript ("raw" or "chat"), for /health."""
        return {name: engine.prompt_format for name, engine in self.by_name.items() if engine.ready}

    def busy(self) -> bool:
        return any(stats.running or stats.waiting for stats in (e.stats() for e in self.by_name.values()))

    def ready_engine(self, name: str) -> Engine:
        """The engine, once it can take work: 529 while it loads or the server
        drains, 500 if it never will."""
        if self.draining:
            raise Overloaded("The server is shutting down", retry_after=5.0)
        if name in self.load_failures:
            raise ModelUnavailable(name)
        engine = self.by_name[name]
        if not engine.ready:
            raise EngineNotReady()
        return engine

    async def close(self) -> None:
        """Close every engine once; their open streams end with an error."""
        if not self._closed:
            self._closed = True
            await asyncio.gather(*(engine.aclose() for engine in self.by_name.values()), return_exceptions=True)
