"""What the OpenAPI document says about errors, so that it describes the real wire."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from tcserve.api.protocol import CompletionRequest, ErrorResponse

_ERROR = {"model": ErrorResponse}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "invalid_request_error"},
    401: {**_ERROR, "description": "authentication_error"},
    403: {**_ERROR, "description": "permission_error (a key not allowed that model)"},
    404: {**_ERROR, "description": "not_found_error"},
    405: {**_ERROR, "description": "invalid_request_error (wrong method)"},
    413: {**_ERROR, "description": "request_too_large"},
    429: {**_ERROR, "description": "rate_limit_error (retry after `retry-after` seconds)"},
    500: {**_ERROR, "description": "api_error"},
    529: {**_ERROR, "description": "overloaded_error (retry after `retry-after` seconds)"},
}


def describe_the_real_wire(app: FastAPI) -> None:
    """FastAPI's generated document promises 422 responses that tcserve never sends,
    and does not know the /v1/complete body (the handler parses it itself, to
    answer in Anthropic's words). Fix both, once, lazily."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)  # fmt: skip
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            body = CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas["CompletionRequest"] = body
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for operations in document["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
