"""The browser playground: its files and switches over plain HTTP, then the page
itself in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; no browser is ever downloaded), on the fake engine and on the real
embedded model."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anthropic
import httpx
import pytest

from support import VERSION, fake_model, serve_app, settings
from tcserve.api.app import create_app
from tcserve.cli.main import _parser
from tcserve.config import LlamaCppModel, Settings
from tcserve.core.transcript import BAD_END, BAD_START

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "sk-playground-right"
LONG_REPLY = " ".join(f"word{i}" for i in range(400))


# ---- over HTTP: what is served, to whom --------------------------------------------------


def test_page_and_files_are_public_but_the_api_is_not() -> None:
    app = create_app(settings(api_keys=(KEY,)), [fake_model()])
    with serve_app(app) as url:
        for path in ("/", "/playground"):
            page = httpx.get(url + path)
            assert page.status_code == 200
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            assert "connect-src 'self'" in page.headers["content-security-policy"]
            assert '<script src="/playground/app.js"' in page.text
            assert "fake" not in page.text  # nothing about the server is in the page
        assert httpx.get(url + "/playground/app.js").headers["content-type"].startswith("text/javascript")
        assert httpx.get(url + "/playground/app.css").headers["content-type"].startswith("text/css")
        models = httpx.get(url + "/v1/models", headers=VERSION)
        assert models.status_code == 401
        assert models.json()["error"]["type"] == "authentication_error"


def test_no_playground_makes_its_paths_unknown() -> None:
    with serve_app(create_app(settings(playground=False), [fake_model()])) as url:
        for path in ("/", "/playground", "/playground/app.js"):
            answer = httpx.get(url + path)
            assert answer.status_code == 404
            assert answer.json()["error"] == {"type": "not_found_error", "message": f"Not found: GET {path}"}
    with serve_app(create_app(settings(playground=False, api_keys=(KEY,)), [fake_model()])) as url:
        assert httpx.get(url + "/").status_code == 401  # like any unknown path: the key comes first


def test_the_switch_from_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().playground is True
    assert _parser().parse_args(["serve", "--no-playground"]).playground is False
    assert _parser().parse_args(["serve"]).playground is None  # not given: the variable or the default decides
    monkeypatch.setenv("TCSERVE_PLAYGROUND", "false")
    assert Settings().playground is False


# ---- in the browser --------------------------------------------------------------------


def _need_browser() -> None:
    """In CI a missing browser is a failure (`make test` installs it); elsewhere a skip that says how."""
    problem = None
    if importlib.util.find_spec("playwright") is None:
        problem = "playwright is not installed: pip install -e '.[test]'"
    elif not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing: make chromium (apt-get install chromium)"
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),  # a fresh user-data dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            bypass_csp=True,  # Playwright's own waits evaluate strings, which the page's CSP forbids
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    """A new tab (so a fresh sessionStorage); any script error on it fails the test."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield tab
    finally:
        tab.close()
    assert errors == []


class Served:
    def __init__(self, url: str, model: str, slow_model: str) -> None:
        self.url = url
        self.model = model
        self.slow_model = slow_model
        """A model whose stream lasts long enough to be stopped half-way."""
        self.real = model != "fake"


@pytest.fixture(scope="module", params=["fake", pytest.param("gemma-3-270m", marks=pytest.mark.model)])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    if request.param == "fake":
        models: list[Any] = [fake_model(token_delay=0.01), fake_model(name="slow", token_delay=0.05, reply=LONG_REPLY)]
        slow = "slow"
    else:
        models = [LlamaCppModel(name="gemma-3-270m", context_size=2048)]
        slow = "gemma-3-270m"
    app = create_app(settings(claude_model_ids=False), models)
    with serve_app(app) as url:
        yield Served(url, request.param, slow)


def _open(page: Page, url: str, model: str | None = None) -> None:
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    if model is not None:
        page.select_option("#model", model)


