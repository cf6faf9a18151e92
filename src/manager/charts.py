"""The Memory Statistics page's charts: the last 30 minutes of the pool, one per
figure, and the miss curve (the predicted miss rate of every pool size).

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
where the pool was resized. Reads no pool size can fix (keys with no image,
images too large to cache) have a chart of their own: they are not lookups, so
they are in neither rate, and each point's title tells the two kinds apart.

The curve chart has one point per pool size 1..8 (the latest window of
manager.curves), the pool's size now marked, minMiss and maxMiss as on the
miss rate chart, and a caption saying which window it comes from.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pygal
from pygal.style import Style

from manager.curves import CurveWindow
from manager.metrics import MinuteStats
from manager.records import Activity
from manager.settings import MAX_NODES, policy_label

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
CURVE_TITLE = "Predicted miss rate by pool size (%)"
CURVE_X_TITLE = "Nodes in the pool"
NO_PREDICTION = "No prediction yet"
PARTIAL_NOTE = "partial minute, so far"
THRESHOLD_COLOUR = "#b3261e"
RESIZE_COLOUR = "#6b7280"
CURRENT_COLOUR = "#111827"
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
    caption: str = ""  # what the page says under the chart, if anything


@dataclass(frozen=True, slots=True)
class _Figure:
    """How a chart draws its values."""

    title: str
    formatter: Callable[[float], str]
    fixed_range: tuple[float, float] | None = None  # None: from 0 to the data's maximum
    floor: float = 1.0  # smallest top of the y axis when the range follows the data
    y_labels: Sequence[float] | None = None
    steps: bool = False  # a level that holds until the next point (a count of nodes)
    thresholds: bool = False  # draw minMiss and maxMiss (in percent, like the values)


@dataclass(frozen=True, slots=True)
class _Series:
    """A chart of the last minutes: how it is drawn, and each minute's value."""

    figure: _Figure
    value: Callable[[MinuteStats], float | None]
    # More about a minute than its value, added to its point's title.
    detail: Callable[[MinuteStats], str] | None = None


def _percent(rate: float | None) -> float | None:
    return None if rate is None else rate * 100


def _whole(value: float) -> str:
    return f"{value:,.0f}"


def _unfixable_detail(stats: MinuteStats) -> str:
    return f"{stats.missing:,} with no image, {stats.uncacheable:,} too large to cache"


_PERCENT = _Figure("", lambda v: f"{v:.0f}%", fixed_range=(0, 100))
_SERIES = (
    _Series(
        _Figure(
            "Workers",
            lambda v: f"{v:.0f}",
            fixed_range=(0, MAX_NODES),
            y_labels=range(MAX_NODES + 1),
            steps=True,
        ),
        lambda m: m.workers,
    ),
    _Series(
        replace(_PERCENT, title="Miss rate (%)", thresholds=True), lambda m: _percent(m.miss_rate)
    ),
    _Series(replace(_PERCENT, title="Hit rate (%)"), lambda m: _percent(m.hit_rate)),
    _Series(_Figure("Items", _whole, floor=10), lambda m: m.items),
    _Series(_Figure("Items size (MB)", lambda v: f"{v:,.1f}", floor=1), lambda m: m.items_mb),
    _Series(_Figure("Requests (per minute)", _whole, floor=10), lambda m: m.requests),
    # Apart from the rates: these reads are in neither (see manager.metrics).
    _Series(
        _Figure("Reads no pool size can fix (per minute)", _whole, floor=10),
        lambda m: m.missing + m.uncacheable,
        _unfixable_detail,
    ),
)
_CURVE = replace(_PERCENT, title=CURVE_TITLE, thresholds=True)


@dataclass(frozen=True, slots=True)
class MissThresholds:
    """The autoscaler's bounds on the miss rate, as fractions (settings.min_miss, max_miss)."""

    min_miss: float
    max_miss: float


@dataclass(frozen=True, slots=True)
class _Marks:
    """What a chart draws beyond its points, in chart positions (x from 0 to 1)."""

    # A point's <title> from its x label and its value as shown.
    point_title: Callable[[str, str], str]
    partial_label: str | None = None  # the x label of the partial last minute, if any
    resizes: Sequence[tuple[float, str]] = ()  # (x position, description)
    thresholds: Sequence[tuple[float, str, str]] = ()  # (value as plotted, class, description)
    current: tuple[float, str] | None = None  # (x position, description) of the pool's size now
    current_label: str | None = None  # the x label of the point at the pool's size now


