"""The page at ``/``: served by the same process, calls only the API, and works in a real browser."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from tests.serve.conftest import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
API = {"/v1/models", "/v1/skills/"}   # what the page's script may call (a skill's name follows /v1/skills/)


async def test_the_page_is_served_and_its_script_calls_only_the_api(server: LiveServer):
    async with aiohttp.ClientSession() as http, http.get(server.url + "/") as response:
        assert response.status == 200 and response.content_type == "text/html"
        html = await response.text()
        policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert not re.search(r"https?://|//[a-z]", html, re.I)       # nothing from anywhere else
    assert not re.search(r"<(script|link|img|iframe)[^>]*(src|href)=", html, re.I)
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(scripts) == 1
    script = scripts[0]
    paths = set(re.findall(r"""["'`](/[^"'`\s]*)["'`]""", script))
    assert paths == API, paths
    assert "fetch(" in script and script.count("fetch(") == 2   # post() and the model list
    assert "eval(" not in script and "innerHTML" not in script  # answers are shown as text, never as markup


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser installed (/usr/bin/chromium); apt install chromium")
def test_a_browser_types_into_the_page_and_sees_both_answers(server: LiveServer):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(server.url + "/")
            # Waiting through locators, not page.wait_for_function: the page's CSP forbids eval, also the test's.
            expect(page.locator("#base-title")).to_contain_text("tiny-llama")

            page.select_option("#skill", "sentiment")
            page.fill("#text", "I loved every minute of this film")
            page.click("#go")
            expect(page.locator("#status")).to_contain_text("answered", timeout=60_000)
            base, adapter = page.text_content("#base"), page.text_content("#adapter")
            assert "%" in base and "%" in adapter and base != adapter
            assert page.text_content("#adapter-title") == "Adapter: sentiment"

            page.select_option("#skill", "story")
            page.fill("#text", "a dragon who loved tea")
            page.click("#go")
            expect(page.locator("#status")).to_contain_text("answered", timeout=60_000)
            expect(page.locator("#go")).to_be_enabled()
            base, adapter = page.text_content("#base"), page.text_content("#adapter")
            assert base and adapter and base != adapter
            assert page.text_content("#adapter-title") == "Adapter: story"
            assert not page.is_visible("#context")

            page.select_option("#skill", "qa")
            assert page.is_visible("#context")
            assert errors == []
        finally:
            browser.close()
