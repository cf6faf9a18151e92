"""The What-if page: the recorded minutes replayed under the parameters the form asks for."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from manager.appkeys import CONFIG, CONTROLLER, CURVE_RECORDS, METRICS
from manager.misscurve import POOL_SIZES
from manager.settings import API_NAMES, CacheSettings, SettingsError
from manager.views import ECHO_MAX_CHARS, FIELD_LABELS, render
from manager.whatif_report import (
    DEFAULT_SPAN_MINUTES,
    MAX_SPAN_MINUTES,
    OVERRIDABLE,
    WhatIfReport,
    load_report,
    percent,
    with_overrides,
)

log = logging.getLogger(__name__)

# The form's labels, as the Memory Configuration page has them, and the span's.
LABELS = {name: FIELD_LABELS[name] for name in OVERRIDABLE} | {"minutes": "Span (minutes)"}
# A refusal may name a field by its API name (maxMiss) or its internal one (max_miss).
_FIELD_OF = {name: name for name in LABELS} | {
    internal: api_name for api_name, internal in API_NAMES.items() if api_name in LABELS
}
_LABELLED = re.compile(r"\b(" + "|".join(map(re.escape, _FIELD_OF)) + r")\b")
_WHOLE_NUMBER = re.compile("[0-9]{1,6}")

# The chart of sizes over time, in the SVG's own units.
CHART_WIDTH, CHART_HEIGHT, CHART_MARGIN = 720, 180, 28


def add_routes(app: web.Application) -> None:
    app.router.add_get("/whatif", whatif_page)


@dataclass(frozen=True, slots=True)
class SizeChart:
    """Two step lines, what happened and the replay, as SVG polyline points."""

    happened: str
    replayed: str
    y_ticks: tuple[tuple[int, float], ...]  # (size, y)
    first: str  # the first and last minutes, labels of the x axis
    last: str


def size_chart(report: WhatIfReport) -> SizeChart | None:
    """The pool's size minute by minute, drawn as steps; None without minutes."""
    if not report.minutes:
        return None
    count = len(report.minutes)
    plot_width = CHART_WIDTH - 2 * CHART_MARGIN
    plot_height = CHART_HEIGHT - 2 * CHART_MARGIN
    top = max(POOL_SIZES)

    def x(index: int) -> float:
        return CHART_MARGIN + plot_width * index / count

    def y(size: int) -> float:
        return CHART_MARGIN + plot_height * (1 - size / top)

    def steps(sizes: list[int]) -> str:
        points = []
        for index, size in enumerate(sizes):
            points += [f"{x(index):.1f},{y(size):.1f}", f"{x(index + 1):.1f},{y(size):.1f}"]
        return " ".join(points)

    return SizeChart(
        happened=steps([m.size for m in report.minutes]),
        replayed=steps([m.replayed_size for m in report.minutes]),
        y_ticks=tuple((size, y(size)) for size in (0, 2, 4, 6, 8)),
        first=f"{report.minutes[0].at:%H:%M}",
        last=f"{report.minutes[-1].at:%H:%M}",
    )


def form_of(settings: CacheSettings, span_minutes: int) -> dict[str, str]:
    """The form's fields as the page shows ``settings``."""
    return {
        "scaling": settings.scaling,
        "maxMiss": f"{settings.max_miss:g}",
        "minMiss": f"{settings.min_miss:g}",
        "expRatio": f"{settings.exp_ratio:g}",
        "shrinkRatio": f"{settings.shrink_ratio:g}",
        "minLookups": str(settings.min_lookups),
        "minutes": str(span_minutes),
    }


def parse_span(text: str) -> int:
    """The span in minutes; raises SettingsError (naming ``minutes``) when it is not one."""
    if _WHOLE_NUMBER.fullmatch(text.strip()) is None or not (1 <= int(text) <= MAX_SPAN_MINUTES):
        raise SettingsError(f"minutes must be a whole number from 1 to {MAX_SPAN_MINUTES}")
    return int(text)


async def whatif_page(request: web.Request) -> web.Response:
    """The replay of the recorded minutes with the form's parameters (default:
    the current settings), beside what happened; a refused value: 400 naming
    its field by label, and no replay."""
    query: Mapping[str, str] = request.query
    app = request.app
    stored = await app[CONTROLLER].settings()
    try:
        span = parse_span(query.get("minutes") or str(DEFAULT_SPAN_MINUTES))
        settings = with_overrides(stored, query)
    except SettingsError as error:
        log.info("what-if refused: %s", error)
        invalid = frozenset(_FIELD_OF[match.group(1)] for match in _LABELLED.finditer(str(error)))
        message = _LABELLED.sub(lambda match: f"“{LABELS[_FIELD_OF[match.group(1)]]}”", str(error))
        entered = {
            name: query[name][:ECHO_MAX_CHARS].encode("utf-8", "replace").decode("utf-8")
            for name in LABELS
            if name in query
        }
        return render(
            request,
            "whatif.html",
            status=400,
            page="whatif",
            percent=percent,
            max_minutes=MAX_SPAN_MINUTES,
            labels=LABELS,
            form=form_of(stored, DEFAULT_SPAN_MINUTES) | entered,
            invalid=invalid,
            report=None,
            chart=None,
            flash=("error", f"Nothing replayed: {message}."),
        )
    report = await load_report(
        app[METRICS],
        app[CURVE_RECORDS],
        settings,
        now=datetime.now(UTC),
        span_minutes=span,
        settle_seconds=app[CONFIG].manager.settle_seconds,
    )
    return render(
        request,
        "whatif.html",
        page="whatif",
        percent=percent,
        max_minutes=MAX_SPAN_MINUTES,
        labels=LABELS,
        form=form_of(settings, span),
        invalid=frozenset(),
        report=report,
        chart=size_chart(report),
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        margin=CHART_MARGIN,
    )