def _wait_state(page: Page, *states: str) -> str:
    page.wait_for_function(
        "states => states.includes(document.getElementById('state').textContent)", arg=list(states), timeout=120_000
    )
    return page.text_content("#state") or ""


def _record_output(page: Page) -> None:
    """Keep every value the output takes, to see the text arrive piece by piece."""
    page.evaluate(
        """() => {
            const node = document.getElementById('output-text');
            window.seen = [];
            new MutationObserver(() => window.seen.push(node.textContent))
                .observe(node, {childList: true, characterData: true, subtree: true});
        }"""
    )


def _greedy(served: Served, **body: Any) -> anthropic.types.Completion:
    with anthropic.Anthropic(base_url=served.url, api_key="any", max_retries=0) as client:
        return client.completions.create(model=served.model, temperature=0, **body)


@pytest.mark.browser
def test_a_transcript_streams_in_pieces_then_shows_stop_reason_and_timings(page: Page, served: Served) -> None:
    _open(page, served.url, served.model)
    page.fill("#system", "You answer in one short sentence.")
    page.locator(".turn-text").nth(0).fill("Say hello.")
    page.click("#add-assistant")
    page.locator(".turn-text").nth(1).fill("Hello!")
    page.click("#add-human")
    page.keyboard.type("Now say goodbye.")  # the new turn has the focus
    expected = "You answer in one short sentence.\n\nHuman: Say hello.\n\nAssistant: Hello!\n\nHuman: Now say goodbye."
    expected += "\n\nAssistant:"
    assert page.input_value("#raw-prompt") == expected
    assert "Follows" in (page.text_content("#rules") or "")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    _record_output(page)
    page.keyboard.press("Control+Enter")
    assert _wait_state(page, "Done", "Failed") == "Done"

    text = page.text_content("#output-text") or ""
    seen = [value for value in page.evaluate("window.seen") if value]
    assert len(set(seen)) > 1, seen  # more than one piece reached the page
    assert all(text.startswith(value) for value in seen) and seen[-1] == text
    answer = _greedy(served, prompt=expected, max_tokens_to_sample=24)
    assert text == answer.completion  # the page shows exactly what the API answers
    assert page.text_content("#stat-stop-reason") == answer.stop_reason
    assert page.text_content("#stat-stop") == json.dumps(answer.stop, ensure_ascii=False)
    assert re.fullmatch(r"\d+ ms", page.text_content("#stat-ttft") or "")
    assert re.fullmatch(r"\d+\.\d", page.text_content("#stat-tps") or "")
    assert re.fullmatch(r"req_\w+", page.text_content("#stat-request-id") or "")
    raw = page.text_content("#raw-events") or ""
    pieces = int(page.text_content("#stat-pieces") or 0)
    assert raw.count("event: completion\ndata: {") >= pieces == len(seen)
    assert f'"stop_reason":"{answer.stop_reason}"' in raw.rsplit("event: completion", 1)[1]


@pytest.mark.browser
def test_a_prompt_that_breaks_the_rules_shows_the_servers_400(page: Page, served: Served) -> None:
    _open(page, served.url, served.model)
    for prompt, message in (("Hello, world", BAD_START), ("\n\nHuman: Hello", BAD_END)):
        page.fill("#raw-prompt", prompt)
        assert page.text_content("#rules") == "✗ " + message  # checked as you type
        page.click("#send")
        assert _wait_state(page, "Refused (400)", "Done") == "Refused (400)"
        summary = page.text_content("#error-summary") or ""
        assert summary.startswith(f"400 invalid_request_error: {message}\nrequest-id: req_")
        request_id = summary.rsplit(" ", 1)[1]
        assert page.text_content("#stat-request-id") == request_id
        shown = page.text_content("#error-body") or ""
        assert f'"request_id": "{request_id}"' in shown and '"type": "error"' in shown


