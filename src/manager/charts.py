"""The Memory Statistics page's charts: the last 30 minutes of the pool, one per figure.

Rendered on the server as inline SVG by pygal, without any script: the
dashboard must work without network access, so pygal's tooltip script (a CDN
URL by default) is switched off, and with it the inline configuration that
only that script reads (which a strict Content-Security-Policy would refuse).
Instead every point carries an SVG <title> ("12:03 UTC: 3"), which browsers
show on hover and screen readers read, and which the dashboard's own script
(templates/static/dashboard.js) shows at once.

Beyond pygal's line: the Workers chart is drawn as steps (a pool size holds
until it changes), the current minute, still partial, is marked as such
(hollow point, dashed line, "so far"), the miss rate chart has the
autoscaler's minMiss and maxMiss as dashed lines, and every chart has a mark
where the pool was resized.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pygal
from pygal.style import Style

from manager.metrics import MinuteStats
from manager.records import Activity
from manager.settings import MAX_NODES

# pygal puts a finder of its map plugins on sys.meta_path that has no find_spec
# (Kozea/pygal#532, unmerged): on Python 3.11 every import that finds nothing
# then issues an ImportWarning, which breaks the "try: import x / except
# ImportError" of other libraries wherever warnings are errors, as in our tests.
# No map plugin is used here: take the finder out again.
sys.meta_path[:] = [
    finder for finder in sys.meta_path if not isinstance(finder, pygal.PluginImportFixer)
]

WIDTH = 480  # drawn near its displayed size, so axis labels stay legible
HEIGHT = 260
ACCENT = "#2457c5"
LABEL_EVERY_MINUTES = 5
X_TITLE = "Time (UTC)"
PARTIAL_NOTE = "partial minute, so far"
THRESHOLD_COLOUR = "#b3261e"
RESIZE_COLOUR = "#6b7280"
_MINUTE = timedelta(minutes=1)

# Light, quiet chrome so the one accent-coloured line carries the page.
STYLE = Style(
    background="#ffffff",
    plot_background="#ffffff",
    foreground="#374151",
    foreground_strong="#111827",
    foreground_subtle="#9ca3af",
    font_family='system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif',
    title_font_size=14,
    label_font_size=11,
    major_label_font_size=11,
    no_data_font_size=16,
    colors=(ACCENT,),
    guide_stroke_color="#e5e7eb",
    major_guide_stroke_color="#d1d5db",
    guide_stroke_dasharray="3,3",
    major_guide_stroke_dasharray="3,3",
    opacity=".15",
    opacity_hover=".25",
    stroke_opacity="1",
    stroke_opacity_hover="1",
    stroke_width="2",
    stroke_width_hover="2",
    transition="0ms",
)


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    svg: str  # an <svg> element, without XML declaration, to inline in HTML


@dataclass(frozen=True, slots=True)
class _Figure:
    title: str
    value: Callable[[MinuteStats], float | None]
    formatter: Callable[[float], str]
    fixed_range: tuple[float, float] | None = None  # None: from 0 to the data's maximum
    floor: float = 1.0  # smallest top of the y axis when the range follows the data
    y_labels: Sequence[float] | None = None
    steps: bool = False  # a level that holds until the next point (a count of nodes)
    thresholds: bool = False  # draw minMiss and maxMiss (in percent, like the values)


def _percent(rate: float | None) -> float | None:
    return None if rate is None else rate * 100


_FIGURES = (
    _Figure(
        "Workers",
        lambda m: m.workers,
        lambda v: f"{v:.0f}",
        fixed_range=(0, MAX_NODES),
        y_labels=range(MAX_NODES + 1),
        steps=True,
    ),
    _Figure(
        "Miss rate (%)",
        lambda m: _percent(m.miss_rate),
        lambda v: f"{v:.0f}%",
        (0, 100),
        thresholds=True,
    ),
    _Figure("Hit rate (%)", lambda m: _percent(m.hit_rate), lambda v: f"{v:.0f}%", (0, 100)),
    _Figure("Items", lambda m: m.items, lambda v: f"{v:,.0f}", floor=10),
    _Figure("Items size (MB)", lambda m: m.items_mb, lambda v: f"{v:,.1f}", floor=1),
    _Figure("Requests (per minute)", lambda m: m.requests, lambda v: f"{v:,.0f}", floor=10),
)


@dataclass(frozen=True, slots=True)
class MissThresholds:
    """The autoscaler's bounds on the miss rate, as fractions (settings.min_miss, max_miss)."""

    min_miss: float
    max_miss: float


