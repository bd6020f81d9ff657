"""create_app(settings): the HTTP edge. Engines are built in the lifespan and kept on app.state."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from tcserve import __version__
from tcserve.api import complete, models
from tcserve.api.errors import (
    INTERNAL_MESSAGE,
    APIError,
    InternalServerError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    error_body,
    error_response,
    to_api_error,
    validation_message,
)
from tcserve.api.metrics import Metrics, metrics_endpoint
from tcserve.api.middleware import Authenticate, LimitBody, RequestContext, request_id_of
from tcserve.api.openapi import describe_the_real_wire
from tcserve.api.state import ServerState
from tcserve.core.catalog import Catalog
from tcserve.config import ServedModel, Settings, load_models
from tcserve.engines.base import Engine
from tcserve.engines.factory import build_engine, model_file_date
from tcserve.errors import TCServeError
from tcserve.accounting.keys import KeySource, unlimited
from tcserve.accounting.ledger import Ledger
from tcserve.accounting.limits import Limiter

log = logging.getLogger("tcserve")

EngineFactory = Callable[[ServedModel], Engine]


def create_app(
    settings: Settings,
    model_table: Sequence[ServedModel] | None = None,
    engine_factory: EngineFactory = build_engine,
) -> FastAPI:
    """`model_table` defaults to `load_models(settings)`; tests pass their own."""
    served = list(model_table) if model_table is not None else load_models(settings)
    created = {model.name: model_file_date(model) or datetime.now(UTC) for model in served}
    catalog = Catalog.build(served, created, seed_ids=settings.seed_model_ids)
    limiter = Limiter()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engines = {model.name: engine_factory(model) for model in served}
        ledger = Ledger(settings.data_dir / "usage.sqlite3") if settings.data_dir else None
        state = ServerState(settings, catalog, engines, Metrics(engines), limiter, ledger)
        app.state.tcserve = state
        _warn_if_open(settings)
        background = [asyncio.create_task(_load(state, name)) for name in engines]
        background.append(asyncio.create_task(state.metrics.run_sampler()))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await state.close_engines()
            if ledger is not None:
                await asyncio.to_thread(ledger.close)

    app = FastAPI(
        title="tcserve",
        version=__version__,
        description="Anthropic's Text Completions API (POST /v1/complete) on local models.",
        lifespan=lifespan,
        # Anthropic's API answers 404 for unknown paths; a 307 to the slash-less path would
        # also build its Location from the client's Host header.
        redirect_slashes=False,
    )
    app.include_router(complete.router)
    app.include_router(models.router)
    app.add_api_route("/health", health, methods=["GET"], summary="Ready (200) or loading (503)")
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], summary="Prometheus metrics")
    # HEAD beside every GET (monitors and load balancers send it); the server drops the body.
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/metrics", metrics_endpoint, methods=["HEAD"], include_in_schema=False)
    _install_error_handlers(app)
    describe_the_real_wire(app)
    # Added innermost first: RequestContext ends up outermost.
    app.add_middleware(LimitBody, max_bytes=settings.max_body_bytes)
    app.add_middleware(Authenticate, keys=key_source(settings), limiter=limiter)
    if settings.cors_origins:
        # Outside authentication: a browser's preflight carries no key.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["x-api-key", "authorization", "anthropic-version", "anthropic-beta", "content-type"],
            expose_headers=["request-id", "retry-after"],
        )
    app.add_middleware(RequestContext)
    return app


async def _load(state: ServerState, name: str) -> None:
    log.info("loading model %s", name)
    try:
        await state.engines[name].start()
    except Exception as error:
        state.load_failures[name] = str(error)
        log.error("model %s failed to load: %s (requests for it get 500; /health says 503)", name, error)
        return
    log.info("model %s is ready", name)


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.tcserve
    status = state.model_status()
    if state.ready:
        return JSONResponse({"status": "ok", "models": status})
    problem = "A model failed to load" if state.load_failures else "The model is still loading"
    body = error_body(InternalServerError(problem), request_id_of(request.scope))
    return JSONResponse({**body, "models": status}, status_code=503, headers={"retry-after": "1"})


def _install_error_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, error: Exception) -> Response:
        request_id = request_id_of(request.scope)
        return error_response(to_api_error(error, request_id), request_id)

    async def on_http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        api_error: APIError
        if error.status_code == 404:
            api_error = NotFoundError(f"Not found: {request.method} {request.url.path}")
        elif error.status_code == 405:
            api_error = MethodNotAllowedError(f"Method {request.method} is not allowed on {request.url.path}")
        elif error.status_code < 500:
            api_error = InvalidRequestError(str(error.detail))
        else:
            api_error = InternalServerError(INTERNAL_MESSAGE)
        return error_response(api_error, request_id_of(request.scope))

    async def on_validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        api_error = InvalidRequestError(validation_message(error.errors()))
        return error_response(api_error, request_id_of(request.scope))

    app.add_exception_handler(APIError, on_error)
    app.add_exception_handler(TCServeError, on_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


def key_source(settings: Settings) -> KeySource:
    """Keys from the keys file (named, with permissions and limits; re-read when it
    changes) and from the command line (unlimited)."""
    cli_keys = [unlimited(key, index) for index, key in enumerate(settings.api_keys, start=1)]
    return KeySource(settings.keys_file, cli_keys)


def _warn_if_open(settings: Settings) -> None:
    if settings.api_keys or settings.keys_file or _is_loopback(settings.host):
        return
    log.warning(
        "no API key is set and the server listens on %s: anyone who can reach it can use it "
        "(set --api-key or TCSERVE_API_KEYS)",
        settings.host,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
