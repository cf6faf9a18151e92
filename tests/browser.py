"""Headless Chromium for the page tests: Debian's build, driven by Playwright.

Never `playwright install`: the browser is /usr/bin/chromium (CI installs it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying hosts this
# machine cannot reach.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
# Where screenshots go: git-ignored, kept after the run for a person to look at.
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
# Fail in seconds, not Playwright's default 30 s, when something never shows.
TIMEOUT_MS = 10_000

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install -y chromium)"
)


@asynccontextmanager
async def open_page(base_url: str, width: int, height: int) -> AsyncIterator[Page]:
    """A fresh page in headless Chromium; the browser closes on the way out."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(
                base_url=base_url, viewport={"width": width, "height": height}
            )
            context.set_default_timeout(TIMEOUT_MS)
            yield await context.new_page()
            await context.close()
        finally:
            await browser.close()
