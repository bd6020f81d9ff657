"""Errors raised below the HTTP edge, written out once as a tree.

    TCServeError
    ├── InvalidRequest        the caller asked for something we will not do
    │   ├── PromptError       the Human/Assistant transcript breaks the rules
    │   └── ContextOverflow   prompt + max_tokens_to_sample exceed the context
    ├── PermissionDenied      the caller's key may not use that model
    ├── ModelNotFound         no model answers to that id
    ├── Overloaded            no room now; try again after `retry_after` seconds
    ├── RateLimited           the caller's key is over a per-minute limit
    ├── DeadlineExceeded      a generation ran past --request-timeout
    ├── EngineNotReady        the model is still loading
    ├── ModelUnavailable      the model failed to load, or cannot fit beside the models kept loaded
    └── EngineFailure         the engine broke; the detail is for the log only

`tcserve.api.errors` maps each of them to a status and an Anthropic error body
(and, after the stream has started, to an SSE `error` event).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any


class TCServeError(Exception):
    """Base of every error tcserve raises on purpose."""


class InvalidRequest(TCServeError):
    """A mistake in the request: the message is shown to the caller as is."""


class PromptError(InvalidRequest):
    pass


class ContextOverflow(InvalidRequest):
    def __init__(self, prompt_tokens: int, max_tokens: int, context_size: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_size = context_size
        super().__init__(
            f"prompt is too long: {prompt_tokens} tokens + {max_tokens} max_tokens_to_sample > {context_size} context"
        )


class PermissionDenied(TCServeError):
    pass


class ModelNotFound(TCServeError):
    def __init__(self, model_id: str, message: str | None = None) -> None:
        """`message`: an upstream's own words for it (Anthropic's 404 for a retired id)."""
        self.model_id = model_id
        super().__init__(message or f"model: {model_id}")


class Overloaded(TCServeError):
    def __init__(self, message: str = "Overloaded", retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class RateLimited(TCServeError):
    def __init__(self, what: str, retry_after: float) -> None:
        super().__init__(f"rate limit exceeded: {what} per minute")
        self.retry_after = retry_after


class DeadlineExceeded(TCServeError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"The request ran past the server's {seconds:g}-second limit")


class EngineNotReady(TCServeError):
    def __init__(self, message: str = "The model is still loading", retry_after: float = 2.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class ModelUnavailable(TCServeError):
    def __init__(self, model_name: str, message: str | None = None) -> None:
        super().__init__(message or f"model {model_name} failed to load; see the server log")


class EngineFailure(TCServeError):
    """The engine failed. `str(error)` goes to the log, never to the client."""


def validation_message(problems: Sequence[Mapping[str, Any]], skip: Collection[str] = ()) -> str:
    """`field.sub: message` for the first problem pydantic found, as Anthropic words it
    (`max_tokens_to_sample: Field required`); parts of the location named in `skip`
    (the HTTP edge's `body`, `query`, ...) are left out."""
    if not problems:
        return "Invalid request"
    first = problems[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in skip)
    return f"{where}: {first['msg']}" if where else str(first["msg"])
