"""Fuzzing the wire: schemathesis against the app's own OpenAPI document, and
hypothesis over the request parser. Whatever arrives, the answer is JSON in
Anthropic's error vocabulary (or a completion), never a 5xx, never HTML.

Those requests are mostly rejected, so a generator of *valid* requests at the
edges of the API (temperatures down to subnormals, top_p/top_k extremes, many,
long and overlapping stop sequences, unicode everywhere, system text and
prefills, 1 to thousands of tokens, streamed and not) drives generation, through
the official SDK, and checks the contract's invariants on every answer: the
deltas join to the whole completion, no stop text leaks, `stop_reason` and
`stop` agree, exactly one final event. It runs on the fake engine; on the real
model (marked `model`) only the tiny-temperature check runs so far.

`make test` runs a few hundred cases; `make fuzz` (FUZZ_EXAMPLES=4000 per
operation; hypothesis stops early on operations with few inputs, such as
/health) sends more than 20,000 requests, prints the count and how many got a
200, and fails if fewer than half did.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator

import anthropic
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import fake_model, serve_app
from support import settings as server_settings
from tcserve.api.app import create_app
from tcserve.api.complete import parse_completion_request
from tcserve.api.errors import to_api_error
from tcserve.config import LlamaCppModel
from tcserve.core.request import GREEDY_BELOW, HUMAN_STOP
from tcserve.errors import InvalidRequest

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
VOCABULARY = {
    "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
    "request_too_large", "rate_limit_error", "api_error", "overloaded_error",
}  # fmt: skip
OUTCOMES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


FAKE_REPLY = " fuzz fuzzy ünïcödé 😀 zz zzz\u2028line\n\nHuman: then fuzz again <eos>"
"""Overlapping words, multibyte text, a line separator, and the Human turn that
every request stops at."""


def _app() -> object:
    return create_app(server_settings(), [fake_model(reply=FAKE_REPLY)])


schema = schemathesis.openapi.from_dict(_app().openapi())  # type: ignore[attr-defined]
# Valid requests and, mostly, invalid ones: wrong types, missing fields, bad headers.
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])


@pytest.fixture(scope="module")
def live() -> Iterator[str]:
    with serve_app(_app()) as url:  # type: ignore[arg-type]
        yield url
    bad = {k: v for k, v in OUTCOMES.items() if k != "ok"}
    print(f"\nfuzzed {sum(OUTCOMES.values())} requests: {OUTCOMES['ok']} well-formed, problems: {bad or 0}; "
          f"{STATUSES[200]} answered 200; statuses {dict(sorted(STATUSES.items()))}")  # fmt: skip


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


# Valid requests at the edges of what the API accepts.
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40).filter(
    lambda t: "\n\nHuman:" not in t and "\n\nAssistant:" not in t
)
_temperatures = st.sampled_from([0.0, 5e-324, 1e-300, 1e-46, 1e-6, 1e-5, 0.5, 1.0]) | st.floats(0, 1)
_stops = st.lists(
    st.sampled_from(["fuzz", "uzz", "zz", "zzz", "ünï", "😀", " ", "\n", "\u2028", "Human", "never seen"])
    | _text.filter(bool),
    max_size=12,
)


@st.composite
def valid_requests(draw: st.DrawFn, context: int, longest: int | None = None) -> dict[str, object]:
    """`longest`: the most tokens to ask for (default: up to the context)."""
    system = draw(st.sampled_from(["", "You are terse.", "Système: ☃"]) | _text)
    human = draw(_text)
    prefill = draw(st.sampled_from(["", " Sure", " ☃ 😀"]) | _text)
    prompt = f"{system}\n\nHuman: {human}\n\nAssistant:{prefill}"
    request: dict[str, object] = {
        "model": draw(st.sampled_from(["fake", "claude-sonnet-4-5", "claude-3-haiku-20240307"])),
        "prompt": prompt,
        "max_tokens_to_sample": draw(st.integers(1, 16) | st.integers(1, longest or context - len(prompt) - 1)),
        "temperature": draw(_temperatures),
    }
    if draw(st.booleans()):
        request["stop_sequences"] = draw(_stops)
    if draw(st.booleans()):
        request["top_p"] = draw(st.sampled_from([0.0, 1e-9, 0.5, 1.0]) | st.floats(0, 1))
    if draw(st.booleans()):
        request["top_k"] = draw(st.sampled_from([0, 1, 2, 40, 10**9]))
    if draw(st.booleans()):
        request["metadata"] = {"user_id": draw(_text)}
    return request


def check_invariants(client: anthropic.Anthropic, request: dict[str, object], *, deterministic: bool) -> None:
    """One request, streamed and not; the contract's invariants on both answers."""
    whole = client.completions.create(**request)  # type: ignore[call-overload]
    events = list(client.completions.create(**request, stream=True))  # type: ignore[call-overload]
    STATUSES[200] += 2
    OUTCOMES["ok"] += 2
    stops = {HUMAN_STOP, *request.get("stop_sequences", [])}  # type: ignore[misc]
    finals = [event for event in events if event.stop_reason is not None]
    assert finals == events[-1:], "exactly one final event, the last"
    streamed = "".join(event.completion for event in events)
    for answer, text in ((whole, whole.completion), (events[-1], streamed)):
        text.encode("utf-8")  # whole characters, no lone surrogates
        assert not any(stop in text for stop in stops), f"stop text leaked: {text!r}"
        assert answer.stop_reason in ("stop_sequence", "max_tokens")
        if answer.stop is not None:
            assert answer.stop_reason == "stop_sequence" and answer.stop in stops
        if answer.stop_reason == "max_tokens":
            assert answer.stop is None
    if deterministic:
        assert streamed == whole.completion
        assert (events[-1].stop_reason, events[-1].stop) == (whole.stop_reason, whole.stop)


