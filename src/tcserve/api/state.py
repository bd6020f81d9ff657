"""What the server holds while it runs, built in the app's lifespan and kept on `app.state`."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from tcserve.catalog import Catalog
from tcserve.config import Settings
from tcserve.engines.base import Engine
from tcserve.errors import EngineNotReady, ModelUnavailable


@dataclass
class ServerState:
    settings: Settings
    catalog: Catalog
    engines: dict[str, Engine]
    """Keyed by the configured model's name."""
    load_failures: dict[str, str] = field(default_factory=dict)
    """Models whose engine failed to start, and why (for the log and /health)."""

    @property
    def ready(self) -> bool:
        return all(engine.ready for engine in self.engines.values())

    def model_status(self) -> dict[str, str]:
        def status(name: str, engine: Engine) -> str:
            return "failed" if name in self.load_failures else "ready" if engine.ready else "loading"

        return {name: status(name, engine) for name, engine in self.engines.items()}

    def ready_engine(self, model_name: str) -> Engine:
        """The engine, once it can take work: 529 while it loads, 500 if it never will."""
        if model_name in self.load_failures:
            raise ModelUnavailable(model_name)
        engine = self.engines[model_name]
        if not engine.ready:
            raise EngineNotReady()
        return engine


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.tcserve
    return state
