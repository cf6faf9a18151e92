"""The gateway's pages in a real browser: headless Chromium driven by Playwright.

The gateway listens on a real loopback port (not aiohttp's in-memory client), so
the browser loads the pages, the stylesheet and the image bytes over HTTP the
way a user's browser does. Needs Debian's ``chromium`` (CI installs it); the
tests skip, saying why, only where ``/usr/bin/chromium`` is absent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Page, Response, expect

from imagecache.app import create_app
from imagecache.config import Config
from tests.browser import OUTPUT, needs_chromium, open_page
from tests.conftest import image_bytes

pytestmark = needs_chromium

# True once #picture has finished loading, whether it decoded or failed.
PICTURE_LOADED = (
    "() => { const img = document.getElementById('picture'); return img !== null && img.complete; }"
)
PICTURE_WIDTH = "() => document.getElementById('picture').naturalWidth"
PICTURE_HEIGHT = "() => document.getElementById('picture').naturalHeight"


@pytest.fixture
async def base_url(gateway_config: Config) -> AsyncIterator[str]:
    """The gateway served on a free port of 127.0.0.1, as ``http://127.0.0.1:PORT``."""
    async with TestServer(create_app(gateway_config), host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")


@pytest.fixture
async def page(base_url: str) -> AsyncIterator[Page]:
    """A fresh page in headless Chromium; closed before the server (it depends on it)."""
    async with open_page(base_url, 1024, 720) as page:
        yield page


def record_http_errors(page: Page) -> list[str]:
    """Collect every response of the page answered with 4xx/5xx (a missing stylesheet...)."""
    errors: list[str] = []

    def on_response(response: Response) -> None:
        if response.status >= 400:
            errors.append(f"{response.status} {response.request.method} {response.url}")

    page.on("response", on_response)
    return errors


async def assert_picture_renders(page: Page, width: int, height: int) -> None:
    """#picture is on the page, has loaded and decoded as an image of that size."""
    await expect(page.locator("#picture")).to_be_visible()
    await page.wait_for_function(PICTURE_LOADED)
    # A broken image is complete too, with naturalWidth 0: check it apart for a clear failure.
    natural_width = await page.evaluate(PICTURE_WIDTH)
    assert natural_width > 0, "the image did not render (naturalWidth is 0)"
    assert natural_width == width
    assert await page.evaluate(PICTURE_HEIGHT) == height


async def test_add_show_and_list_an_image_in_the_browser(page: Page, tmp_path: Path) -> None:
    errors = record_http_errors(page)
    picture = tmp_path / "sunset.png"
    picture.write_bytes(image_bytes("PNG", (64, 48), (240, 120, 30)))

    # Add image: fill the form and submit it; the answer redirects to the image.
    await page.goto("/")
    await expect(page.locator("h1")).to_have_text("Add image")
    await page.fill("#key", "sunset")
    await page.set_input_files("#file", picture)
    async with page.expect_navigation(url="**/show?key=sunset") as navigation:
        await page.click("button[type=submit]")
    response = await navigation.value
    assert response is not None
    assert response.status == 200
    flash = page.locator("p.flash.success")
    await expect(flash).to_be_visible()
    await expect(flash).to_have_text("Stored a new image under key 'sunset'.")
    await assert_picture_renders(page, 64, 48)
    # The stylesheet applied (not merely linked): the flash is styled as a box.
    padding = await flash.evaluate("element => getComputedStyle(element).paddingTop")
    assert padding != "0px", "style.css did not apply"

    # Show image: use the page's own form for the key; the message was shown once.
    await page.goto("/show")
    await expect(page.locator("#picture")).to_have_count(0)
    await page.fill("#key", "sunset")
    async with page.expect_navigation(url="**/show?key=sunset"):
        await page.click("button[type=submit]")
    await expect(page.locator("h1")).to_have_text("Show image")
    await expect(page.locator("p.flash")).to_have_count(0)
    await assert_picture_renders(page, 64, 48)
    await expect(page.locator("figcaption")).to_contain_text("sunset · image/png")
    OUTPUT.mkdir(exist_ok=True)
    await page.screenshot(path=OUTPUT / "gateway-show.png", full_page=True)

    # Keys: the key is listed, and its link leads to the image.
    await page.goto("/keys")
    rows = page.locator("table.keys tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("image/png")
    await expect(rows.first).to_contain_text("64 \u00d7 48")
    link = rows.first.get_by_role("link", name="sunset", exact=True)
    assert await link.get_attribute("href") == "/show?key=sunset"
    async with page.expect_navigation(url="**/show?key=sunset"):
        await link.click()
    await assert_picture_renders(page, 64, 48)

    assert errors == []


async def test_a_text_file_named_png_is_refused_in_the_browser(page: Page, tmp_path: Path) -> None:
    errors = record_http_errors(page)
    fake = tmp_path / "notes.png"
    fake.write_text("These are notes, not a picture.\n")

    await page.goto("/")
    await page.fill("#key", "notes")
    await page.set_input_files("#file", fake)
    async with page.expect_navigation() as navigation:
        await page.click("button[type=submit]")
    response = await navigation.value
    assert response is not None
    assert response.status == 400
    flash = page.locator("p.flash.error")
    await expect(flash).to_be_visible()
    await expect(flash).to_contain_text("Nothing was stored")
    await expect(page.locator("h1")).to_have_text("Add image")
    await expect(page.locator("#picture")).to_have_count(0)

    await page.goto("/keys")
    await expect(page.locator("p.empty")).to_contain_text("No images yet")
    await expect(page.locator("table.keys")).to_have_count(0)

    # The refused upload is the only error answer the browser saw.
    assert len(errors) == 1, errors
    assert errors[0].startswith("400 POST "), errors
