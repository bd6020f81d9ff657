"""Anthropic's error vocabulary, and the one mapping from any exception to it.

    APIError                      status  error.type
    ├── InvalidRequestError       400     invalid_request_error
    │   └── MethodNotAllowedError 405     invalid_request_error
    ├── AuthenticationError       401     authentication_error
    ├── PermissionDeniedError     403     permission_error
    ├── NotFoundError             404     not_found_error
    ├── RequestTooLargeError      413     request_too_large
    ├── RateLimitError            429     rate_limit_error
    ├── InternalServerError       500     api_error
    └── OverloadedError           529     overloaded_error

`to_api_error` turns internal errors (`tcserve.errors`) into these; anything
else becomes a 500 whose message reveals nothing, with the detail in the log
under the request id. `error_response` and `error_event_data` are the two
renderings: before the first byte of a response, and after it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from starlette.responses import JSONResponse

from tcserve import errors

log = logging.getLogger("tcserve.errors")

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
]


class APIError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[ErrorType] = "api_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidRequestError(APIError):
    status, type = 400, "invalid_request_error"


class MethodNotAllowedError(InvalidRequestError):
    status = 405


class AuthenticationError(APIError):
    status, type = 401, "authentication_error"


class PermissionDeniedError(APIError):
    status, type = 403, "permission_error"


class NotFoundError(APIError):
    status, type = 404, "not_found_error"


class RequestTooLargeError(APIError):
    status, type = 413, "request_too_large"


class RateLimitError(APIError):
    status, type = 429, "rate_limit_error"


class InternalServerError(APIError):
    status, type = 500, "api_error"


class OverloadedError(APIError):
    status, type = 529, "overloaded_error"


INTERNAL_MESSAGE = "Internal server error"


def to_api_error(error: BaseException, request_id: str) -> APIError:
    """The single mapping from anything raised while serving to the wire vocabulary."""
    match error:
        case APIError():
            return error
        case errors.InvalidRequest():
            return InvalidRequestError(str(error))
        case errors.PermissionDenied():
            return PermissionDeniedError(str(error))
        case errors.ModelNotFound():
            return NotFoundError(str(error))
        case errors.Overloaded() | errors.EngineNotReady():
            return OverloadedError(str(error), retry_after=error.retry_after)
        case errors.RateLimited():
            return RateLimitError(str(error), retry_after=error.retry_after)
        case errors.DeadlineExceeded():
            return InternalServerError(str(error))
        case errors.ModelUnavailable():
            return InternalServerError(str(error))  # names our config's model, nothing internal
        case _:
            log.error("request %s failed: %r", request_id, error, exc_info=error)
            return InternalServerError(INTERNAL_MESSAGE)


def error_body(error: APIError, request_id: str) -> dict[str, object]:
    return {
        "type": "error",
        "error": {"type": error.type, "message": error.message},
        "request_id": request_id,
    }


def error_response(error: APIError, request_id: str) -> JSONResponse:
    headers = {"request-id": request_id}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
        headers["retry-after-ms"] = str(int(error.retry_after * 1000))
    return JSONResponse(error_body(error, request_id), status_code=error.status, headers=headers)


def error_event_data(error: APIError, request_id: str) -> str:
    """The JSON of an SSE `error` event (the stream has started; no status to set)."""
    return json.dumps(error_body(error, request_id), separators=(",", ":"), ensure_ascii=False)


FASTAPI_LOCATIONS = ("body", "query", "header", "path")
"""The location prefixes FastAPI puts before a field's name; the wire shows the field only."""


def edge_validation_message(problems: Sequence[Any]) -> str:
    return errors.validation_message(problems, skip=FASTAPI_LOCATIONS)
