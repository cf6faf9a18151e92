"""What-if against recorded runs (src/manager/whatif_report.py and `imagecache whatif`):
minutes and curves joined, replayed and reported, through the real stores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import pytest

from imagecache.config import AwsConfig
from imagecache.database import Database
from manager.cloudwatch import open_cloudwatch_metrics
from manager.curve_records import CurveRecords, RecordedWindow
from manager.curves import MIN_SAMPLED_LOOKUPS
from manager.metrics import MetricsStore, MinuteStats, PoolSample
from manager.records import ManagerRecords
from manager.settings import CacheSettings, Mode
from manager.sqlite_metrics import SqlMetrics
from manager.whatif import RecordedMinute, replay
from manager.whatif_report import build_report, format_report, join, minute_curves, percent
from tests.aws import REGION, aws_environment, moto_server  # noqa: F401

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
# The miss rate pools of 1..8 nodes would have on the recorded workload.
CURVE = (0.9, 0.7, 0.5, 0.35, 0.25, 0.2, 0.18, 0.17)
SETTINGS = CacheSettings(
    capacity_mb=64, mode=Mode.AUTO, max_miss=0.3, min_miss=0.1, exp_ratio=2, shrink_ratio=0.5
)
SETTLE_SECONDS = 120.0  # the manager's default settle_seconds


def stats(minute: datetime, *, lookups: int = 1000, misses: int = 900) -> MinuteStats:
    return MinuteStats(
        minute=minute,
        workers=1,
        lookups=lookups,
        hits=lookups - misses,
        misses=misses,
        requests=lookups,
        items=10,
        bytes=1 << 20,
    )


def curve_window(
    started: datetime,
    seconds: float = 60.0,
    lookups: int = 1000,
    rates: tuple[float | None, ...] = CURVE,
) -> RecordedWindow:
    return RecordedWindow(started, seconds, 64.0, "lru", lookups, lookups // 2, rates)


def test_a_minute_takes_the_windows_that_opened_in_it_weighted_by_their_lookups() -> None:
    windows = [
        # The manager started at 12:00:40: the first window is the minute's last 20 s.
        curve_window(T0 + timedelta(seconds=40), seconds=20, lookups=300),
        # 12:01 in two windows of 30 s: 100 lookups at rate 0.2, 300 at 0.6 for one node.
        curve_window(T0 + MINUTE, 30, 100, (0.2, *CURVE[1:7], None)),
        curve_window(T0 + MINUTE + timedelta(seconds=30), 30, 300, (0.6, *CURVE[1:7], None)),
        curve_window(T0 + 3 * MINUTE),
    ]
    curves = minute_curves(windows)
    assert sorted(curves) == [T0, T0 + MINUTE, T0 + 3 * MINUTE]
    assert curves[T0].seconds == 20
    assert curves[T0].predicted_miss == CURVE
    assert curves[T0 + MINUTE].seconds == 60
    assert curves[T0 + MINUTE].predicted_miss[0] == pytest.approx(0.5)  # (20 + 180) / 400
    assert curves[T0 + MINUTE].predicted_miss[7] is None  # no window knew it
    # 12:02 has statistics but no curve: replayed on its recorded rate alone.
    recorded = join([stats(T0 + m * MINUTE) for m in range(4)], curves)
    assert [m.curve is None for m in recorded] == [False, False, True, False]
    assert recorded[2].miss_rate_at(1) == pytest.approx(0.9)
    assert recorded[2].miss_rate_at(2) is None


def test_the_report_is_the_replay_beside_what_happened() -> None:
    minutes = [stats(T0 + m * MINUTE) for m in range(15)]
    windows = [curve_window(T0 + m * MINUTE) for m in range(15) if m != 4]
    predictive = replace(SETTINGS, scaling="predictive")
    report = build_report(
        T0, T0 + 15 * MINUTE, minutes, windows, predictive, settle_seconds=SETTLE_SECONDS
    )
    expected = replay(
        [RecordedMinute(m, None if i == 4 else CURVE) for i, m in enumerate(minutes)],
        predictive,
        policy="predictive",
        settle_seconds=SETTLE_SECONDS,
    )
    assert [m.replayed_size for m in report.minutes] == [m.size for m in expected.minutes]
    assert report.replayed.resizes == expected.resizes == 1
    assert report.replayed.node_minutes == expected.node_minutes
    assert report.replayed.mean_miss_rate == expected.mean_miss_rate
    assert (report.happened.resizes, report.happened.node_minutes) == (0, 15)
    assert report.happened.mean_miss_rate == pytest.approx(0.9)
    assert report.curve_minutes == 14
    assert report.minutes[4].curve_seconds == 0
    printed = format_report(report)
    assert "15 recorded minutes, 14 with a miss curve" in printed
    assert re.search(rf"^node-minutes +15 +{expected.node_minutes}$", printed, re.MULTILINE)


@dataclass(frozen=True)
class RecordedRun:
    minutes: list[MinuteStats]  # what the statistics hold, minute by minute
    curves: list[tuple[float | None, ...] | None]  # the curve each minute has (None: none)


async def record_run(
    metadata_url: str, first: datetime, count: int, metrics: MetricsStore | None = None
) -> RecordedRun:
    """``count`` minutes from ``first`` of a one-node pool missing 90% of 1000 lookups a
    minute, through the real stores: pool samples every 15 s into ``metrics`` (default:
    the SqlMetrics of ``metadata_url``), curve windows into the CurveRecords (the first
    minute's covers its last 20 s, as after a start; the fourth minute has none), and
    the autoscaler's settings."""
    async with AsyncExitStack() as stack:
        if metrics is None:
            metrics = await stack.enter_async_context(SqlMetrics.open(metadata_url))
        return await _record_run(metadata_url, first, count, metrics)


async def _record_run(
    metadata_url: str, first: datetime, count: int, metrics: MetricsStore
) -> RecordedRun:
    minutes: list[MinuteStats] = []
    curves: list[tuple[float | None, ...] | None] = []
    async with Database.open(metadata_url) as database:
        records = await CurveRecords.open(database)
        await (await ManagerRecords.open(database)).put_settings(SETTINGS.to_strings())
        for index in range(count):
            minute = first + index * MINUTE
            for quarter in range(4):
                await metrics.put(
                    PoolSample(
                        at=minute + timedelta(seconds=5 + 15 * quarter),
                        workers=1,
                        lookups=250,
                        hits=25,
                        misses=225,
                        requests=250,
                        items=10,
                        bytes=1 << 20,
                    )
                )
            minutes.append(stats(minute))
            if index == 3:
                curves.append(None)
                continue
            if index == 0:
                await records.add(curve_window(minute + timedelta(seconds=40), seconds=20))
            else:
                await records.add(curve_window(minute))
            curves.append(CURVE)
    return RecordedRun(minutes, curves)


def run_whatif(
    metadata_url: str, *args: str, settings: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`imagecache whatif` on ``metadata_url``, with the SQL metrics store unless
    ``settings`` (IMAGECACHE_* variables) say otherwise."""
    environment = {
        **os.environ,
        "IMAGECACHE_METADATA_URL": metadata_url,
        "IMAGECACHE_METRICS": "sqlite",
        **(settings or {}),
    }
    environment.pop("IMAGECACHE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "launcher", "whatif", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )


def totals(printed: str) -> dict[str, tuple[str, str]]:
    """The totals table: row name -> (what happened, replay)."""
    found = {}
    for name in ("resizes", "node-minutes", "mean miss rate"):
        match = re.search(rf"^{name} +(\S+) +(\S+)$", printed, re.MULTILINE)
        assert match is not None, printed
        found[name] = (match.group(1), match.group(2))
    return found


async def test_whatif_against_a_recorded_run(tmp_path: Path) -> None:
    """20 recorded minutes, ending a few minutes ago, replayed by `imagecache whatif`."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'imagecache.db'}"
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    run = await record_run(url, now - 23 * MINUTE, 20)
    recorded = [RecordedMinute(m, c) for m, c in zip(run.minutes, run.curves, strict=True)]
    printed = {}
    for policy in ("ratio", "predictive"):
        result = run_whatif(url, "--minutes", "30", "--policy", policy)
        assert result.returncode == 0, result.stderr
        printed[policy] = result.stdout
        assert "20 recorded minutes, 19 with a miss curve" in result.stdout
        assert f"policy {policy}, maxMiss 0.3, minMiss 0.1" in result.stdout
        expected = replay(recorded, SETTINGS, policy=policy, settle_seconds=SETTLE_SECONDS)
        assert totals(result.stdout) == {
            "resizes": ("0", str(expected.resizes)),
            "node-minutes": ("20", str(expected.node_minutes)),
            "mean miss rate": ("90.0%", percent(expected.mean_miss_rate)),
        }
    # The ratio rule climbs 1, 2, 4, 8 in steps; the predictive one jumps to 5 at once.
    assert totals(printed["ratio"])["resizes"][1] == "3"
    assert totals(printed["predictive"])["resizes"][1] == "1"
    assert totals(printed["ratio"]) != totals(printed["predictive"])
    # The stored settings are the default; an override changes the replay.
    stored = run_whatif(url, "--minutes", "30")
    assert "policy ratio, maxMiss 0.3" in stored.stdout
    looser = run_whatif(url, "--minutes", "30", "--max-miss", "0.95")
    assert totals(looser.stdout)["resizes"][1] == "0"  # 90% is within maxMiss 0.95


async def test_whatif_refuses_bad_options_with_status_2(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'imagecache.db'}"
    await record_run(url, datetime.now(UTC) - 3 * MINUTE, 1)
    for args, says in (
        (("--policy", "sideways"), "invalid choice"),
        (("--max-miss", "lots"), "must be a number"),
        (("--minutes", "0"), "whole number from 1"),
        (("--min-lookups", "-3"), "whole number from 0"),
        (("--min-miss", "0.6", "--max-miss", "0.5"), "minMiss (0.6) must be below maxMiss"),
        (("--shrink-ratio", "1.5"), "shrinkRatio must be between 0 and 1"),
    ):
        result = run_whatif(url, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert says in result.stderr, (args, result.stderr)
        assert result.stdout == ""


def test_whatif_without_a_recorded_database_says_so_and_creates_none(tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere" / "imagecache.db"
    result = run_whatif(f"sqlite+aiosqlite:///{missing}")
    assert result.returncode == 1
    assert f"no metadata database at {missing}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.parent.exists()


async def test_whatif_reads_the_minutes_from_cloudwatch(
    tmp_path: Path,
    moto_server: str,  # noqa: F811
    aws_environment: None,  # noqa: F811
) -> None:
    """The same run with the statistics in CloudWatch (a moto server) and the curves
    in the metadata database, as a manager with ``metrics = "cloudwatch"`` keeps them."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'imagecache.db'}"
    namespace = f"imagecache-{uuid4().hex}"
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    aws = AwsConfig(region=REGION, endpoint_url=moto_server)
    async with open_cloudwatch_metrics(namespace, aws) as cloudwatch:
        run = await record_run(url, now - 13 * MINUTE, 10, cloudwatch)
    recorded = [RecordedMinute(m, c) for m, c in zip(run.minutes, run.curves, strict=True)]
    result = run_whatif(
        url,
        "--minutes",
        "20",
        "--policy",
        "predictive",
        settings={
            "IMAGECACHE_METRICS": "cloudwatch",
            "IMAGECACHE_CLOUDWATCH_NAMESPACE": namespace,
            "IMAGECACHE_AWS_REGION": REGION,
            "IMAGECACHE_AWS_ENDPOINT_URL": moto_server,
        },
    )
    assert result.returncode == 0, result.stderr
    assert "10 recorded minutes, 9 with a miss curve" in result.stdout
    expected = replay(recorded, SETTINGS, policy="predictive", settle_seconds=SETTLE_SECONDS)
    assert totals(result.stdout) == {
        "resizes": ("0", str(expected.resizes)),
        "node-minutes": ("10", str(expected.node_minutes)),
        "mean miss rate": ("90.0%", percent(expected.mean_miss_rate)),
    }


def test_a_curve_on_too_few_sampled_lookups_is_not_acted_on() -> None:
    # As the autoscaler does (curves.trusted): 99 sampled lookups are noise.
    thin = RecordedWindow(T0, 60.0, 64.0, "lru", 9_900, MIN_SAMPLED_LOOKUPS - 1, CURVE)
    enough = replace(thin, started=T0 + MINUTE, sampled_lookups=MIN_SAMPLED_LOOKUPS)
    recorded = join([stats(T0), stats(T0 + MINUTE)], minute_curves([thin, enough]))
    assert [m.curve for m in recorded] == [None, CURVE]
