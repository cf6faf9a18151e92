"""Drawing one chart of the Memory Statistics page: pygal's line, as inline SVG.

Rendered on the server by pygal, without any script: the dashboard must work
without network access, so pygal's tooltip script (a CDN URL by default) is
switched off, and with it the inline configuration that only that script
reads (which a strict Content-Security-Policy would refuse). Instead every
point carries an SVG <title> ("12:03 UTC: 3"), which browsers show on hover
and screen readers read, and which the dashboard's own script
(templates/static/dashboard.js) shows at once.

Beyond pygal's line (``Marks``): a step figure is drawn as steps (a pool size
holds until it changes), a partial last point is hollow and joined by a
dashed line, and dashed lines mark thresholds, resizes and the pool's size
now. What the charts show is manager.charts (the last minutes) and
manager.curvechart (the miss curve).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pygal
from pygal.style import Style

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
THRESHOLD_COLOUR = "#b3261e"
RESIZE_COLOUR = "#6b7280"
CURRENT_COLOUR = "#111827"
_WHITE = "#ffffff"
_GUIDE_DASHES = "3,3"

# Light, quiet chrome so the one accent-coloured line carries the page. A
# line looks the same hovered or not: the point's title is what hover shows.
_LINE_LOOK = {"stroke_opacity": "1", "stroke_width": "2"}
STYLE = Style(
    background=_WHITE,
    plot_background=_WHITE,
    colors=(ACCENT,),
    foreground="#374151",
    foreground_strong="#111827",
    foreground_subtle="#9ca3af",
    font_family='system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif',
    no_data_font_size=16,
    title_font_size=14,
    **dict.fromkeys(("label_font_size", "major_label_font_size"), 11),
    guide_stroke_color="#e5e7eb",
    major_guide_stroke_color="#d1d5db",
    **dict.fromkeys(("guide_stroke_dasharray", "major_guide_stroke_dasharray"), _GUIDE_DASHES),
    opacity=".15",
    opacity_hover=".25",
    **_LINE_LOOK,
    **{f"{name}_hover": value for name, value in _LINE_LOOK.items()},
    transition="0ms",
)


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    svg: str  # an <svg> element, without XML declaration, to inline in HTML
    caption: str = ""  # what the page says under the chart, if anything


@dataclass(frozen=True, slots=True)
class Figure:
    """How a chart draws its values."""

    title: str
    formatter: Callable[[float], str]
    fixed_range: tuple[float, float] | None = None  # None: from 0 to the data's maximum
    floor: float = 1.0  # smallest top of the y axis when the range follows the data
    y_labels: Sequence[float] | None = None
    steps: bool = False  # a level that holds until the next point (a count of nodes)
    thresholds: bool = False  # draw minMiss and maxMiss (in percent, like the values)


# A rate in percent, from 0 to 100.
PERCENT = Figure("", lambda v: f"{v:.0f}%", fixed_range=(0, 100))


def percent(rate: float | None) -> float | None:
    return None if rate is None else rate * 100


@dataclass(frozen=True, slots=True)
class MissThresholds:
    """The autoscaler's bounds on the miss rate, as fractions (settings.min_miss, max_miss)."""

    min_miss: float
    max_miss: float

    def marks(self) -> list[tuple[float, str, str]]:
        """The dashed lines of the bounds on a chart in percent (``Marks.thresholds``)."""
        return [
            (
                self.max_miss * 100,
                "threshold max-miss",
                f"maxMiss {self.max_miss:.0%}: the autoscaler grows the pool above it",
            ),
            (
                self.min_miss * 100,
                "threshold min-miss",
                f"minMiss {self.min_miss:.0%}: the autoscaler shrinks the pool below it",
            ),
        ]


@dataclass(frozen=True, slots=True)
class Marks:
    """What a chart draws beyond its points, in chart positions (x from 0 to 1)."""

    # A point's <title> from its x label and its value as shown.
    point_title: Callable[[str, str], str]
    partial_label: str | None = None  # the x label of the partial last point, if any
    resizes: Sequence[tuple[float, str]] = ()  # (x position, description)
    thresholds: Sequence[tuple[float, str, str]] = ()  # (value as plotted, class, description)
    current: tuple[float, str] | None = None  # (x position, description) of the pool's size now
    current_label: str | None = None  # the x label of the point at the pool's size now


def render(
    figure: Figure,
    labels: list[str],
    major: list[str],
    values: list[float | None],
    marks: Marks,
    *,
    x_title: str,
    no_data_text: str = "No data",
) -> str:
    """The <svg> of ``values`` (None: a gap) at the x ``labels``, of which
    ``major`` are shown, drawn as ``figure`` says with ``marks``."""
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


@dataclass(frozen=True, slots=True)
class _Decorate:
    """A pygal XML filter adding what pygal does not draw (see the module's docstring).

    It runs inside ``chart.render()``, while pygal's ``view`` (chart positions
    and values to plot coordinates) of ``chart`` is still set up.
    """

    _chart: Any
    _figure: Figure
    _marks: Marks
    _y_range: tuple[float, float]

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
        style = f"stroke: {RESIZE_COLOUR}; stroke-width: 1; stroke-dasharray: 2,3; fill: none"
        for position, description in self._marks.resizes:
            self._draw_vertical(plot, position, "resize-mark", description, style)

    def _draw_current(self, plot: Any) -> None:
        if self._marks.current is not None:
            position, description = self._marks.current
            style = f"stroke: {CURRENT_COLOUR}; stroke-width: 1.5; fill: none"
            self._draw_vertical(plot, position, "current-size", description, style)

    def _draw_vertical(
        self, plot: Any, position: float, css_class: str, description: str, style: str
    ) -> None:
        """A line across the whole y range at the x ``position``."""
        low, high = self._y_range
        x, y0 = self._chart.view((position, low))
        _, y1 = self._chart.view((position, high))
        self._mark(plot, css_class, description, f"M{x:.6f} {y0:.6f} V{y1:.6f}", style)

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
