"""What the server holds while it runs, built in the app's lifespan and kept on `app.state`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import Request

from tcserve.api.metrics import Metrics
from tcserve.core.catalog import Catalog
from tcserve.config import Settings
from tcserve.engines.base import Engine
from tcserve.errors import EngineNotReady, ModelUnavailable, Overloaded
from tcserve.accounting.ledger import Ledger
from tcserve.accounting.limits import Limiter


@dataclass
class ServerState:
    settings: Settings
    catalog: Catalog
    engines: dict[str, Engine]
    """Keyed by the configured model's name."""
    metrics: Metrics
    limiter: Limiter
    ledger: Ledger | None = None
    """Where finished requests are recorded (with --data-dir)."""
    load_failures: dict[str, str] = field(default_factory=dict)
    """Models whose engine failed to start, and why (for the log and /health)."""
    draining: bool = False
    """Set on SIGTERM / Ctrl-C: new requests get 529 while running ones finish."""
    _closed: bool = False

    @property
    def ready(self) -> bool:
        return all(engine.ready for engine in self.engines.values())

    def model_status(self) -> dict[str, str]:
        def status(name: str, engine: Engine) -> str:
            return "failed" if name in self.load_failures else "ready" if engine.ready else "loading"

        return {name: status(name, engine) for name, engine in self.engines.items()}

    def busy(self) -> bool:
        return any(stats.running or stats.waiting for stats in (e.stats() for e in self.engines.values()))

    async def close_engines(self) -> None:
        """Close every engine once; their open streams end with an error."""
        if not self._closed:
            self._closed = True
            await asyncio.gather(*(engine.aclose() for engine in self.engines.values()), return_exceptions=True)

    def ready_engine(self, model_name: str) -> Engine:
        """The engine, once it can take work: 529 while it loads or the server
        drains, 500 if it never will."""
        if self.draining:
            raise Overloaded("The server is shutting down", retry_after=5.0)
        if model_name in self.load_failures:
            raise ModelUnavailable(model_name)
        engine = self.engines[model_name]
        if not engine.ready:
            raise EngineNotReady()
        return engine


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.tcserve
    return state
