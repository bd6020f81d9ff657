"""Wire models: names and types exactly as on the wire (docs/wire.md, "Request body" and "Response")."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

StopReason = Literal["stop_sequence", "max_tokens"]

SUPPORTED_VERSIONS = frozenset({"2023-06-01", "2023-01-01", "2026-10-21"})
"""`2023-01-01` is answered in the 2023-06-01 format (delta streaming)."""


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: StrictStr | None = Field(None, max_length=512)


class CompletionRequest(BaseModel):
    """POST /v1/complete. Strict types: `5.0` is not an integer, `"1"` not a number."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: StrictStr = Field(min_length=1)
    max_tokens_to_sample: StrictInt = Field(ge=1)
    stop_sequences: list[StrictStr] | None = None
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