def _running(url: str, model: str) -> float:
    metrics = httpx.get(url + "/metrics").text
    found = re.search(rf'^tcserve_running_sequences\{{model="{re.escape(model)}"\}} (\S+)$', metrics, re.M)
    assert found, metrics
    return float(found.group(1))


@pytest.mark.browser
def test_stop_mid_stream_frees_the_slot(page: Page, served: Served) -> None:
    _open(page, served.url, served.slow_model)
    if served.real:  # a greedy count goes on for a long time
        page.fill("#prefill", "1, 2, 3, 4, 5,")
        page.fill("#temperature", "0")
    page.fill("#max-tokens", "1500")
    page.click("#send")
    page.wait_for_function("document.getElementById('output-text').textContent.length > 0", timeout=120_000)
    assert _running(served.url, served.slow_model) == 1
    page.keyboard.press("Escape")
    assert _wait_state(page, "Stopped", "Done") == "Stopped"
    assert page.text_content("#stat-stop-reason") == "stopped by you"
    deadline = time.monotonic() + 30
    while _running(served.url, served.slow_model) != 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


@pytest.mark.browser
def test_copy_as_python_gives_the_same_greedy_text(page: Page, served: Served, tmp_path: Path) -> None:
    _open(page, served.url, served.model)
    page.locator(".turn-text").nth(0).fill("Name three colours.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "20")
    page.fill("#stops", "\\n\\n\\n")
    page.click("#send")
    assert _wait_state(page, "Done", "Failed") == "Done"
    text = page.text_content("#output-text") or ""
    assert text

    page.click("[data-lang=python]")
    code = page.text_content("#code") or ""
    assert "client.completions.create(" in code and "stop_sequences=[" in code and KEY not in code
    script = tmp_path / "copied.py"
    script.write_text(code)
    env = {**os.environ, "ANTHROPIC_API_KEY": "any"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == text + "\n"


@pytest.mark.browser
def test_usable_at_a_phones_width_and_by_keyboard(page: Page, served: Served) -> None:
    if served.real:
        pytest.skip("layout does not depend on the model")
    page.set_viewport_size({"width": 390, "height": 844})
    _open(page, served.url)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(el => !el.closest('[hidden]'))
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
            .map(el => el.id || el.outerHTML)"""
    )
    assert unlabelled == []
    page.focus("#system")
    order = []
    for _ in range(5):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.getAttribute('aria-label') || document.activeElement.id"))
    assert order == ["Turn 1: speaker", "Turn 1: Human text", "Remove turn 1", "add-human", "add-assistant"]


@pytest.fixture(scope="module")
def keyed_url() -> Iterator[str]:
    with serve_app(create_app(settings(api_keys=(KEY,), claude_model_ids=False), [fake_model()])) as url:
        yield url


@pytest.mark.browser
def test_a_wrong_key_shows_the_401_and_the_right_one_works(page: Page, keyed_url: str) -> None:
    page.goto(keyed_url + "/")
    page.wait_for_selector("#key-panel:not([hidden])")  # GET /v1/models said 401
    assert page.evaluate("document.activeElement.id") == "api-key"
    assert page.locator("#model option").count() == 0  # without a key the page knows nothing
    summary = page.text_content("#error-summary") or ""
    assert summary.startswith("401 authentication_error: x-api-key header is required\nrequest-id: req_")

    page.fill("#api-key", "sk-wrong")
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('error-summary').textContent.includes('invalid x-api-key')")
    page.click("#send")
    assert _wait_state(page, "Refused (401)") == "Refused (401)"
    assert (page.text_content("#error-summary") or "").startswith("401 authentication_error: invalid x-api-key")

    page.fill("#api-key", KEY)
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    assert page.is_hidden("#error")
    page.click("#send")
    assert _wait_state(page, "Done", "Failed") == "Done"
    assert page.text_content("#output-text") == " Hello! I am a scripted test model."
    assert page.evaluate("[sessionStorage.getItem('tcserve.apiKey'), localStorage.length]") == [KEY, 0]
    assert KEY not in (page.text_content("#code") or "")
