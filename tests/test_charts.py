"""The statistics page's charts: seven self-contained SVG line charts of 30 minutes,
and the miss curve (predicted miss rate per pool size)."""

from __future__ import annotations

import importlib
import itertools
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import ClientSession, CookieJar
from aiohttp.test_utils import TestServer

from manager.charts import render_charts
from manager.chartsvg import Chart, MissThresholds
from manager.curvechart import render_curve
from manager.curves import CurveWindow, MissCurves
from manager.metrics import MinuteStats
from manager.misscurve import POOL_SIZES
from manager.records import Activity
from manager.settings import CacheSettings
from tests.managers import sampling_manager
from tests.test_manager import PASSWORD, TOKEN

SVG = "{http://www.w3.org/2000/svg}"
END = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)  # within the minute 12:00
FIRST = datetime(2024, 5, 1, 11, 31, tzinfo=UTC)  # 30 minutes: 11:31 .. 12:00
MINUTE = timedelta(minutes=1)
TITLES = [
    "Workers",
    "Miss rate (%)",
    "Hit rate (%)",
    "Items",
    "Items size (MB)",
    "Requests (per minute)",
    "Reads no pool size can fix (per minute)",
]


def minute(
    at: datetime,
    *,
    lookups: int = 100,
    misses: int = 25,
    items: int = 40,
    missing: int = 0,
    uncacheable: int = 0,
) -> MinuteStats:
    return MinuteStats(
        minute=at,
        workers=3,
        lookups=lookups,
        hits=lookups - misses,
        misses=misses,
        requests=lookups + 10,
        items=items,
        bytes=items * (1 << 20) // 4,
        missing=missing,
        uncacheable=uncacheable,
    )


def full_span() -> list[MinuteStats]:
    return [minute(FIRST + i * MINUTE) for i in range(30)]


def parse(chart: Chart) -> ET.Element:
    return ET.fromstring(chart.svg)


def dots(root: ET.Element) -> list[ET.Element]:
    """The data points drawn (pygal draws one circle per value that is not None)."""
    return [c for c in root.iter(f"{SVG}circle") if "dot" in c.get("class", "").split()]


def line_segments(root: ET.Element) -> list[str]:
    """The ``d`` of every polyline of the series (a gap splits the line)."""
    return [
        p.get("d", "")
        for p in root.iter(f"{SVG}path")
        if {"line", "reactive"} <= set(p.get("class", "").split())
    ]


def x_labels(root: ET.Element) -> list[str]:
    axis = next(g for g in root.iter(f"{SVG}g") if g.get("class", "").split() == ["axis", "x"])
    return [t.text or "" for t in axis.iter(f"{SVG}text")]


def values(root: ET.Element) -> list[str]:
    return [d.text or "" for d in root.iter(f"{SVG}desc") if d.get("class") == "value"]


def test_seven_charts_with_their_titles() -> None:
    charts = render_charts(full_span(), END)

    assert [c.title for c in charts] == TITLES
    for chart in charts:
        root = parse(chart)
        assert root.tag == f"{SVG}svg"
        # The page captions each chart; the SVG does not repeat the title.
        assert chart.title not in (root.findtext(f"{SVG}title") or "")
        assert root.get("width") == "480"
        assert root.get("height") == "260"
        assert not chart.svg.startswith("<?xml")


def test_no_script_and_no_external_resource() -> None:
    """The dashboard works offline: no script at all (pygal's default is a CDN one)."""
    for chart in render_charts(full_span(), END):
        root = parse(chart)
        assert list(root.iter(f"{SVG}script")) == []
        assert "<script" not in chart.svg
        assert re.search(r"\b(src|href)=", chart.svg) is None
        assert "xml-stylesheet" not in chart.svg
        assert "@import" not in chart.svg
        assert "url(" not in chart.svg


def test_thirty_minutes_at_one_minute_steps_labelled_every_five() -> None:
    charts = render_charts(full_span(), END)

    for chart in charts:
        root = parse(chart)
        xs = [float(c.get("cx", "nan")) for c in dots(root)]
        assert len(xs) == 30, chart.title
        assert xs == sorted(xs)
        steps = [b - a for a, b in itertools.pairwise(xs)]
        assert max(steps) - min(steps) < 1e-6  # evenly spaced
        assert x_labels(root) == ["11:35", "11:40", "11:45", "11:50", "11:55", "12:00"]
        assert len(line_segments(root)) == 1


