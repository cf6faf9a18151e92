"""The miss curve's windows in the metadata database (src/manager/curve_records.py),
against SQLite and a real MariaDB alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from imagecache.config import ConfigError, load_config
from imagecache.database import Database
from manager.curve_records import RETENTION, CurveRecords, RecordedWindow
from manager.curves import MissCurves
from manager.settings import CacheSettings
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import database_fixture, metadata_url_fixture  # noqa: F401

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
CURVE = (0.9, 0.7, None, 0.35, 0.25, 0.2, 0.18, 0.125)


def window(started: datetime, *, lookups: int = 1000) -> RecordedWindow:
    return RecordedWindow(
        started=started,
        seconds=60.0,
        capacity_mb=2.5,
        policy="random",
        lookups=lookups,
        sampled_lookups=lookups // 100,
        predicted_miss=CURVE,
    )


@pytest.fixture
async def records(database: Database) -> CurveRecords:
    return await CurveRecords.open(database)


async def test_windows_round_trip_within_the_span_asked_for(records: CurveRecords) -> None:
    for minute in range(5):
        await records.add(window(T0 + timedelta(minutes=minute), lookups=1000 + minute))
    got = await records.windows(T0 + timedelta(minutes=1), T0 + timedelta(minutes=4))
    # [start, end): the window opening at the end is not in it.
    assert [w.started for w in got] == [T0 + timedelta(minutes=m) for m in (1, 2, 3)]
    assert got[0] == window(T0 + timedelta(minutes=1), lookups=1001)
    assert got[0].started.tzinfo is not None
    assert got[0].predicted_miss[2] is None  # unknown stays unknown, not 0
    # A span given in another time zone means the same instants.
    plus_two = got[0].started.astimezone(timezone(timedelta(hours=2)))
    assert await records.windows(plus_two, plus_two + timedelta(seconds=1)) == [got[0]]


async def test_a_closed_window_of_the_running_curve_is_stored_as_it_was(
    records: CurveRecords,
) -> None:
    curves = MissCurves(wall_clock=lambda: T0, rate=1.0)
    curves.follow(CacheSettings(capacity_mb=1.0, policy="random"))
    curves.feed(4, [("a", 1000), ("b", 1000), ("a", 1000), ("a", 1000)])
    closed = curves.close_window(T0 + timedelta(seconds=60))
    await records.add(RecordedWindow.of(closed))
    (stored,) = await records.windows(T0, T0 + timedelta(minutes=1))
    assert stored.started == T0
    assert stored.seconds == 60.0  # to the boundary, however late the close ran
    assert stored.policy == "random"
    assert stored.capacity_mb == 1.0
    assert (stored.lookups, stored.sampled_lookups) == (4, 4)
    assert stored.predicted_miss == (0.5,) * 8
    # The next window opens at the boundary it was due at, not when the close ran.
    assert curves.close_window().started == T0 + timedelta(seconds=60)


async def test_old_windows_are_pruned_at_most_once_an_hour(records: CurveRecords) -> None:
    everything = (T0 - 2 * RETENTION, T0 + timedelta(days=1))
    two_weeks_ago = T0 - timedelta(days=14)  # as long as CloudWatch keeps minutes, nearly
    await records.add(window(T0 - RETENTION - timedelta(days=1)))
    await records.add(window(two_weeks_ago))
    await records.add(window(T0))  # prunes: the first is older than RETENTION
    assert [w.started for w in await records.windows(*everything)] == [two_weeks_ago, T0]
    # Within the hour after a prune, nothing is pruned...
    late = T0 - RETENTION - timedelta(hours=1)
    await records.add(window(late))
    await records.add(window(T0 + timedelta(minutes=59)))
    assert late in [w.started for w in await records.windows(*everything)]
    # ...and an hour later the old window goes; windows within RETENTION stay.
    await records.add(window(T0 + timedelta(minutes=60)))
    assert [w.started for w in await records.windows(*everything)] == [
        two_weeks_ago,
        T0,
        T0 + timedelta(minutes=59),
        T0 + timedelta(minutes=60),
    ]


async def test_a_window_of_the_wrong_shape_is_refused(records: CurveRecords) -> None:
    bad = RecordedWindow(T0, 60.0, 1.0, "lru", 1, 1, (0.5, 0.5))
    with pytest.raises(ValueError, match="8 sizes"):
        await records.add(bad)
    assert await records.windows(T0, T0 + timedelta(minutes=1)) == []


def test_the_window_length_is_a_manager_setting_that_divides_the_minute() -> None:
    assert load_config(environ={}).manager.curve_window_seconds == 60.0
    config = load_config(environ={"IMAGECACHE_CURVE_WINDOW_SECONDS": "0.5"})
    assert config.manager.curve_window_seconds == 0.5
    for bad in ("7", "0", "-60", "120"):
        with pytest.raises(ConfigError, match="curve_window_seconds must divide 60"):
            load_config(environ={"IMAGECACHE_CURVE_WINDOW_SECONDS": bad})