@dataclass(frozen=True, slots=True)
class _Marks:
    """What a chart draws beyond its points, in chart positions (x from 0 to 1)."""

    partial_label: str | None  # the x label of the partial last minute, if any
    resizes: list[tuple[float, str]]  # (x position, description)
    thresholds: list[tuple[float, str, str]]  # (value as plotted, class, description)


def render_charts(
    minutes: Sequence[MinuteStats],
    end: datetime,
    span_minutes: int = 30,
    *,
    resizes: Sequence[Activity] = (),
    thresholds: MissThresholds | None = None,
) -> list[Chart]:
    """The six charts (workers, miss rate, hit rate, items, items size, requests).

    The x axis has one position per minute that starts in
    [end - span_minutes, end), labelled HH:MM (UTC) at every fifth minute; a
    minute absent from ``minutes`` (or without lookups, for the rates) is a
    gap in the line. Entries of ``minutes`` outside the span are ignored.
    When ``end`` falls inside its minute (it is "now"), that last minute is
    partial: its point is drawn hollow, joined by a dashed line and titled
    "so far". Every chart marks the ``resizes`` within the span; the miss rate
    chart draws ``thresholds`` as dashed lines. Returns the charts in that
    order. Raises ValueError when ``end`` has no time zone or
    ``span_minutes`` is below 1.
    """
    if end.utcoffset() is None:
        raise ValueError(f"end {end.isoformat()} has no time zone")
    if span_minutes < 1:
        raise ValueError(f"span_minutes must be at least 1, not {span_minutes}")
    end = end.astimezone(UTC)
    last = end.replace(second=0, microsecond=0)
    partial = last != end
    if not partial:
        last -= _MINUTE
    slots = [last - (span_minutes - 1 - i) * _MINUTE for i in range(span_minutes)]
    by_minute = {m.minute.astimezone(UTC): m for m in minutes}
    labels = [slot.strftime("%H:%M") for slot in slots]
    major = [
        label
        for slot, label in zip(slots, labels, strict=True)
        if slot.minute % LABEL_EVERY_MINUTES == 0
    ]
    resize_marks = _resize_marks(resizes, slots[0], min(end, last + _MINUTE), span_minutes)
    charts = []
    for figure in _FIGURES:
        values = [
            None if (stats := by_minute.get(slot)) is None else figure.value(stats)
            for slot in slots
        ]
        marks = _Marks(
            partial_label=labels[-1] if partial else None,
            resizes=resize_marks,
            thresholds=_threshold_marks(thresholds) if figure.thresholds else [],
        )
        charts.append(Chart(figure.title, _render(figure, labels, major, values, marks)))
    return charts


def _resize_marks(
    resizes: Sequence[Activity], first: datetime, end: datetime, span_minutes: int
) -> list[tuple[float, str]]:
    """Where each resize in [first, end) goes on the x axis, and its description.

    Points sit at the start of their minute, so a resize at 12:03:30 is
    marked halfway between the points of 12:03 and 12:04 (and one within the
    last minute at that minute's point: the axis ends there).
    """
    marks = []
    for resize in resizes:
        at = resize.at.astimezone(UTC)
        if not first <= at < end:
            continue
        minutes = (at - first) / _MINUTE
        position = 0.5 if span_minutes == 1 else min(1.0, minutes / (span_minutes - 1))
        marks.append(
            (
                position,
                f"{at:%H:%M:%S} UTC: resize from {resize.size_before} to "
                f"{resize.size_after} nodes ({resize.cause})",
            )
        )
    return marks


