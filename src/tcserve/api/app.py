"""create_app(settings): the HTTP edge. Engines are built in the lifespan and kept on app.state."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from tcserve import __version__
from tcserve.accounting.keys import KeySource, unlimited
from tcserve.accounting.ledger import LEDGER_FILE, Ledger
from tcserve.accounting.limits import Limiter
from tcserve.accounting.metrics import Metrics
from tcserve.api import complete, models, playground
from tcserve.api.errors import (
    INTERNAL_MESSAGE,
    APIError,
    InternalServerError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    edge_validation_message,
    error_body,
    error_response,
    to_api_error,
)
from tcserve.api.middleware import PUBLIC_PATHS, Authenticate, LimitBody, RequestContext, request_id_of
from tcserve.api.openapi import describe_the_real_wire
from tcserve.api.state import ServerState, server_state
from tcserve.config import ConfigError, LlamaCppModel, ServedModel, Settings, UpstreamModel, engine_flags, load_models
from tcserve.core.catalog import Catalog
from tcserve.core.engines import EngineFactory, Engines
from tcserve.core.folder import ModelFolder
from tcserve.core.service import CompletionService, ServicePolicy
from tcserve.core.validate import RequestCaps
from tcserve.engines.factory import build_engine, model_file_date
from tcserve.errors import TCServeError

log = logging.getLogger("tcserve")


def create_app(
    settings: Settings,
    model_table: Sequence[ServedModel] | None = None,
    engine_factory: EngineFactory = build_engine,
) -> FastAPI:
    """`model_table` defaults to `load_models(settings)`; tests pass their own."""
    served = list(model_table) if model_table is not None else load_models(settings)
    created = {model.name: model_file_date(model) or datetime.now(UTC) for model in served}
    folder = models_folder(settings, served)
    catalog = Catalog.build(served, created, claude_ids=settings.claude_model_ids, folder=folder)
    limiter = Limiter()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engines = Engines(
            served, engine_factory, max_loaded=settings.max_loaded_models, load_timeout=settings.load_timeout
        )
        ledger = Ledger(settings.data_dir / LEDGER_FILE) if settings.data_dir else None
        metrics = Metrics(engines)
        service = CompletionService(catalog, engines, service_policy(settings), limiter, metrics, ledger)
        state = ServerState(settings, catalog, engines, metrics, service, limiter, ledger)
        app.state.tcserve = state
        _warn_if_open(settings)
        background = [task for model in served if (task := engines.preload(model.name)) is not None]
        background.append(asyncio.create_task(metrics.run_sampler()))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await engines.close()
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
    public = PUBLIC_PATHS
    if settings.playground:  # off, `/` is an unknown path like any other (and needs the key first)
        app.include_router(playground.router())
        public = public | playground.PATHS
    _install_error_handlers(app)
    describe_the_real_wire(app)
    # Added innermost first: RequestContext ends up outermost.
    app.add_middleware(LimitBody, max_bytes=settings.max_body_bytes)
    app.add_middleware(Authenticate, keys=key_source(settings), limiter=limiter, public_paths=public)
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


def models_folder(settings: Settings, served: Sequence[ServedModel]) -> ModelFolder | None:
    """--models-dir: its models take the engine flags (--ctx-size, --parallel, ...)."""
    kept = [m.name for m in served if not isinstance(m, UpstreamModel) and m.keep_alive in (None, -1)]
    if settings.max_loaded_models is not None and len(kept) > settings.max_loaded_models:
        raise ConfigError(
            f"--max-loaded-models {settings.max_loaded_models} is less than the models kept loaded: {', '.join(kept)}"
        )
    if settings.models_dir is None:
        return None
    template = LlamaCppModel(name="template").model_copy(update=engine_flags(settings))
    taken = {model_id for model in served for model_id in (model.name, *model.aliases)}
    return ModelFolder(settings.models_dir, template, settings.keep_alive, taken)


def service_policy(settings: Settings) -> ServicePolicy:
    caps = RequestCaps(settings.max_prompt_chars, settings.max_stop_sequences, settings.max_stop_chars)
    return ServicePolicy(caps=caps, request_timeout=settings.request_timeout)


async def health(request: Request) -> Response:
    state = server_state(request)
    engines = state.engines
    extra: dict[str, object] = {"models": engines.status(state.catalog.models()), "formats": engines.formats()}
    if warnings := engines.warnings():
        extra["warnings"] = warnings
    if engines.ready:  # the configured models: one of --models-dir that fails leaves the server healthy
        return JSONResponse({"status": "ok", **extra})
    problem = "A model failed to load" if engines.failed else "The model is still loading"
    body = error_body(InternalServerError(problem), request_id_of(request.scope))
    return JSONResponse({**body, **extra}, status_code=503, headers={"retry-after": "1"})


async def metrics_endpoint(request: Request) -> Response:
    registry = server_state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


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
        api_error = InvalidRequestError(edge_validation_message(error.errors()))
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
