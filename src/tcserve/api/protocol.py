"""Wire models: names and types exactly as on the wire (docs/wire.md, "Request body" and "Response")."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

StopReason = Literal["stop_sequence", "max_tokens"]

SUPPORTED_VERSIONS = frozenset({"2023-06-01", "2023-01-01", "2026-10-21"})
"""`2023-01-01` is answered in the 2023-06-01 format (delta streaming)."""


def _whole_unicode(text: str) -> str:
    """JSON's `\\ud800` escapes decode to lone surrogates, which no UTF-8 text can carry
    (echoing one back would fail). pydantic refuses them only in fields with a length
    constraint; this gives every string field the same 400, in pydantic's words."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "string_unicode", "Input should be a valid string, unable to parse raw data as a unicode string"
        ) from None
    return text


Text = Annotated[StrictStr, AfterValidator(_whole_unicode)]
"""Every string field of a request: strict, and whole Unicode."""


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Annotated[StrictStr, Field(max_length=512), AfterValidator(_whole_unicode)] | None = None


class CompletionRequest(BaseModel):
    """POST /v1/complete. Strict types: `5.0` is not an integer, `"1"` not a number."""

    model_config = ConfigDict(extra="forbid")

    model: Text
    prompt: Annotated[StrictStr, Field(min_length=1), AfterValidator(_whole_unicode)]
    max_tokens_to_sample: StrictInt = Field(ge=1)
    stop_sequences: list[Text] | None = None
    temperature: StrictFloat | None = Field(None, ge=0, le=1)
    top_p: StrictFloat | None = Field(None, ge=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)
    metadata: Metadata | None = None
    stream: StrictBool = False


class Completion(BaseModel):
    """A whole completion, and (with `completion` as a delta) each streamed event."""

    type: Literal["completion"] = "completion"
    id: str
    completion: str
    stop_reason: StopReason | None
    model: str
    stop: str | None
    log_id: str


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail
    request_id: str


class ModelInfo(BaseModel):
    type: Literal["model"] = "model"
    id: str
    display_name: str
    created_at: str
    # tcserve's own fields, which the official SDKs ignore (`tcserve models` shows them).
    loaded: bool = Field(description="The model behind this id is loaded now (tcserve).")
    format: str = Field(description="gguf, upstream or fake (tcserve).")
    file: str | None = Field(description="The GGUF file's name, without its folder (tcserve).")
    size_bytes: int | None = Field(description="The GGUF file's size (tcserve).")


class ModelList(BaseModel):
    data: list[ModelInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None
