"""Take docs/playground.png: the playground on the embedded Gemma model, after one streamed answer.

    PYTHONPATH=src .venv/bin/python docs/playground_screenshot.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from playwright.sync_api import sync_playwright
from support import serve_app, settings
from test_playground import CHROMIUM, CHROMIUM_ARGS

from tcserve.api.app import create_app
from tcserve.config import LlamaCppModel


def main() -> None:
    app = create_app(settings(), [LlamaCppModel(name="gemma-3-270m", context_size=2048)])
    with serve_app(app) as url, sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, bypass_csp=True,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').options.length > 0")
        page.select_option("#model", "gemma-3-270m")
        page.fill("#system", "You are a helpful assistant who answers briefly.")
        page.locator(".turn-text").nth(0).fill("Why is the sky blue?")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "80")
        page.click("[data-lang=python]")
        page.click("#send")
        page.wait_for_function("document.getElementById('state').textContent === 'Done'", timeout=120_000)
        page.screenshot(path=str(Path(__file__).parent / "playground.png"), full_page=True)
        context.close()


if __name__ == "__main__":
    main()
