"""The What-if page in a real browser: headless Chromium driven by Playwright.

A manager on a real loopback port, with a local pool of real node processes,
over a metadata database that holds a recorded run (tests.test_whatif_report).
Needs Debian's ``chromium``; skips, saying why, only where it is absent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Page, expect

from imagecache.config import Config, with_data_dir
from manager.app import create_app as create_manager
from tests.browser import OUTPUT, needs_chromium, open_page
from tests.test_manager import PASSWORD, TOKEN, free_port_range
from tests.test_manager_browser import record_problems
from tests.test_whatif_report import MINUTE, record_run

pytestmark = needs_chromium


@pytest.fixture
async def base_url(tmp_path: Path) -> AsyncIterator[str]:
    """The manager over 20 recorded minutes that ended 3 minutes ago."""
    base = with_data_dir(Config(), tmp_path / "data")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    await record_run(base.metadata_url, now - 23 * MINUTE, 20)
    config = replace(
        base,
        gateway=replace(base.gateway, manager_token=TOKEN),
        manager=replace(base.manager, password=PASSWORD, first_port=free_port_range()),
    )
    async with TestServer(create_manager(config), host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")


@pytest.fixture
async def page(base_url: str) -> AsyncIterator[Page]:
    async with open_page(base_url, 1280, 900) as page:
        yield page


async def test_the_whatif_page_in_a_browser(page: Page, base_url: str) -> None:
    problems = record_problems(page, base_url)
    await page.goto("/login?next=/config")
    await page.fill("#password", PASSWORD)
    async with page.expect_navigation(url="**/config"):
        await page.click("button[type=submit]")
    # From the navigation bar; the form shows the stored settings.
    async with page.expect_navigation(url="**/whatif"):
        await page.click("nav >> text=What-if")
    await expect(page.locator("h1")).to_have_text("What-if")
    await expect(page.locator("#whatif-maxMiss")).to_have_value("0.3")
    await expect(page.locator("#whatif-scaling")).to_have_value("ratio")
    totals = page.locator("#whatif-totals tbody tr")
    await expect(totals.nth(0)).to_have_text("Resizes03")  # the ratio rule: 1, 2, 4, 8

    # The predictive policy over the last 30 minutes: one jump, to 5 nodes.
    await page.select_option("#whatif-scaling", "predictive")
    await page.fill("#whatif-minutes", "30")
    async with page.expect_navigation(url="**/whatif?*scaling=predictive*"):
        await page.click("#replay")
    await expect(totals.nth(0)).to_have_text("Resizes01")
    await expect(page.locator("#whatif-scaling")).to_have_value("predictive")
    chart = page.locator("#whatif-sizes svg")
    await expect(chart).to_be_visible()
    assert await chart.locator("polyline").count() == 2
    box = await chart.bounding_box()
    assert box is not None
    assert box["width"] > 300
    await expect(page.locator("#whatif-minutes tbody tr").first).to_contain_text("5")
    OUTPUT.mkdir(exist_ok=True)
    await page.screenshot(path=OUTPUT / "manager-whatif.png", full_page=True)

    # A refused value: the page says which field, by its label, and keeps what was typed.
    await page.fill("#whatif-maxMiss", "1.5")
    async with page.expect_navigation() as navigation:
        await page.click("#replay")
    response = await navigation.value
    assert response is not None
    assert response.status == 400
    await expect(page.locator("p.flash.error")).to_contain_text(
        "“Grow when the miss rate is above”"
    )
    await expect(page.locator("#whatif-maxMiss")).to_have_value("1.5")
    await expect(page.locator("#whatif-maxMiss")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#whatif-totals")).to_have_count(0)
    await page.screenshot(path=OUTPUT / "manager-whatif-refused.png", full_page=True)
    # That 400 is the one error answer expected: it, and the console's note of it, only.
    assert [p for p in problems if "400" not in p] == [], "\n".join(problems)
    assert len(problems) <= 2, problems
