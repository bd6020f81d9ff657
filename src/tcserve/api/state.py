"""What the server holds while it runs, built in the app's lifespan and kept on `app.state`."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from tcserve.accounting.ledger import Ledger
from tcserve.accounting.limits import Limiter
from tcserve.accounting.metrics import Metrics
from tcserve.config import Settings
from tcserve.core.catalog import Catalog
from tcserve.core.engines import Engines
from tcserve.core.service import CompletionService


@dataclass
class ServerState:
    settings: Settings
    catalog: Catalog
    engines: Engines
    metrics: Metrics
    service: CompletionService
    limiter: Limiter
    ledger: Ledger | None = None
    """Where finished requests are recorded (with --data-dir)."""


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.tcserve
    return state
