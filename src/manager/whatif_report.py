"""What-if against the recorded run: the stored minutes and curves, replayed and reported.

The statistics' minutes come from the MetricsStore (``minutes(start, end)``:
wall-clock UTC minutes) and the miss curve's windows from the metadata
database (manager.curve_records). The manager closes 60-second windows on
the minute, so a minute has one window; shorter windows, and the first one
after a start, cover part of a minute, and the windows that opened within a
minute are combined, each size's predicted miss rate weighted by the lookups
behind it. A minute without a window is replayed without a curve (only its
recorded size has a known miss rate: ``whatif.RecordedMinute``). The
current minute, still partial, is left out.

``build_report`` joins and replays (pure), ``format_report`` writes the table
``imagecache whatif`` prints (pure); ``load_report`` reads the stores and
``report_from_config`` opens them as ``imagecache manager`` would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import make_url

from imagecache.config import Config
from imagecache.errors import StorageError
from manager.curve_records import CurveRecords, RecordedWindow
from manager.curves import trusted
from manager.metrics import MetricsStore, MinuteStats
from manager.misscurve import POOL_SIZES
from manager.settings import CacheSettings, apply_params
from manager.whatif import RecordedMinute, Replay, ReplayedMinute, replay

DEFAULT_SPAN_MINUTES = 60
# 15 days: as long as CloudWatch keeps 1-minute data and the curves are kept.
MAX_SPAN_MINUTES = 15 * 24 * 60
# The settings a what-if may change, by their API names (manager.settings).
OVERRIDABLE = ("maxMiss", "minMiss", "expRatio", "shrinkRatio", "minLookups", "scaling")
_MINUTE = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class MinuteCurve:
    """The miss curve of one minute, from the windows that opened in it."""

    predicted_miss: tuple[float | None, ...]  # for POOL_SIZES
    seconds: float  # how much of the minute the windows covered
    sampled_lookups: int


@dataclass(frozen=True, slots=True)
class ReportMinute:
    at: datetime  # start of the minute, aware UTC
    lookups: int
    size: int  # what happened
    miss_rate: float | None
    replayed_size: int
    replayed_miss_rate: float | None  # estimated at the replayed size; None: not known
    curve_seconds: float  # 0: no curve recorded for the minute, or too thin to act on
    decision: str  # the replay's judgement at the minute's end


@dataclass(frozen=True, slots=True)
class Totals:
    resizes: int
    node_minutes: int
    mean_miss_rate: float | None  # mean of the minutes' rates where known

    @classmethod
    def of(cls, run: Replay) -> Totals:
        return cls(run.resizes, run.node_minutes, run.mean_miss_rate)


@dataclass(frozen=True, slots=True)
class WhatIfReport:
    start: datetime  # the span asked for, [start, end), aware UTC
    end: datetime
    settings: CacheSettings  # as replayed (their ``scaling`` is the replay's policy)
    minutes: tuple[ReportMinute, ...]
    happened: Totals
    replayed: Totals

    @property
    def curve_minutes(self) -> int:
        return sum(1 for minute in self.minutes if minute.curve_seconds > 0)


def minute_curves(windows: Sequence[RecordedWindow]) -> dict[datetime, MinuteCurve]:
    """The windows grouped by the wall-clock minute they opened in, each size's
    rate weighted by the window's lookups (a rate is misses per lookup)."""
    grouped: dict[datetime, list[RecordedWindow]] = {}
    for window in windows:
        minute = window.started.astimezone(UTC).replace(second=0, microsecond=0)
        grouped.setdefault(minute, []).append(window)
    curves = {}
    for minute, group in grouped.items():
        rates: list[float | None] = []
        for index in range(len(POOL_SIZES)):
            known = [(w.predicted_miss[index], w.lookups) for w in group]
            weighed = [(rate, lookups) for rate, lookups in known if rate is not None]
            weight = sum(lookups for _, lookups in weighed)
            if weight:
                rates.append(sum(rate * lookups for rate, lookups in weighed) / weight)
            elif weighed:  # known but over no counted lookup: the plain mean
                rates.append(sum(rate for rate, _ in weighed) / len(weighed))
            else:
                rates.append(None)
        curves[minute] = MinuteCurve(
            tuple(rates),
            sum(w.seconds for w in group),
            sum(w.sampled_lookups for w in group),
        )
    return curves