def test_values_of_each_chart() -> None:
    workers, miss, hit, items, size, requests, unfixable = (
        parse(c) for c in render_charts(full_span(), END)
    )
    assert set(values(workers)) == {"3"}
    assert set(values(miss)) == {"25%"}
    assert set(values(hit)) == {"75%"}
    assert set(values(items)) == {"40"}
    assert set(values(size)) == {"10.0"}  # 40 * 1/4 MB
    assert set(values(requests)) == {"110"}
    assert set(values(unfixable)) == {"0"}


def test_missing_minutes_are_gaps() -> None:
    # 11:40 and 11:41 have no data; 11:50 has no lookups (no rate, but workers and items).
    minutes = [
        minute(FIRST + i * MINUTE, lookups=0 if i == 19 else 100, misses=0 if i == 19 else 25)
        for i in range(30)
        if i not in (9, 10)
    ]
    workers, miss, hit, items, *_ = (parse(c) for c in render_charts(minutes, END))

    assert len(dots(workers)) == 28
    assert len(line_segments(workers)) == 2
    assert len(dots(miss)) == 27
    assert len(line_segments(miss)) == 3
    assert len(dots(hit)) == 27
    assert len(dots(items)) == 28
    # The points keep their minute's place: the gap is as wide as the two minutes.
    xs = [float(c.get("cx", "nan")) for c in dots(workers)]
    step = xs[1] - xs[0]
    assert xs[9] - xs[8] == pytest.approx(3 * step)


def test_minutes_outside_the_span_are_ignored() -> None:
    minutes = [minute(FIRST - MINUTE), minute(FIRST), minute(FIRST + 30 * MINUTE)]
    root = parse(render_charts(minutes, END)[0])
    assert len(dots(root)) == 1


def test_an_end_on_a_minute_boundary_ends_with_the_minute_before() -> None:
    end = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    minutes = [minute(end - 30 * MINUTE), minute(end - MINUTE), minute(end)]
    root = parse(render_charts(minutes, end)[0])
    assert len(dots(root)) == 2
    assert x_labels(root) == ["11:30", "11:35", "11:40", "11:45", "11:50", "11:55"]


def test_no_data_at_all_still_renders() -> None:
    charts = render_charts([], END)
    assert len(charts) == 7
    for chart in charts:
        assert dots(parse(chart)) == []


def test_rates_are_drawn_from_0_to_100() -> None:
    miss = parse(render_charts(full_span(), END)[1])
    axis = next(g for g in miss.iter(f"{SVG}g") if g.get("class", "").split()[:2] == ["axis", "y"])
    labels = [t.text for t in axis.iter(f"{SVG}text")]
    assert labels[0] == "0%"
    assert labels[-1] == "100%"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="time zone"):
        render_charts([], datetime(2024, 5, 1, 12, 0))
    with pytest.raises(ValueError, match="span_minutes"):
        render_charts([], END, span_minutes=0)


def test_importing_pygal_leaves_failed_imports_alone() -> None:
    """pygal's map-plugin finder makes a failed import an ImportWarning (an error here)."""
    assert "pygal" in sys.modules
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("imagecache_there_is_no_such_module")


def titles(root: ET.Element) -> list[str]:
    """Each point's <title>, oldest first: what the browser shows on hover."""
    return [
        g.findtext(f"{SVG}title") or ""
        for g in root.iter(f"{SVG}g")
        if "dots" in g.get("class", "").split()
    ]


def marks(root: ET.Element, css_class: str) -> list[tuple[str, str]]:
    """The (title, path d) of each mark of ``css_class`` drawn on the plot."""
    return [
        (g.findtext(f"{SVG}title") or "", g.find(f"{SVG}path").get("d", ""))  # type: ignore[union-attr]
        for g in root.iter(f"{SVG}g")
        if css_class in g.get("class", "").split()
    ]


def dot_xs(root: ET.Element) -> list[float]:
    return [float(c.get("cx", "nan")) for c in dots(root)]


def test_every_point_has_a_title_with_its_utc_minute_and_value() -> None:
    workers, miss, *_ = (parse(c) for c in render_charts(full_span(), END))

    assert titles(workers)[0] == "11:31 UTC: 3"
    assert titles(miss)[1] == "11:32 UTC: 25%"
    # The chart as a whole is not titled (pygal's default is "Pygal").
    assert workers.find(f"{SVG}title") is None


