"""The Memory Statistics page's charts of the last 30 minutes of the pool, one per figure.

Drawn by manager.chartsvg (inline SVG, no script, a <title> on every point).
The Workers chart is drawn as steps (a pool size holds until it changes), the
current minute, still partial, is marked as such (hollow point, dashed line,
"so far"), the miss rate chart has the autoscaler's minMiss and maxMiss as
dashed lines, and every chart has a mark where the pool was resized. Reads no
pool size can fix (keys with no image, images too large to cache) have a
chart of their own: they are not lookups, so they are in neither rate, and
each point's title tells the two kinds apart. The miss curve's chart is
manager.curvechart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from manager.chartsvg import PERCENT, Chart, Figure, Marks, MissThresholds, percent, render
from manager.metrics import MinuteStats
from manager.records import Activity
from manager.settings import MAX_NODES

LABEL_EVERY_MINUTES = 5
X_TITLE = "Time (UTC)"
PARTIAL_NOTE = "partial minute, so far"
_MINUTE = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class _Series:
    """A chart of the last minutes: how it is drawn, and each minute's value."""

    figure: Figure
    value: Callable[[MinuteStats], float | None]
    # More about a minute than its value, added to its point's title.
    detail: Callable[[MinuteStats], str] | None = None


def _whole(value: float) -> str:
    return f"{value:,.0f}"


def _unfixable_detail(stats: MinuteStats) -> str:
    return f"{stats.missing:,} with no image, {stats.uncacheable:,} too large to cache"


_SERIES = (
    _Series(
        Figure(
            "Workers",
            lambda v: f"{v:.0f}",
            fixed_range=(0, MAX_NODES),
            y_labels=range(MAX_NODES + 1),
            steps=True,
        ),
        lambda m: m.workers,
    ),
    _Series(
        replace(PERCENT, title="Miss rate (%)", thresholds=True), lambda m: percent(m.miss_rate)
    ),
    _Series(replace(PERCENT, title="Hit rate (%)"), lambda m: percent(m.hit_rate)),
    _Series(Figure("Items", _whole, floor=10), lambda m: m.items),
    _Series(Figure("Items size (MB)", lambda v: f"{v:,.1f}", floor=1), lambda m: m.items_mb),
    _Series(Figure("Requests (per minute)", _whole, floor=10), lambda m: m.requests),
    # Apart from the rates: these reads are in neither (see manager.metrics).
    _Series(
        Figure("Reads no pool size can fix (per minute)", _whole, floor=10),
        lambda m: m.missing + m.uncacheable,
        _unfixable_detail,
    ),
)


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
        marks = Marks(
            point_title=_minute_title(partial_label, details),
            partial_label=partial_label,
            resizes=resize_marks,
            thresholds=thresholds.marks() if thresholds is not None and figure.thresholds else [],
        )
        svg = render(figure, labels, major, values, marks, x_title=X_TITLE)
        charts.append(Chart(figure.title, svg))
    return charts


def _minute_title(partial_label: str | None, details: dict[str, str]) -> Callable[[str, str], str]:
    """Titles of a minute's point: "12:03 UTC: 25%", and what else is known of it."""

    def title(label: str, value: str) -> str:
        notes = [details[label]] if label in details else []
        if label == partial_label:
            notes.append(PARTIAL_NOTE)
        return f"{label} UTC: {value}" + (f" ({'; '.join(notes)})" if notes else "")

    return title


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
