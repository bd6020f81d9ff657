"""What the server holds while it runs, built in the app's lifespan and kept on `app.state`."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from tcserve.catalog import Catalog
from tcserve.config import Settings
from tcserve.engines.base import Engine


@dataclass
class ServerState:
    settings: Settings
    catalog: Catalog
    engines: dict[str, Engine]
    """Keyed by the configured model's name."""

    @property
    def ready(self) -> bool:
        return all(engine.ready for engine in self.engines.values())


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.tcserve
    return state