def test_the_time_axis_says_utc() -> None:
    for chart in render_charts(full_span(), END):
        texts = [t.text for t in parse(chart).iter(f"{SVG}text") if t.get("class") == "title"]
        assert texts == ["Time (UTC)"], chart.title


def test_workers_are_drawn_as_steps_and_rates_as_lines() -> None:
    sizes = [1] * 10 + [3] * 10 + [2] * 10
    minutes = [replace(minute(FIRST + i * MINUTE), workers=size) for i, size in enumerate(sizes)]
    workers, miss, *_ = (parse(c) for c in render_charts(minutes, END.replace(second=0)))

    (d,) = line_segments(workers)
    # Only horizontal and vertical moves: the size holds until the next minute's.
    assert re.fullmatch(r"M[-\d. ]+( H[-\d.]+ V[-\d.]+)+", d), d
    levels = {float(y) for y in re.findall(r"V([-\d.]+)", d)}
    assert len(levels) == 3
    xs = dot_xs(workers)
    first_step = d.split(" H")[1].split(" V")[0]
    assert float(first_step) == pytest.approx(xs[1])  # 11:31's level runs to 11:32
    (rate,) = line_segments(miss)
    assert " H" not in rate
    assert " L" in rate


def test_the_current_partial_minute_is_marked() -> None:
    root = parse(render_charts(full_span(), END)[5])  # requests; END is 30 s into 12:00

    assert titles(root)[-1] == "12:00 UTC: 110 (partial minute, so far)"
    assert titles(root)[-2] == "11:59 UTC: 110"
    partial = [g for g in root.iter(f"{SVG}g") if g.get("class") == "dots partial"]
    assert len(partial) == 1
    circle = partial[0].find(f"{SVG}circle")
    assert circle is not None
    assert "fill: #ffffff" in circle.get("style", "")
    # The whole minutes' line stops at 11:59; a dashed segment leads on to 12:00.
    xs = dot_xs(root)
    (whole,) = line_segments(root)
    assert float(whole.split()[-2].lstrip("L")) == pytest.approx(xs[-2])
    dashed = [p for p in root.iter(f"{SVG}path") if "partial" in p.get("class", "").split()]
    assert len(dashed) == 1
    assert "stroke-dasharray" in dashed[0].get("style", "")


def test_a_span_ending_on_a_minute_boundary_has_no_partial_minute() -> None:
    root = parse(render_charts(full_span(), END.replace(second=0) + MINUTE)[5])
    assert not any("partial" in t for t in titles(root))
    assert not any("partial" in p.get("class", "") for p in root.iter(f"{SVG}path"))


def test_miss_rate_chart_draws_min_and_max_miss() -> None:
    charts = render_charts(full_span(), END, thresholds=MissThresholds(0.1, 0.5))
    miss = parse(charts[1])

    (high,) = marks(miss, "max-miss")
    (low,) = marks(miss, "min-miss")
    assert high[0].startswith("maxMiss 50%")
    assert low[0].startswith("minMiss 10%")
    y_high, y_low = (float(d.split()[1]) for _, d in (high, low))
    # The 25% points lie between the lines; SVG's y grows downwards.
    y_point = float(dots(miss)[0].get("cy", "nan"))
    assert y_high < y_point < y_low
    assert y_point - y_high == pytest.approx((y_low - y_high) * 25 / 40, rel=0.01)
    # The other charts have no thresholds.
    assert all(marks(parse(c), "threshold") == [] for c in charts[:1] + charts[2:])


def test_resizes_are_marked_where_they_happened() -> None:
    inside = Activity(FIRST + 19 * MINUTE + timedelta(seconds=30), 1, 3, "manual expand", None)
    before = Activity(FIRST - MINUTE, 3, 1, "autoscaler: shrink", 0.01)
    for chart in render_charts(full_span(), END, resizes=[inside, before]):
        root = parse(chart)
        (mark,) = marks(root, "resize-mark")
        assert mark[0] == "11:50:30 UTC: resize from 1 to 3 nodes (manual expand)"
        xs = dot_xs(root)
        x = float(mark[1].split()[0].lstrip("M"))
        assert x == pytest.approx((xs[19] + xs[20]) / 2), chart.title  # halfway: 30 s
        assert " V" in mark[1]  # vertical


