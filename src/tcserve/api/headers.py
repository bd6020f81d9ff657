"""Request headers every /v1 endpoint checks after authentication."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header

from tcserve.api.protocol import SUPPORTED_VERSIONS
from tcserve.errors import InvalidRequest


def require_version(
    anthropic_version: Annotated[
        str | None, Header(description="API version: 2023-06-01 (also 2023-01-01, 2026-10-21)")
    ] = None,
) -> str:
    if anthropic_version is None:
        raise InvalidRequest("anthropic-version: header is required")
    if anthropic_version not in SUPPORTED_VERSIONS:
        raise InvalidRequest(f'anthropic-version: "{anthropic_version}" is not a valid version')
    return anthropic_version