def join(
    minutes: Sequence[MinuteStats], curves: Mapping[datetime, MinuteCurve]
) -> list[RecordedMinute]:
    """Each minute of the statistics with its curve, where one was recorded on
    enough sampled lookups for the autoscaler to act on it (curves.trusted)."""
    joined = []
    for stats in minutes:
        curve = curves.get(stats.minute)
        evidence = None if curve is None else trusted(curve.predicted_miss, curve.sampled_lookups)
        joined.append(RecordedMinute(stats, None if evidence is None else tuple(evidence)))
    return joined


def build_report(
    start: datetime,
    end: datetime,
    minutes: Sequence[MinuteStats],
    windows: Sequence[RecordedWindow],
    settings: CacheSettings,
    *,
    settle_seconds: float,
) -> WhatIfReport:
    """``minutes`` and ``windows`` joined, replayed with ``settings`` (policy:
    their ``scaling``), beside what happened."""
    curves = minute_curves(windows)
    recorded = join(minutes, curves)
    replayed = replay(recorded, settings, policy=settings.scaling, settle_seconds=settle_seconds)
    happened = Replay(
        tuple(
            ReplayedMinute(m.stats.minute, m.stats.workers, m.stats.miss_rate, "recorded")
            for m in recorded
        )
    )
    rows = tuple(
        ReportMinute(
            at=m.stats.minute,
            lookups=m.stats.lookups,
            size=m.stats.workers,
            miss_rate=m.stats.miss_rate,
            replayed_size=r.size,
            replayed_miss_rate=r.miss_rate,
            curve_seconds=curves[m.stats.minute].seconds if m.curve is not None else 0.0,
            decision=r.decision,
        )
        for m, r in zip(recorded, replayed.minutes, strict=True)
    )
    return WhatIfReport(start, end, settings, rows, Totals.of(happened), Totals.of(replayed))


def with_overrides(settings: CacheSettings, overrides: Mapping[str, str]) -> CacheSettings:
    """``settings`` with the what-if's changes (API names, OVERRIDABLE only) applied
    and validated; raises SettingsError as ``apply_params`` does."""
    return apply_params(settings, {k: v for k, v in overrides.items() if k in OVERRIDABLE})


def span_ending(now: datetime, span_minutes: int) -> tuple[datetime, datetime]:
    """The last ``span_minutes`` whole minutes before ``now``: the current one is partial."""
    end = now.astimezone(UTC).replace(second=0, microsecond=0)
    return end - span_minutes * _MINUTE, end


async def load_report(
    metrics: MetricsStore,
    curve_records: CurveRecords,
    settings: CacheSettings,
    *,
    now: datetime,
    span_minutes: int,
    settle_seconds: float,
) -> WhatIfReport:
    """The what-if of the last ``span_minutes`` whole minutes before ``now``."""
    start, end = span_ending(now, span_minutes)
    minutes = await metrics.minutes(start, end)
    windows = await curve_records.windows(start, end)
    return build_report(start, end, minutes, windows, settings, settle_seconds=settle_seconds)