def render_charts(
    minutes: Sequence[MinuteStats],
    end: datetime,
    span_minutes: int = 30,
    *,
    resizes: Sequence[Activity] = (),
    thresholds: MissThresholds | None = None,
) -> list[Chart]:
    """The seven charts of the last minutes (workers, miss rate, hit rate,
    items, items size, requests, reads no pool size can fix).

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
    partial_label = labels[-1] if partial else None
    resize_marks = _resize_marks(resizes, slots[0], min(end, last + _MINUTE), span_minutes)
    charts = []
    for series in _SERIES:
        figure = series.figure
        shown = [by_minute.get(slot) for slot in slots]
        values = [None if stats is None else series.value(stats) for stats in shown]
        details = {
            label: series.detail(stats)
            for label, stats in zip(labels, shown, strict=True)
            if stats is not None and series.detail is not None
        }
        marks = _Marks(
            point_title=_minute_title(partial_label, details),
            partial_label=partial_label,
            resizes=resize_marks,
            thresholds=_threshold_marks(thresholds) if figure.thresholds else [],
        )
        charts.append(Chart(figure.title, _render(figure, labels, major, values, marks)))
    return charts


def _minute_title(partial_label: str | None, details: dict[str, str]) -> Callable[[str, str], str]:
    """Titles of a minute's point: "12:03 UTC: 25%", and what else is known of it."""

    def title(label: str, value: str) -> str:
        notes = [details[label]] if label in details else []
        if label == partial_label:
            notes.append(PARTIAL_NOTE)
        return f"{label} UTC: {value}" + (f" ({'; '.join(notes)})" if notes else "")

    return title


def render_curve(
    window: CurveWindow,
    sizes: Sequence[int],
    current_size: int,
    *,
    thresholds: MissThresholds | None = None,
) -> Chart:
    """The miss curve: ``window``'s predicted miss rate (%) for each pool size of ``sizes``.

    The point of ``current_size`` is drawn apart and a vertical line marks
    it; ``thresholds`` are dashed lines as on the miss rate chart. Without a
    sampled lookup in the window there is no point at all ("No prediction
    yet", the caption says why): a prediction from no sample would be made up.
    """
    labels = [str(size) for size in sizes]
    predicted = window.predicted_miss if window.sampled_lookups else [None] * len(sizes)
    values = [_percent(ratio) for ratio in predicted]
    current_label = str(current_size) if current_size in sizes else None
    current = None
    if current_label is not None:
        index = labels.index(current_label)
        position = 0.5 if len(labels) == 1 else index / (len(labels) - 1)
        current = (position, f"The pool has {_nodes(current_size)} now")

    def title(label: str, value: str) -> str:
        now = " (the pool's size now)" if label == current_label else ""
        return f"{_nodes(int(label))}{now}: {value}"

    marks = _Marks(
        point_title=title,
        thresholds=_threshold_marks(thresholds),
        current=current,
        current_label=current_label,
    )
    svg = _render(
        _CURVE, labels, labels, values, marks, x_title=CURVE_X_TITLE, no_data_text=NO_PREDICTION
    )
    return Chart(CURVE_TITLE, svg, caption=curve_caption(window))


def curve_caption(window: CurveWindow) -> str:
    """Which window the curve comes from: complete or not, when it began (UTC)
    and how long it lasted, its sampled lookups and the pool simulated."""
    pool = f"{window.capacity_mb:g} MB per node, {policy_label(window.policy)}"
    began = f"{window.started.astimezone(UTC):%H:%M:%S} UTC"
    if window.complete:
        which = f"the last complete window (from {began}, {window.seconds:.0f} s)"
    else:
        which = f"the current window, still partial (from {began}, {window.seconds:.0f} s so far)"
    if not window.sampled_lookups:
        return f"{NO_PREDICTION}: no lookup was sampled in {which}; {pool}."
    return (
        f"Predicted from {which}: {window.sampled_lookups:,} sampled of "
        f"{window.lookups:,} lookups; {pool}."
    )


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


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
    *,
    x_title: str = X_TITLE,
    no_data_text: str = "No data",
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
        x_title=x_title,
        range=y_range,
        include_x_axis=True,
        value_formatter=figure.formatter,
        dots_size=2,
        margin=12,
        no_data_text=no_data_text,
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
        self._draw_current(plot)
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
            title = self._marks.point_title(label, value)
            if label == self._marks.current_label:
                dots.set("class", "dots current")
                for circle in dots:
                    if _local(str(circle.tag)) == "circle":
                        # Ringed: the one size that is not a what-if.
                        circle.set("r", "5")
                        circle.set("style", f"stroke: {CURRENT_COLOUR}; stroke-width: 2")
            if label == self._marks.partial_label:
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

    def _draw_current(self, plot: Any) -> None:
        if self._marks.current is None:
            return
        position, description = self._marks.current
        low, high = self._y_range
        x, y0 = self._chart.view((position, low))
        _, y1 = self._chart.view((position, high))
        self._mark(
            plot,
            "current-size",
            description,
            f"M{x:.6f} {y0:.6f} V{y1:.6f}",
            f"stroke: {CURRENT_COLOUR}; stroke-width: 1.5; fill: none",
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
