"""The Memory Statistics page's charts: the last 30 minutes of the pool, one per figure.

Rendered on the server as inline SVG by pygal, without any script: the
dashboard must work without network access, so pygal's tooltip script (a CDN
URL by default) is switched off, and with it the inline configuration that
only that script reads (which a strict Content-Security-Policy would refuse).
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


def _percent(rate: float | None) -> float | None:
    return None if rate is None else rate * 100


_FIGURES = (
    _Figure(
        "Workers",
        lambda m: m.workers,
        lambda v: f"{v:.0f}",
        fixed_range=(0, MAX_NODES),
        y_labels=range(MAX_NODES + 1),
    ),
    _Figure("Miss rate (%)", lambda m: _percent(m.miss_rate), lambda v: f"{v:.0f}%", (0, 100)),
    _Figure("Hit rate (%)", lambda m: _percent(m.hit_rate), lambda v: f"{v:.0f}%", (0, 100)),
    _Figure("Items", lambda m: m.items, lambda v: f"{v:,.0f}", floor=10),
    _Figure("Items size (MB)", lambda m: m.items_mb, lambda v: f"{v:,.1f}", floor=1),
    _Figure("Requests (per minute)", lambda m: m.requests, lambda v: f"{v:,.0f}", floor=10),
)


def render_charts(
    minutes: Sequence[MinuteStats], end: datetime, span_minutes: int = 30
) -> list[Chart]:
    """The six charts (workers, miss rate, hit rate, items, items size, requests).

    The x axis has one position per minute that starts in
    [end - span_minutes, end), labelled HH:MM (UTC) at every fifth minute; a
    minute absent from ``minutes`` (or without lookups, for the rates) is a
    gap in the line. Entries of ``minutes`` outside the span are ignored.
    Returns the charts in that order. Raises ValueError when ``end`` has no
    time zone or ``span_minutes`` is below 1.
    """
    if end.utcoffset() is None:
        raise ValueError(f"end {end.isoformat()} has no time zone")
    if span_minutes < 1:
        raise ValueError(f"span_minutes must be at least 1, not {span_minutes}")
    end = end.astimezone(UTC)
    last = end.replace(second=0, microsecond=0)
    if last == end:
        last -= _MINUTE
    slots = [last - (span_minutes - 1 - i) * _MINUTE for i in range(span_minutes)]
    by_minute = {m.minute.astimezone(UTC): m for m in minutes}
    labels = [slot.strftime("%H:%M") for slot in slots]
    major = [
        label
        for slot, label in zip(slots, labels, strict=True)
        if slot.minute % LABEL_EVERY_MINUTES == 0
    ]
    charts = []
    for figure in _FIGURES:
        values = [
            None if (stats := by_minute.get(slot)) is None else figure.value(stats)
            for slot in slots
        ]
        charts.append(Chart(figure.title, _render(figure, labels, major, values)))
    return charts


def _render(
    figure: _Figure, labels: list[str], major: list[str], values: list[float | None]
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
    svg: str = chart.render()
    return svg


def _without_scripts(root: Any) -> Any:
    """A pygal XML filter: the tree without its <script> elements."""
    for parent in list(root.iter()):
        for child in list(parent):
            # Comments have a function as their tag; lxml (if pygal uses it) namespaces tags.
            if isinstance(child.tag, str) and child.tag.rpartition("}")[2] == "script":
                parent.remove(child)
    return root