async def report_from_config(
    config: Config, overrides: Mapping[str, str], *, span_minutes: int, now: datetime
) -> WhatIfReport:
    """The what-if on the stores ``config`` names, with the stored settings
    changed by ``overrides``; writes nothing but the tables' creation if absent.

    Raises SettingsError for a bad override, StorageError when a store fails
    or the embedded database's file does not exist (nothing was recorded there).
    """
    from imagecache.database import Database
    from manager.records import ManagerRecords

    _require_recorded(config.metadata_url)
    async with Database.open(config.metadata_url) as database, _metrics(config) as metrics:
        records = await ManagerRecords.open(database)
        stored = CacheSettings.from_strings(await records.get_settings())
        settings = with_overrides(stored, overrides)
        return await load_report(
            metrics,
            await CurveRecords.open(database),
            settings,
            now=now,
            span_minutes=span_minutes,
            settle_seconds=config.manager.settle_seconds,
        )


def _require_recorded(metadata_url: str) -> None:
    """Raise StorageError when ``metadata_url`` is a SQLite file that does not
    exist: opening it would create an empty one, and a what-if of nothing
    (likely the wrong folder or URL) should say so instead."""
    url = make_url(metadata_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database)
        if not path.is_file():
            raise StorageError(
                f"no metadata database at {path}: give the manager's configuration"
                " (--config, IMAGECACHE_CONFIG, IMAGECACHE_DATA_DIR or IMAGECACHE_METADATA_URL)"
            )


@asynccontextmanager
async def _metrics(config: Config) -> AsyncIterator[MetricsStore]:
    async with AsyncExitStack() as stack:
        if config.manager.metrics == "cloudwatch":
            from manager.cloudwatch import open_cloudwatch_metrics

            yield await stack.enter_async_context(
                open_cloudwatch_metrics(config.manager.cloudwatch_namespace, config.aws)
            )
            return
        from manager.sqlite_metrics import SqlMetrics

        yield await stack.enter_async_context(SqlMetrics.open(config.metadata_url))


def percent(rate: float | None) -> str:
    return "\N{EN DASH}" if rate is None else f"{rate * 100:.1f}%"


def describe(settings: CacheSettings) -> str:
    """The replayed settings, by their API names."""
    return (
        f"policy {settings.scaling}, maxMiss {settings.max_miss:g}, minMiss {settings.min_miss:g}, "
        f"expRatio {settings.exp_ratio:g}, shrinkRatio {settings.shrink_ratio:g}, "
        f"minLookups {settings.min_lookups}"
    )


def format_report(report: WhatIfReport) -> str:
    """The report as the table ``imagecache whatif`` prints."""
    lines = [
        f"What-if over {report.start:%Y-%m-%d %H:%M} to {report.end:%H:%M} UTC: "
        f"{len(report.minutes)} recorded minutes, {report.curve_minutes} with a miss curve",
        f"Replayed with {describe(report.settings)}",
        "",
    ]
    if report.minutes:
        lines.append(
            f"{'minute (UTC)':<17} {'lookups':>9} {'size':>5} {'miss':>7}"
            f" {'replay':>7} {'est.miss':>8} {'curve':>6}  decision"
        )
        for m in report.minutes:
            curve = f"{m.curve_seconds:.0f}s" if m.curve_seconds else "\N{EN DASH}"
            lines.append(
                f"{m.at:%Y-%m-%d %H:%M} {m.lookups:>9} {m.size:>5} {percent(m.miss_rate):>7}"
                f" {m.replayed_size:>7} {percent(m.replayed_miss_rate):>8} {curve:>6}  {m.decision}"
            )
        lines.append("")
    else:
        lines += ["No minutes recorded in this span.", ""]
    happened, replayed = report.happened, report.replayed
    lines += [
        f"{'':<16} {'what happened':>14} {'replay':>10}",
        f"{'resizes':<16} {happened.resizes:>14} {replayed.resizes:>10}",
        f"{'node-minutes':<16} {happened.node_minutes:>14} {replayed.node_minutes:>10}",
        f"{'mean miss rate':<16} {percent(happened.mean_miss_rate):>14}"
        f" {percent(replayed.mean_miss_rate):>10}",
    ]
    return "\n".join(lines)