def _threshold_marks(thresholds: MissThresholds | None) -> list[tuple[float, str, str]]:
    if thresholds is None:
        return []
    return [
        (
            thresholds.max_miss * 100,
            "threshold max-miss",
            f"maxMiss {thresholds.max_miss:.0%}: the autoscaler grows the pool above it",
        ),
        (
            thresholds.min_miss * 100,
            "threshold min-miss",
            f"minMiss {thresholds.min_miss:.0%}: the autoscaler shrinks the pool below it",
        ),
    ]


def _render(
    figure: _Figure,
    labels: list[str],
    major: list[str],
    values: list[float | None],
    marks: _Marks,
) -> str:
    if figure.fixed_range is not None:
        y_range = figure.fixed_range
    else:
        top = max((v for v in values if v is not None), default=0.0)
        y_range = (0.0, max(figure.floor, top * 1.1))
    options: dict[str, Any] = {}
    if figure.y_labels is not None:
        options["y_labels"] = list(figure.y_labels)
    chart = pygal.Line(
        style=STYLE,
        width=WIDTH,
        height=HEIGHT,
        explicit_size=True,
        # pygal's default is a tooltip script from a CDN: none, the page works offline.
        js=[],
        disable_xml_declaration=True,
        show_legend=False,
        allow_interruptions=True,  # a minute without data is a gap, not a slope
        x_labels=labels,
        x_labels_major=major,
        show_minor_x_labels=False,
        truncate_label=-1,  # pygal sizes truncation for all 30 labels, shown or not
        x_title=X_TITLE,
        range=y_range,
        include_x_axis=True,
        value_formatter=figure.formatter,
        dots_size=2,
        margin=12,
        no_data_text="No data",
        **options,
    )
    chart.add(figure.title, values)
    chart.add_xml_filter(_without_scripts)
    chart.add_xml_filter(_Decorate(chart, figure, marks, y_range))
    svg: str = chart.render()
    return svg


def _without_scripts(root: Any) -> Any:
    """A pygal XML filter: the tree without its <script> elements."""
    for parent in list(root.iter()):
        for child in list(parent):
            # Comments have a function as their tag; lxml (if pygal uses it) namespaces tags.
            if isinstance(child.tag, str) and _local(child.tag) == "script":
                parent.remove(child)
    return root


def _local(tag: str) -> str:
    """A tag without its namespace (pygal may build the tree with lxml, which keeps it)."""
    return tag.rpartition("}")[2]


def _classes(element: Any) -> list[str]:
    return str(element.get("class", "")).split()


