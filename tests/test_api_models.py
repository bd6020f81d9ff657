"""GET /v1/models and /v1/models/{id}: the Claude ids, order, paging, errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

from support import VERSION, fake_model, serve_app, settings
from tcserve.api.app import create_app
from tcserve.core.catalog import CLAUDE_MODELS, LEGACY_MODELS

CLAUDE_IDS = [
    "claude-opus-4-6",
    "claude-opus-4-5-20251101",
    "claude-opus-4-5",
    "claude-3-7-sonnet-latest",
    "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest",
    "claude-3-5-haiku-20241022",
    "claude-haiku-4-5",
    "claude-haiku-4-5-20251001",
    "claude-sonnet-4-20250514",
    "claude-sonnet-4-0",
    "claude-4-sonnet-20250514",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-opus-4-0",
    "claude-opus-4-20250514",
    "claude-4-opus-20250514",
    "claude-opus-4-1-20250805",
    "claude-3-opus-latest",
    "claude-3-opus-20240229",
    "claude-3-haiku-20240307",
]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    local = fake_model(created_at="2020-01-01T00:00:00Z", display_name="Local fake", aliases=["fake-alias"])
    app = create_app(settings(), [local])
    with serve_app(app) as url, httpx.Client(base_url=url, headers=VERSION) as client:
        yield client


def all_ids(client: httpx.Client) -> list[str]:
    return [m["id"] for m in client.get("/v1/models", params={"limit": 1000}).json()["data"]]


def test_every_claude_id_is_listed_and_served(client: httpx.Client) -> None:
    assert len(CLAUDE_IDS) == 21 and set(CLAUDE_IDS) == set(CLAUDE_MODELS)
    assert set(CLAUDE_IDS) <= set(all_ids(client))
    for model_id in CLAUDE_IDS:
        prompt = "\n\nHuman: hi\n\nAssistant:"
        response = client.post("/v1/complete", json={"model": model_id, "prompt": prompt, "max_tokens_to_sample": 1})
        assert response.status_code == 200 and response.json()["model"] == model_id


def test_the_text_completions_era_ids_are_listed_and_served(client: httpx.Client) -> None:
    legacy = ["claude-2", "claude-2.0", "claude-2.1", "claude-instant-1", "claude-instant-1.1", "claude-instant-1.2"]
    assert set(LEGACY_MODELS) == set(legacy)
    listed = {m["id"]: m for m in client.get("/v1/models", params={"limit": 1000}).json()["data"]}
    assert listed["claude-2.1"] == {
        "type": "model", "id": "claude-2.1", "display_name": "Claude 2.1", "created_at": "2023-11-21T00:00:00Z",
        "loaded": True, "format": "fake", "file": None, "size_bytes": None,  # served by the default (fake) model
    }  # fmt: skip
    assert listed["claude-instant-1.2"]["display_name"] == "Claude Instant 1.2"
    assert len(listed) == 21 + 6 + 2  # the Claude ids, the legacy ids, the fake model and its alias
    for model_id in legacy:
        prompt = "\n\nHuman: hi\n\nAssistant:"
        response = client.post("/v1/complete", json={"model": model_id, "prompt": prompt, "max_tokens_to_sample": 1})
        assert response.status_code == 200 and response.json()["model"] == model_id


def test_a_legacy_id_can_be_claimed_as_an_alias() -> None:
    claimed = fake_model(name="other", reply=" mine", aliases=["claude-2.1"])
    app = create_app(settings(), [fake_model(), claimed])
    with serve_app(app) as url, httpx.Client(base_url=url, headers=VERSION) as client:
        prompt = "\n\nHuman: hi\n\nAssistant:"
        body = {"model": "claude-2.1", "prompt": prompt, "max_tokens_to_sample": 5}
        assert client.post("/v1/complete", json=body).json()["completion"] == " mine"
        listed = client.get("/v1/models/claude-2.1").json()
        assert listed["display_name"] == "other"  # the alias's model, not the built-in entry


def test_newest_first_ties_by_id(client: httpx.Client) -> None:
    data = client.get("/v1/models", params={"limit": 1000}).json()["data"]
    keys = [(-datetime.fromisoformat(m["created_at"]).timestamp(), m["id"]) for m in data]
    assert keys == sorted(keys)
    assert data[0]["id"] == "claude-opus-4-6"
    assert {m["id"] for m in data if m["created_at"].startswith("2025-05-14")} == {
        "claude-sonnet-4-20250514", "claude-sonnet-4-0", "claude-4-sonnet-20250514",
        "claude-opus-4-0", "claude-opus-4-20250514", "claude-4-opus-20250514",
    }  # fmt: skip
    ours = {"loaded": True, "format": "fake", "file": None, "size_bytes": None}  # tcserve's extra fields
    assert data[-2:] == [
        {"type": "model", "id": "fake", "display_name": "Local fake", "created_at": "2020-01-01T00:00:00Z", **ours},
        {"type": "model", "id": "fake-alias", "display_name": "Local fake", "created_at": "2020-01-01T00:00:00Z",
         **ours},
    ]  # fmt: skip


def test_default_page_and_has_more(client: httpx.Client) -> None:
    page = client.get("/v1/models").json()
    assert len(page["data"]) == 20 and page["has_more"] is True
    assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]


def test_paging_forward_and_back_covers_everything_once(client: httpx.Client) -> None:
    everything = all_ids(client)
    seen: list[str] = []
    after: str | None = None
    while True:
        params = {"limit": 5, **({"after_id": after} if after else {})}
        page = client.get("/v1/models", params=params).json()
        seen += [m["id"] for m in page["data"]]
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert seen == everything
    back = client.get("/v1/models", params={"limit": 3, "before_id": everything[5]}).json()
    assert [m["id"] for m in back["data"]] == everything[2:5] and back["has_more"] is True
    first = client.get("/v1/models", params={"limit": 10, "before_id": everything[2]}).json()
    assert [m["id"] for m in first["data"]] == everything[:2] and first["has_more"] is False


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 1001}, {"limit": "many"}, {"after_id": "nope"}, {"before_id": "nope"}],
)
def test_bad_paging_is_400(client: httpx.Client, params: dict[str, object]) -> None:
    response = client.get("/v1/models", params=params)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert next(iter(params)) in response.json()["error"]["message"]


def test_get_one_model(client: httpx.Client) -> None:
    response = client.get("/v1/models/claude-haiku-4-5")
    assert response.json() == {
        "type": "model", "id": "claude-haiku-4-5", "display_name": "Claude Haiku 4.5",
        "created_at": "2025-10-01T00:00:00Z", "loaded": True, "format": "fake", "file": None, "size_bytes": None,
    }  # fmt: skip


def test_get_unknown_model_is_404(client: httpx.Client) -> None:
    response = client.get("/v1/models/claude-x")
    assert response.status_code == 404
    assert response.json()["error"] == {"type": "not_found_error", "message": "model: claude-x"}


def test_models_need_the_version_header(client: httpx.Client) -> None:
    response = httpx.get(f"{client.base_url}/v1/models")
    assert response.status_code == 400


def test_a_configured_model_can_claim_a_claude_id() -> None:
    claimed = fake_model(name="mine", aliases=["claude-haiku-4-5"], reply=" mine")
    other = fake_model(name="other", reply=" other")
    app = create_app(settings(), [other, claimed])
    with serve_app(app) as url:
        post = {"prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 5}
        claimed_reply = httpx.post(f"{url}/v1/complete", headers=VERSION, json={**post, "model": "claude-haiku-4-5"})
        default_reply = httpx.post(f"{url}/v1/complete", headers=VERSION, json={**post, "model": "claude-opus-4-6"})
    assert claimed_reply.json()["completion"] == " mine"
    assert default_reply.json()["completion"] == " other"  # unclaimed Claude ids go to the first model
