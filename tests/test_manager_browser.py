"""The manager's dashboard in a real browser: headless Chromium driven by Playwright.

The manager listens on a real loopback port and runs a local pool of real
``imagecache node`` processes; its collector samples the pool every 0.3 s so
that the statistics page catches up with a resize within a second. Needs
Debian's ``chromium``; the test skips, saying why, only where
``/usr/bin/chromium`` is absent.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import ConsoleMessage, Dialog, Page, Request, Response, expect

from imagecache.config import Config, with_data_dir
from imagecache.sampling import INITIAL_RATE
from manager.app import create_app as create_manager
from tests.browser import OUTPUT, needs_chromium, open_page
from tests.processes import early_in_a_minute
from tests.test_manager import PASSWORD, TOKEN, free_port_range
from tests.test_samplingrate import sampled_keys

COLLECT_SECONDS = 0.3
# How long the statistics page may take to show a resize (many collector periods).
CHART_DEADLINE_SECONDS = 10.0
TITLES = [
    "Workers",
    "Miss rate (%)",
    "Hit rate (%)",
    "Items",
    "Items size (MB)",
    "Requests (per minute)",
    "Reads no pool size can fix (per minute)",
    "Predicted miss rate by pool size (%)",
]

pytestmark = needs_chromium

# The points a chart draws, oldest first, as [x label (HH:MM), value as shown]:
# pygal writes both into <desc> elements of each point's <g class="dots">.
CHART_POINTS = """
title => Array.from(
  document.querySelectorAll(`figure.chart[data-title="${title}"] svg g.dots`),
  dots => [
    dots.querySelector("desc.x_label")?.textContent ?? "",
    dots.querySelector("desc.value")?.textContent ?? "",
  ],
)
"""


@pytest.fixture
async def base_url(tmp_path: Path) -> AsyncIterator[str]:
    """The manager with its pool of one node, on a free port of 127.0.0.1, early
    enough in a minute that the curve's first window lasts a test."""
    await early_in_a_minute(20)
    base = with_data_dir(Config(), tmp_path / "data")
    config = replace(
        base,
        gateway=replace(base.gateway, manager_token=TOKEN),
        manager=replace(
            base.manager,
            password=PASSWORD,
            first_port=free_port_range(),
            collect_seconds=COLLECT_SECONDS,
        ),
    )
    async with TestServer(create_manager(config), host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")


@pytest.fixture
async def page(base_url: str) -> AsyncIterator[Page]:
    """A fresh page in headless Chromium; closed before the server (it depends on it)."""
    async with open_page(base_url, 1280, 800) as page:
        yield page


def record_problems(page: Page, base_url: str) -> list[str]:
    """Collect 4xx/5xx answers, requests off the manager's origin and console errors.

    The browser's own request for /favicon.ico (the manager has none: a 404) is left out.
    """
    problems: list[str] = []
    origin = urlsplit(base_url).netloc

    def on_response(response: Response) -> None:
        if response.status >= 400:
            problems.append(f"{response.status} {response.request.method} {response.url}")

    def on_request(request: Request) -> None:
        url = urlsplit(request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.netloc != origin:
            problems.append(f"request off the manager's origin: {request.url}")

    def on_console(message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        where = message.location.get("url", "")
        if urlsplit(where).path != "/favicon.ico":
            problems.append(f"console error: {message.text} ({where})")

    page.on("response", on_response)
    page.on("request", on_request)
    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    return problems


def minute_label() -> str:
    """The current minute as the charts label it (HH:MM, UTC)."""
    return datetime.now(UTC).strftime("%H:%M")


async def chart_points(page: Page, title: str) -> list[tuple[str, str]]:
    points: list[list[str]] = await page.evaluate(CHART_POINTS, title)
    return [(label, value) for label, value in points]


async def wait_for_current_workers(page: Page, workers: int) -> list[tuple[str, str]]:
    """Reload /stats until the Workers chart's last point is ``workers`` in the current minute.

    Returns the Workers chart's points as last seen; fails after CHART_DEADLINE_SECONDS.
    """
    deadline = time.monotonic() + CHART_DEADLINE_SECONDS
    points: list[tuple[str, str]] = []
    while True:
        before = minute_label()
        await page.goto("/stats")
        minutes = {before, minute_label()}  # a minute may turn during the load
        points = await chart_points(page, "Workers")
        if points and points[-1][0] in minutes and points[-1][1] == str(workers):
            return points
        if time.monotonic() > deadline:
            pytest.fail(
                f"the Workers chart did not show {workers} for {sorted(minutes)} within "
                f"{CHART_DEADLINE_SECONDS:g} s; its points: {points}"
            )
        await asyncio.sleep(COLLECT_SECONDS)


async def test_log_in_expand_and_see_it_in_statistics_and_activity(
    page: Page, base_url: str
) -> None:
    problems = record_problems(page, base_url)

    # Any page leads to the login form first; a wrong password is refused.
    async with page.expect_navigation(url="**/login?next=/config"):
        await page.goto("/config")
    await expect(page.locator("h1")).to_have_text("Log in")
    await page.fill("#password", "not the password")
    async with page.expect_navigation() as navigation:
        await page.click("button[type=submit]")
    response = await navigation.value
    assert response is not None
    assert response.status == 401
    await expect(page.locator("p.flash.error")).to_have_text("Wrong password.")
    await expect(page.locator("h1")).to_have_text("Log in")
    # That 401 is the one error answer expected: it, and the console's note of it, only.
    assert problems == [
        f"401 POST {base_url}/login",
        "console error: Failed to load resource: the server responded with a status of 401 "
        f"(Unauthorized) ({base_url}/login)",
    ], problems
    problems.clear()

    # The right password leads back to where the login was asked for.
    await page.fill("#password", PASSWORD)
    async with page.expect_navigation(url="**/config"):
        await page.click("button[type=submit]")
    await expect(page.locator("h1")).to_have_text("Memory Configuration")
    await expect(page.locator("span#workers")).to_have_text("1")

    # Expand by 2: the pool goes from 1 to 3 nodes, and all three answer.
    await page.fill("#expand-count", "2")
    async with page.expect_navigation(url="**/config"):
        await page.click("button#expand")
    flash = page.locator("p.flash.success")
    await expect(flash).to_be_visible()
    await expect(flash).to_contain_text("from 1 to 3 nodes")
    await expect(page.locator("span#workers")).to_have_text("3")
    await expect(page.locator("td .ok")).to_have_count(3)
    # The message was shown once: it is gone on the next visit.
    await page.reload()
    await expect(page.locator("p.flash")).to_have_count(0)

    # Memory Statistics: eight charts; the Workers chart shows 3 for the current minute.
    points = await wait_for_current_workers(page, 3)
    await expect(page.locator("h1")).to_have_text("Memory Statistics")
    figures = page.locator("figure.chart")
    await expect(figures).to_have_count(len(TITLES))
    titles = [await figures.nth(i).get_attribute("data-title") for i in range(len(TITLES))]
    assert titles == TITLES
    await expect(page.locator("figure.chart svg")).to_have_count(len(TITLES))
    # Scripts only from the manager itself (pygal's default tooltip script is a CDN's).
    sources = await page.locator("script[src]").evaluate_all("all => all.map(s => s.src)")
    assert sources == [f"{base_url}/static/dashboard.js"], sources
    # Drawn at a readable size, not collapsed.
    for i in range(len(TITLES)):
        box = await figures.nth(i).locator("svg").bounding_box()
        assert box is not None
        assert box["width"] >= 300, (TITLES[i], box)
        assert box["height"] >= 120, (TITLES[i], box)
    assert {value for _, value in points} <= {"1", "3"}, points
    # The other charts have data for this minute too (counters all zero: no lookups).
    items = await chart_points(page, "Items")
    assert items, "the Items chart has no point"
    assert items[-1] == (points[-1][0], "0"), items
    OUTPUT.mkdir(exist_ok=True)
    await page.screenshot(path=OUTPUT / "manager-stats.png", full_page=True)

    # The page's own refresh replaces the charts with fresh ones from /stats/charts.
    await page.clock.install()  # from here on, the page's timers run on a fake clock
    await page.reload()
    await page.evaluate("document.querySelector('#charts figure').dataset.stale = 'yes'")
    async with page.expect_response("**/stats/charts") as refreshed:
        await page.clock.run_for(15_000)
    assert (await refreshed.value).status == 200
    await expect(page.locator("figure.chart[data-stale]")).to_have_count(0)
    await expect(page.locator("figure.chart")).to_have_count(len(TITLES))
    assert await chart_points(page, "Workers"), "the refreshed Workers chart has no point"

    # Activity: the resize, its status, its sizes, the nodes it started and its cause.
    await page.goto("/activity")
    rows = page.locator("table#resizes tbody tr")
    await expect(rows).to_have_count(1)
    cells = rows.first.locator("td")
    await expect(cells.nth(1)).to_have_text("done")
    await expect(cells.nth(2)).to_have_text("1")
    await expect(cells.nth(3)).to_have_text("3")
    await expect(cells.nth(4)).to_have_text("2 started")
    await expect(cells.nth(5)).to_contain_text("manual expand by 2")
    when = await cells.nth(0).inner_text()
    at = datetime.strptime(when, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - at).total_seconds()) < 120, when

    assert problems == [], "\n".join(problems)


async def log_in(page: Page) -> None:
    await page.goto("/login?next=/config")
    await page.fill("#password", PASSWORD)
    async with page.expect_navigation(url="**/config"):
        await page.click("button[type=submit]")


async def test_delete_all_asks_first_and_cancelling_deletes_nothing(
    page: Page, base_url: str, tmp_path: Path
) -> None:
    problems = record_problems(page, base_url)
    await log_in(page)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    dialogs: list[str] = []

    async def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.once("dialog", dismiss)
    await page.fill("#confirm", "delete")
    await page.click("button#delete-all")
    for _ in range(50):
        if dialogs:
            break
        await asyncio.sleep(0.1)
    assert len(dialogs) == 1, "no confirmation dialog before deleting everything"
    assert "cannot be undone" in dialogs[0]
    await page.wait_for_timeout(300)  # time for a submission that should not happen
    assert posts == [], posts
    await expect(page.locator("p.flash")).to_have_count(0)
    await expect(page.locator("#confirm")).to_have_value("delete")
    await page.screenshot(path=tmp_path / "delete-all-cancelled.png")

    # Accepting it deletes (there is nothing stored: 0 images).
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    async with page.expect_navigation(url="**/config"):
        await page.click("button#delete-all")
    await expect(page.locator("p.flash.success")).to_contain_text("Deleted all application data")
    assert problems == [], "\n".join(problems)


async def test_hovering_a_chart_point_shows_its_value(
    page: Page, base_url: str, tmp_path: Path
) -> None:
    problems = record_problems(page, base_url)
    await log_in(page)
    await wait_for_current_workers(page, 1)
    tip = page.locator("#chart-tip")
    await expect(tip).to_be_hidden()
    point = page.locator('figure.chart[data-title="Workers"] svg g.dots circle').last
    await point.hover()
    await expect(tip).to_be_visible()
    label = (await chart_points(page, "Workers"))[-1][0]
    await expect(tip).to_have_text(re.compile(rf"^{label} UTC: 1( \(partial minute, so far\))?$"))
    # Next to the point, not somewhere else on the page.
    tip_box, point_box = await tip.bounding_box(), await point.bounding_box()
    assert tip_box is not None
    assert point_box is not None
    assert abs(tip_box["x"] + tip_box["width"] / 2 - point_box["x"]) < 20, (tip_box, point_box)
    assert 0 < point_box["y"] - tip_box["y"] < 60, (tip_box, point_box)
    await page.screenshot(path=tmp_path / "chart-tip.png")
    # Off the charts, the tip goes away.
    await page.mouse.move(5, 5)
    await expect(tip).to_be_hidden()
    assert problems == [], "\n".join(problems)


async def test_a_resize_by_the_api_shows_on_the_open_configuration_page(
    page: Page, base_url: str, tmp_path: Path
) -> None:
    problems = record_problems(page, base_url)
    await log_in(page)
    await expect(page.locator("span#workers")).to_have_text("1")
    await expect(page.locator("#expand-count")).to_have_attribute("max", "7")
    await expect(page.locator("table#nodes tbody tr")).to_have_count(1)
    # The user is filling in a form meanwhile: the refresh must leave it alone.
    await page.fill("#cacheSize", "12")
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base_url}/internal/configure_cache",
            data={"numNodes": "3"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as reply,
    ):
        assert reply.status == 200, await reply.text()

    await expect(page.locator("span#workers")).to_have_text("3")
    rows = page.locator("table#nodes tbody tr")
    await expect(rows).to_have_count(3)
    # Each node's health from its STATS: answers, items, MB, hit rate, uptime.
    for i in range(3):
        cells = rows.nth(i).locator("td")
        await expect(cells.nth(2)).to_have_text("yes")
        await expect(cells.nth(3)).to_have_text("0")
        await expect(cells.nth(4)).to_have_text("0.0")
        await expect(cells.nth(5)).to_have_text("\N{EN DASH}")
        await expect(cells.nth(6)).to_have_text(re.compile(r"^\d+ s$"))
    await expect(page.locator("#expand-count")).to_have_attribute("max", "5")
    await expect(page.locator("#shrink-count")).to_have_attribute("max", "2")
    await expect(page.locator("#cacheSize")).to_have_value("12")
    assert navigations == [], navigations
    await page.screenshot(path=tmp_path / "config-after-api-resize.png", full_page=True)

    # Past the limit, the manager's own message, not the browser's bubble.
    await page.fill("#expand-count", "9")
    async with page.expect_navigation(url="**/config"):
        await page.click("button#expand")
    await expect(page.locator("p.flash.error")).to_contain_text("would leave 12 nodes")
    await expect(page.locator("span#workers")).to_have_text("3")
    assert problems == [], "\n".join(problems)


async def test_a_refused_settings_change_keeps_the_values_and_names_the_labels(
    page: Page, base_url: str, tmp_path: Path
) -> None:
    await log_in(page)
    await page.select_option("#mode", "auto")
    await page.fill("#cacheSize", "32")
    await page.fill("#maxMiss", "0.3")
    await page.fill("#minMiss", "0.6")  # above maxMiss: refused
    async with page.expect_navigation() as navigation:
        await page.click("button#save-settings")
    response = await navigation.value
    assert response is not None
    assert response.status == 400
    flash = page.locator("p.flash.error")
    await expect(flash).to_contain_text("Nothing changed")
    await expect(flash).to_contain_text("“Shrink when the miss rate is below”")
    await expect(flash).to_contain_text("“Grow when the miss rate is above”")
    assert "minMiss" not in await flash.inner_text()
    # What the user typed is still there, the refused fields marked.
    await expect(page.locator("#cacheSize")).to_have_value("32")
    await expect(page.locator("#maxMiss")).to_have_value("0.3")
    await expect(page.locator("#minMiss")).to_have_value("0.6")
    await expect(page.locator("#mode")).to_have_value("auto")
    await expect(page.locator("#minMiss")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#cacheSize")).not_to_have_attribute("aria-invalid", "true")
    await page.screenshot(path=tmp_path / "settings-refused.png", full_page=True)
    # Nothing was saved.
    await page.goto("/config")
    await expect(page.locator("#cacheSize")).to_have_value("64")
    await expect(page.locator("#mode")).to_have_value("manual")


async def test_the_curve_chart_shows_the_predicted_miss_rate_of_each_size(
    page: Page, base_url: str, tmp_path: Path
) -> None:
    problems = record_problems(page, base_url)
    await log_in(page)
    await page.goto("/stats")
    curve = page.locator('figure.chart[data-title="Predicted miss rate by pool size (%)"]')
    await expect(curve.locator("p.chart-note")).to_contain_text("No prediction yet")
    await expect(curve.locator("svg g.dots")).to_have_count(0)

    # A gateway's post at the manager's first rate, of two keys in its sample:
    # each missed once in two reads, at every pool size; 4 of 512 lookups sampled.
    a, b = sampled_keys(INITIAL_RATE, 2)
    lookups = round(4 / INITIAL_RATE)
    samples = {
        "lookups": lookups,
        "samples": [[a, 100], [b, 100], [a, 100], [b, 100]],
        "rate": INITIAL_RATE,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base_url}/internal/key_samples",
            json=samples,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as reply,
    ):
        assert reply.status == 200, await reply.text()
    await page.reload()

    await expect(curve.locator("svg g.dots")).to_have_count(8)
    await expect(curve.locator("svg g.current-size")).to_have_count(1)
    await expect(curve.locator("svg g.threshold")).to_have_count(2)
    await expect(curve.locator("p.chart-note")).to_contain_text(f"4 sampled of {lookups} lookups")
    box = await curve.locator("svg").bounding_box()
    assert box is not None
    assert box["width"] >= 300, box
    # Hovering the pool's own size shows its prediction, and says it is the size now.
    await curve.locator("svg g.dots.current circle").hover()
    tip = page.locator("#chart-tip")
    await expect(tip).to_have_text("1 node (the pool's size now): 50%")
    await curve.locator("svg g.dots circle").nth(5).hover()
    await expect(tip).to_have_text("6 nodes: 50%")
    await curve.screenshot(path=tmp_path / "curve-chart.png")
    await page.screenshot(path=tmp_path / "stats-with-curve.png", full_page=True)
    assert problems == [], "\n".join(problems)


async def test_a_lapsed_session_leaves_the_charts_in_place(page: Page, base_url: str) -> None:
    await log_in(page)
    await page.clock.install()  # the page's refresh timer runs on a fake clock
    await page.goto("/stats")
    await expect(page.locator("figure.chart")).to_have_count(len(TITLES))
    # The session ends (expired, logged out elsewhere): the refresh gets the login page.
    await page.context.clear_cookies()

    async with page.expect_response(lambda response: "/login" in response.url) as answer:
        await page.clock.run_for(15_000)
    assert (await answer.value).status == 200
    await page.wait_for_timeout(500)  # time for the page to (wrongly) show what it got

    await expect(page.locator("figure.chart")).to_have_count(len(TITLES))
    await expect(page.locator("#charts input")).to_have_count(0)
