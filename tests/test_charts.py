"""The statistics page's charts: six self-contained SVG line charts of 30 minutes."""

from __future__ import annotations

import importlib
import itertools
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from manager.charts import Chart, MissThresholds, render_charts
from manager.metrics import MinuteStats
from manager.records import Activity

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
]


def minute(at: datetime, *, lookups: int = 100, misses: int = 25, items: int = 40) -> MinuteStats:
    return MinuteStats(
        minute=at,
        workers=3,
        lookups=lookups,
        hits=lookups - misses,
        misses=misses,
        requests=lookups + 10,
        items=items,
        bytes=items * (1 << 20) // 4,
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


def test_six_charts_with_their_titles() -> None:
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
    workers, miss, hit, items, size, requests = (parse(c) for c in render_charts(full_span(), END))
    assert set(values(workers)) == {"3"}
    assert set(values(miss)) == {"25%"}
    assert set(values(hit)) == {"75%"}
    assert set(values(items)) == {"40"}
    assert set(values(size)) == {"10.0"}  # 40 * 1/4 MB
    assert set(values(requests)) == {"110"}


def test_missing_minutes_are_gaps() -> None:
    # 11:40 and 11:41 have no data; 11:50 has no lookups (no rate, but workers and items).
    minutes = [
        minute(FIRST + i * MINUTE, lookups=0 if i == 19 else 100, misses=0 if i == 19 else 25)
        for i in range(30)
        if i not in (9, 10)
    ]
    workers, miss, hit, items, _, _ = (parse(c) for c in render_charts(minutes, END))

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
    assert len(charts) == 6
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
