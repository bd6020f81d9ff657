"""GET /v1/models and GET /v1/models/{model_id}: newest first, paged like Anthropic's."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from tcserve.api.headers import require_version
from tcserve.api.openapi import ERROR_RESPONSES
from tcserve.api.protocol import ModelInfo, ModelList
from tcserve.api.state import server_state
from tcserve.clock import iso_z
from tcserve.core.catalog import ModelEntry
from tcserve.core.engines import Engines
from tcserve.engines.factory import model_file
from tcserve.errors import InvalidRequest

RESCAN_EVERY = 2.0
"""Seconds between two looks at --models-dir for the listing (a request for an
unknown id always looks)."""

router = APIRouter(dependencies=[Depends(require_version)], responses=ERROR_RESPONSES)


def model_info(entry: ModelEntry, engines: Engines) -> ModelInfo:
    weights = model_file(entry.served_by)
    return ModelInfo(
        id=entry.id,
        display_name=entry.display_name,
        created_at=iso_z(entry.created_at),
        loaded=engines.state(entry.served_by.name) == "ready",
        format=weights.format,
        file=weights.name,
        size_bytes=weights.size,
    )


@router.head("/v1/models", include_in_schema=False)  # HEAD beside every GET, as in app.py
@router.get("/v1/models", response_model=ModelList, summary="List models")
async def list_models(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after_id: str | None = None,
    before_id: str | None = None,
) -> ModelList:
    state = server_state(request)
    catalog = state.catalog
    catalog.rescan(unless_within=RESCAN_EVERY)
    start, end = 0, len(catalog.entries)
    if after_id is not None:
        start = _position(catalog.index_of(after_id), "after_id", after_id) + 1
    if before_id is not None:
        end = _position(catalog.index_of(before_id), "before_id", before_id)
    if before_id is not None and after_id is None:
        # Paging backwards: the `limit` entries just before `before_id`.
        page = catalog.entries[max(start, end - limit) : end]
        has_more = end - limit > start
    else:
        page = catalog.entries[start : min(end, start + limit)]
        has_more = start + limit < end
    data = [model_info(entry, state.engines) for entry in page]
    return ModelList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


def _position(index: int | None, name: str, model_id: str) -> int:
    if index is None:
        raise InvalidRequest(f"{name}: no model with id {model_id!r}")
    return index


@router.head("/v1/models/{model_id:path}", include_in_schema=False)
@router.get("/v1/models/{model_id:path}", response_model=ModelInfo, summary="Get a model")
async def get_model(request: Request, model_id: str) -> ModelInfo:
    state = server_state(request)
    return model_info(state.catalog.resolve(model_id), state.engines)
