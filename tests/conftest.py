from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _clean_environment() -> Iterator[None]:
    """Tests must not pick up the developer's own server or keys."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("TCSERVE_", "ANTHROPIC_"))}
    for key in saved:
        del os.environ[key]
    yield
    os.environ.update(saved)
