"""A small soak on the real embedded model (bench/soak.py runs the big one):
8 clients x 10 requests, mixed streaming and not, random stop sequences, some
abandoned. Nothing lost, truncated or mixed up; no sequence left running."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest

from support import serve_app, settings
from tcserve.api.app import create_app
from tcserve.config import LlamaCppModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from soak import run_soak

pytestmark = pytest.mark.model


def test_small_soak() -> None:
    model = LlamaCppModel(name="gemma-3-270m", context_size=512, parallel=4, max_queue=2)
    app = create_app(settings(), [model])
    with serve_app(app) as url:
        report = asyncio.run(run_soak(url, clients=8, requests=10, max_tokens=8))
        engine = app.state.tcserve.engines.by_name["gemma-3-270m"]
        for _ in range(500):
            if engine.stats().running == 0:
                break
            asyncio.run(asyncio.sleep(0.01))
        metrics = httpx.get(f"{url}/metrics").text
    assert report.problems == []
    assert report.requests == 80
    assert set(report.outcomes) <= {"complete", "abandoned", "error event", "refused"}
    assert report.outcomes["complete"] >= 40  # 8 clients on 4 slots + 2 queued: the rest may get 529
    assert 'tcserve_running_sequences{model="gemma-3-270m"} 0.0' in metrics