@given(request=valid_requests(context=8192))
@settings(max_examples=EXAMPLES * 3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_valid_requests_at_the_edges_are_served_within_the_contract(request: dict[str, object], live: str) -> None:
    with anthropic.Anthropic(base_url=live, api_key="unused", max_retries=0) as client:
        check_invariants(client, request, deterministic=True)  # the fake engine ignores sampling


@pytest.fixture(scope="module")
def real_model() -> Iterator[str]:
    app = create_app(server_settings(), [LlamaCppModel(name="gemma-3-270m", context_size=1024)])
    with serve_app(app) as url:
        yield url


def test_most_fuzzed_requests_reach_generation() -> None:
    """Last in the module: at least half of this run's requests got a 200."""
    if not STATUSES:
        pytest.skip("no requests were fuzzed in this run")
    assert STATUSES[200] * 2 >= sum(STATUSES.values()), dict(STATUSES)


@pytest.mark.model
@given(request=valid_requests(context=1024, longest=24))
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_valid_requests_at_the_edges_on_the_real_model(request: dict[str, object], real_model: str) -> None:
    """A short run on the real model, where sampling is real: greedy requests must stream
    exactly what they answer whole (the engine is idle between them)."""
    request = {**request, "model": "claude-sonnet-4-5"}
    greedy = float(request["temperature"]) < GREEDY_BELOW or request.get("top_k") == 1  # type: ignore[arg-type]
    with anthropic.Anthropic(base_url=real_model, api_key="unused", max_retries=0, timeout=240) as client:
        check_invariants(client, request, deterministic=greedy)


@pytest.mark.model
@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_a_tiny_temperature_on_the_real_model_is_greedy(real_model: str, temperature: float) -> None:
    request = {"model": "gemma-3-270m", "prompt": "\n\nHuman: Name a colour.\n\nAssistant:", "max_tokens_to_sample": 8}
    with anthropic.Anthropic(base_url=real_model, api_key="unused", max_retries=0) as client:
        greedy = client.completions.create(**request, temperature=0.0)  # type: ignore[call-overload]
        tiny = client.completions.create(**request, temperature=temperature)  # type: ignore[call-overload]
    assert greedy.completion and tiny.completion == greedy.completion