def test_reads_no_pool_size_can_fix_have_their_own_chart() -> None:
    minutes = [minute(FIRST + i * MINUTE, missing=i, uncacheable=i % 3) for i in range(30)]
    charts = render_charts(minutes, END)
    miss, unfixable = parse(charts[1]), parse(charts[6])

    assert charts[6].title == "Reads no pool size can fix (per minute)"
    # The sum of both kinds per minute, each kind told apart in the point's title.
    assert values(unfixable) == [f"{i + i % 3}" for i in range(30)]
    assert titles(unfixable)[4] == "11:35 UTC: 5 (4 with no image, 1 too large to cache)"
    assert titles(unfixable)[-1] == (
        "12:00 UTC: 31 (29 with no image, 2 too large to cache; partial minute, so far)"
    )
    # They are not lookups: the miss rate is the misses of the lookups alone.
    assert set(values(miss)) == {"25%"}
    # The axis follows the data (31 at most), like the other counts.
    axis = next(g for g in unfixable.iter(f"{SVG}g") if g.get("class", "").startswith("axis y"))
    top = max(float((t.text or "0").replace(",", "")) for t in axis.iter(f"{SVG}text"))
    assert 31 <= top <= 40


def curve_window(
    predicted: list[float | None],
    *,
    sampled: int = 1234,
    lookups: int = 123_400,
    complete: bool = True,
    seconds: float = 60.0,
    capacity_mb: float = 64,
    policy: str = "lru",
) -> CurveWindow:
    """A window as manager.curves makes them, opened at WINDOW_START, with the figures given."""
    curves = MissCurves(wall_clock=lambda: WINDOW_START)
    curves.follow(CacheSettings(capacity_mb=capacity_mb, policy=policy))
    return replace(
        curves.latest(),
        predicted_miss=predicted,
        sampled_lookups=sampled,
        lookups=lookups,
        complete=complete,
        seconds=seconds,
    )


WINDOW_START = datetime(2024, 5, 1, 12, 3, tzinfo=UTC)
CURVE: list[float | None] = [0.9, 0.7, 0.5, 0.35, 0.2, 0.1, 0.05, 0.05]


def test_the_curve_chart_has_a_point_per_pool_size_with_its_value() -> None:
    chart = render_curve(curve_window(CURVE), POOL_SIZES, 3)
    root = parse(chart)

    assert chart.title == "Predicted miss rate by pool size (%)"
    assert x_labels(root) == [str(size) for size in POOL_SIZES]
    xs = dot_xs(root)
    assert len(xs) == 8
    assert xs == sorted(xs)
    assert titles(root) == [
        "1 node: 90%",
        "2 nodes: 70%",
        "3 nodes (the pool's size now): 50%",
        "4 nodes: 35%",
        "5 nodes: 20%",
        "6 nodes: 10%",
        "7 nodes: 5%",
        "8 nodes: 5%",
    ]
    # Heights in proportion to the rates, on a 0..100 % axis.
    ys = [float(c.get("cy", "nan")) for c in dots(root)]
    assert (ys[3] - ys[0]) / (ys[4] - ys[0]) == pytest.approx((90 - 35) / (90 - 20), rel=0.01)
    texts = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "title"]
    assert texts == ["Nodes in the pool"]
    assert list(root.iter(f"{SVG}script")) == []


def test_the_curve_chart_marks_the_pool_size_now_and_the_thresholds() -> None:
    root = parse(
        render_curve(curve_window(CURVE), POOL_SIZES, 3, thresholds=MissThresholds(0.1, 0.5))
    )

    (current,) = marks(root, "current-size")
    assert current[0] == "The pool has 3 nodes now"
    xs = dot_xs(root)
    assert float(current[1].split()[0].lstrip("M")) == pytest.approx(xs[2])
    assert " V" in current[1]  # vertical
    ringed = [g for g in root.iter(f"{SVG}g") if g.get("class") == "dots current"]
    assert len(ringed) == 1
    assert ringed[0].findtext(f"{SVG}title") == "3 nodes (the pool's size now): 50%"
    (high,) = marks(root, "max-miss")
    (low,) = marks(root, "min-miss")
    assert high[0].startswith("maxMiss 50%")
    assert low[0].startswith("minMiss 10%")
    # maxMiss runs through the 50% point of 3 nodes, minMiss through the 10% of 6.
    ys = [float(c.get("cy", "nan")) for c in dots(root)]
    assert float(high[1].split()[1]) == pytest.approx(ys[2], abs=0.01)
    assert float(low[1].split()[1]) == pytest.approx(ys[5], abs=0.01)
    # One node: the mark at the first point.
    (one,) = marks(parse(render_curve(curve_window(CURVE), POOL_SIZES, 1)), "current-size")
    assert one[0] == "The pool has 1 node now"
    assert float(one[1].split()[0].lstrip("M")) == pytest.approx(xs[0])