class _Decorate:
    """A pygal XML filter adding what pygal does not draw (see the module's docstring).

    It runs inside ``chart.render()``, while pygal's ``view`` (chart positions
    and values to plot coordinates) is still set up.
    """

    def __init__(
        self, chart: Any, figure: _Figure, marks: _Marks, y_range: tuple[float, float]
    ) -> None:
        self._chart = chart
        self._figure = figure
        self._marks = marks
        self._y_range = y_range

    def __call__(self, root: Any) -> Any:
        plot = next(
            (g for g in root.iter() if _local(str(g.tag)) == "g" and _classes(g) == ["plot"]),
            None,
        )
        # pygal titles the whole SVG "Pygal", which browsers would show on hover
        # anywhere a point's own title does not apply.
        for title in [c for c in root if _local(str(c.tag)) == "title"]:
            root.remove(title)
        if plot is None:  # "No data" and nothing else: no plot to draw on
            return root
        partial_x = self._title_points(root)
        for path in [p for p in root.iter() if {"line", "reactive"} <= set(_classes(p))]:
            self._redraw_line(path, plot, partial_x)
        self._draw_thresholds(plot)
        self._draw_resizes(plot)
        return root

    def _title_points(self, root: Any) -> float | None:
        """Give every point a <title>; returns the x of the partial minute's point, if drawn."""
        partial_x = None
        for dots in [g for g in root.iter() if "dots" in _classes(g)]:
            texts = {
                cls: child.text or ""
                for child in dots
                if _local(str(child.tag)) == "desc"
                for cls in _classes(child)[:1]
            }
            label, value = texts.get("x_label", ""), texts.get("value", "")
            title = f"{label} UTC: {value}"
            if label == self._marks.partial_label:
                title += f" ({PARTIAL_NOTE})"
                dots.set("class", "dots partial")
                for circle in dots:
                    if _local(str(circle.tag)) == "circle":
                        # Hollow: a part of a minute, not a minute's figure.
                        circle.set("style", f"fill: #ffffff; stroke: {ACCENT}; stroke-width: 1.5")
                        partial_x = float(circle.get("cx", "nan"))
            element = dots.makeelement(_same_namespace(dots.tag, "title"), {})
            element.text = title
            dots.insert(0, element)
        return partial_x

    def _redraw_line(self, path: Any, plot: Any, partial_x: float | None) -> None:
        """Steps for a step figure; the segment to the partial minute dashed, apart."""
        points = _path_points(path.get("d", ""))
        if not points:
            return
        partial_segment = None
        if partial_x is not None and len(points) > 1 and abs(points[-1][0] - partial_x) < 1e-3:
            partial_segment = points[-2:]
            points = points[:-1]
        path.set("d", self._path(points))
        if partial_segment is not None:
            dashed = path.makeelement(
                path.tag,
                {
                    "d": self._path(partial_segment),
                    "class": "line partial nofill",
                    "style": f"stroke: {ACCENT}; stroke-width: 2; stroke-dasharray: 4,3; "
                    "fill: none",
                },
            )
            _parent_of(plot, path).append(dashed)

    def _path(self, points: list[tuple[float, float]]) -> str:
        (x0, y0), rest = points[0], points[1:]
        if self._figure.steps:
            # A level holds until the next minute's point, then changes at once.
            moves = "".join(f" H{x:.6f} V{y:.6f}" for x, y in rest)
        else:
            moves = "".join(f" L{x:.6f} {y:.6f}" for x, y in rest)
        return f"M{x0:.6f} {y0:.6f}{moves}"

    def _draw_thresholds(self, plot: Any) -> None:
        for value, css_class, description in self._marks.thresholds:
            x0, y = self._chart.view((0, value))
            x1, _ = self._chart.view((1, value))
            self._mark(
                plot,
                css_class,
                description,
                f"M{x0:.6f} {y:.6f} H{x1:.6f}",
                f"stroke: {THRESHOLD_COLOUR}; stroke-width: 1; stroke-dasharray: 6,4; fill: none",
            )

    def _draw_resizes(self, plot: Any) -> None:
        low, high = self._y_range
        for position, description in self._marks.resizes:
            x, y0 = self._chart.view((position, low))
            _, y1 = self._chart.view((position, high))
            self._mark(
                plot,
                "resize-mark",
                description,
                f"M{x:.6f} {y0:.6f} V{y1:.6f}",
                f"stroke: {RESIZE_COLOUR}; stroke-width: 1; stroke-dasharray: 2,3; fill: none",
            )

    @staticmethod
    def _mark(plot: Any, css_class: str, description: str, d: str, style: str) -> None:
        group = plot.makeelement(_same_namespace(plot.tag, "g"), {"class": css_class})
        title = group.makeelement(_same_namespace(plot.tag, "title"), {})
        title.text = description
        group.append(title)
        group.append(group.makeelement(_same_namespace(plot.tag, "path"), {"d": d, "style": style}))
        plot.append(group)


def _same_namespace(tag: str, name: str) -> str:
    namespace, brace, _ = str(tag).rpartition("}")
    return f"{namespace}{brace}{name}"


def _parent_of(root: Any, element: Any) -> Any:
    return next(parent for parent in root.iter() if element in list(parent))


def _path_points(d: str) -> list[tuple[float, float]]:
    """The points of pygal's line path ("M x y L x y x y ...")."""
    numbers = [float(n) for n in d.replace("M", " ").replace("L", " ").split()]
    return list(zip(numbers[::2], numbers[1::2], strict=True))
