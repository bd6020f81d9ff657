"""Fuzzing the wire: schemathesis against the app's own OpenAPI document, and
hypothesis over the request parser. Whatever arrives, the answer is JSON in
Anthropic's error vocabulary (or a completion), never a 5xx, never HTML.

`make test` runs a few hundred cases; `make fuzz` (FUZZ_EXAMPLES=4000 per
operation; hypothesis stops early on operations with few inputs, such as
/health) sends more than 10,000 requests and prints the count.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import fake_model, serve_app
from support import settings as server_settings
from tcserve.api.app import create_app
from tcserve.api.complete import parse_completion_request
from tcserve.api.errors import to_api_error
from tcserve.errors import InvalidRequest

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
VOCABULARY = {
    "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
    "request_too_large", "rate_limit_error", "api_error", "overloaded_error",
}  # fmt: skip
OUTCOMES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


def _app() -> object:
    return create_app(server_settings(), [fake_model(reply=" fuzz <eos>")])


schema = schemathesis.openapi.from_dict(_app().openapi())  # type: ignore[attr-defined]
# Valid requests and, mostly, invalid ones: wrong types, missing fields, bad headers.
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])


@pytest.fixture(scope="module")
def live() -> Iterator[str]:
    with serve_app(_app()) as url:  # type: ignore[arg-type]
        yield url
    bad = {k: v for k, v in OUTCOMES.items() if k != "ok"}
    print(f"\nfuzzed {sum(OUTCOMES.values())} requests: {OUTCOMES['ok']} well-formed, problems: {bad or 0}; "
          f"statuses {dict(sorted(STATUSES.items()))}")  # fmt: skip


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_answer_is_well_formed(case: schemathesis.Case, live: str) -> None:
    response = case.call(base_url=live, timeout=30)
    problem = _problem(response.status_code, response.headers, response.content)
    OUTCOMES[problem or "ok"] += 1
    STATUSES[response.status_code] += 1
    assert problem is None, f"{case.method} {case.path}: {problem}: {response.content[:300]!r}"


def _problem(status: int, headers: object, content: bytes) -> str | None:
    get = headers.get  # type: ignore[attr-defined]
    request_id = get("request-id")
    if isinstance(request_id, list):
        request_id = request_id[0]
    if not request_id or not str(request_id).startswith("req_01"):
        return "no request-id"
    if status >= 500:
        return f"status {status}"
    content_type = str(get("content-type") or "")
    if status == 200 and ("text/event-stream" in content_type or "text/plain" in content_type):
        return None  # a stream, or /metrics
    try:
        body = json.loads(content)
    except ValueError:
        return "not JSON"
    if status >= 400 and not (
        body.get("type") == "error" and body.get("error", {}).get("type") in VOCABULARY and body.get("request_id")
    ):
        return "outside Anthropic's error vocabulary"
    return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(["model", "prompt", "max_tokens_to_sample", "stop_sequences", "temperature", "top_p",
                          "top_k", "metadata", "stream", "other"])  # fmt: skip


@given(st.dictionaries(fields, json_values, max_size=9) | json_values)
@settings(max_examples=EXAMPLES * 5, deadline=None)
def test_the_parser_accepts_or_says_why(value: object) -> None:
    try:
        request = parse_completion_request(json.dumps(value).encode())
    except InvalidRequest as error:
        api_error = to_api_error(error, "req_test")
        assert api_error.status == 400 and api_error.message
    else:
        assert isinstance(request.max_tokens_to_sample, int) and request.max_tokens_to_sample >= 1
