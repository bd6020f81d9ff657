"""What the OpenAPI document says about errors, so that it describes the real wire."""

from __future__ import annotations

from typing import Any

from tcserve.api.protocol import ErrorResponse

_ERROR = {"model": ErrorResponse}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "invalid_request_error"},
    401: {**_ERROR, "description": "authentication_error"},
    404: {**_ERROR, "description": "not_found_error"},
    405: {**_ERROR, "description": "invalid_request_error (wrong method)"},
    413: {**_ERROR, "description": "request_too_large"},
    500: {**_ERROR, "description": "api_error"},
    529: {**_ERROR, "description": "overloaded_error (retry after `retry-after` seconds)"},
}