def test_the_curve_caption_says_which_window() -> None:
    complete = render_curve(curve_window(CURVE), POOL_SIZES, 2)
    assert complete.caption == (
        "Predicted from the last complete window (from 12:03:00 UTC, 60 s): 1,234 sampled "
        "of 123,400 lookups; 64 MB per node, LRU."
    )
    partial = render_curve(
        curve_window(
            CURVE,
            complete=False,
            seconds=23.4,
            sampled=7,
            lookups=700,
            capacity_mb=2.5,
            policy="random",
        ),
        POOL_SIZES,
        2,
    )
    assert partial.caption == (
        "Predicted from the current window, still partial (from 12:03:00 UTC, 23 s so far): "
        "7 sampled of 700 lookups; 2.5 MB per node, RR."
    )


@pytest.mark.parametrize(
    ("predicted", "lookups"),
    [
        ([None] * 8, 0),  # nothing posted at all
        # Lookups counted but none sampled: the adjusted ratios are all 0, from no sample.
        ([0.0] * 8, 40),
    ],
)
def test_no_prediction_without_a_sampled_lookup(
    predicted: list[float | None], lookups: int
) -> None:
    chart = render_curve(
        curve_window(predicted, sampled=0, lookups=lookups, complete=False, seconds=12),
        POOL_SIZES,
        3,
        thresholds=MissThresholds(0.1, 0.5),
    )
    root = parse(chart)

    assert dots(root) == []
    assert "No prediction yet" in [t.text for t in root.iter(f"{SVG}text")]
    assert chart.caption == (
        "No prediction yet: no lookup was sampled in the current window, still partial "
        "(from 12:03:00 UTC, 12 s so far); 64 MB per node, LRU."
    )


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[tuple[TestServer, ClientSession]]:
    """A real manager (one local node process, every key sampled), and a
    session logged in to it, early enough in a minute that the curve's first
    window lasts the test."""
    _, server = await sampling_manager(tmp_path)
    # unsafe: keep the cookies of an IP address host.
    async with server, ClientSession(cookie_jar=CookieJar(unsafe=True)) as http:
        login = {"password": PASSWORD, "next": "/stats"}
        async with http.post(server.make_url("/login"), data=login) as reply:
            assert reply.status == 200
        yield server, http


def figures_of(html: str) -> dict[str, ET.Element]:
    """The page's (or fragment's) chart figures by their data-title."""
    fragment = html[html.index('<figure class="chart"') : html.rindex("</figure>") + 9]
    root = ET.fromstring(f"<div>{fragment}</div>")
    return {figure.get("data-title", ""): figure for figure in root.iter("figure")}


async def test_the_page_and_its_refresh_show_the_curve_of_the_posted_samples(
    manager: tuple[TestServer, ClientSession],
) -> None:
    server, http = manager
    # A gateway's post, every key sampled: a and b read twice each, so every
    # pool size misses the first read of each (2 of 4).
    samples = {"lookups": 4, "samples": [["a", 100], ["b", 100], ["a", 100], ["b", 100]], "rate": 1}
    async with http.post(
        server.make_url("/internal/key_samples"),
        json=samples,
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as reply:
        assert reply.status == 200, await reply.text()

    for path in ("/stats", "/stats/charts"):
        async with http.get(server.make_url(path)) as reply:
            assert reply.status == 200
            figures = figures_of(await reply.text())
        assert list(figures) == [*TITLES, "Predicted miss rate by pool size (%)"], path
        curve = figures["Predicted miss rate by pool size (%)"]
        svg = curve.find(f"{SVG}svg")
        assert svg is not None
        assert titles(svg) == [
            "1 node (the pool's size now): 50%",
            *(f"{size} nodes: 50%" for size in POOL_SIZES[1:]),
        ]
        (mark,) = marks(svg, "current-size")
        assert mark[0] == "The pool has 1 node now"
        assert len(marks(svg, "threshold")) == 2
        note = curve.find("p")
        assert note is not None
        assert note.get("class") == "chart-note"
        # Complete or not depends on whether a minute ended since the post.
        assert "4 sampled of 4 lookups" in (note.text or ""), note.text
