"""The SQL metrics store's contract, run against SQLite and a real MariaDB alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    Table,
    func,
    insert,
    make_url,
    select,
)
from sqlalchemy.ext.asyncio import create_async_engine

from imagecache.database import RowId, Timestamp
from imagecache.errors import StorageError
from manager.metrics import MinuteStats, PoolSample
from manager.sqlite_metrics import RETENTION, SqlMetrics, samples_table
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


@pytest.fixture(params=["sqlite", "mysql"])
def metrics_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        # A folder that does not exist yet: open() creates it.
        return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'metrics.db'}"
    url: str = request.getfixturevalue("mariadb_database_url")
    return url


@pytest.fixture
async def metrics(metrics_url: str) -> AsyncIterator[SqlMetrics]:
    async with SqlMetrics.open(metrics_url) as store:
        yield store


def sample(
    at: datetime,
    *,
    workers: int = 2,
    lookups: int = 10,
    hits: int = 7,
    misses: int = 3,
    requests: int = 12,
    items: int = 100,
    size: int = 4096,
) -> PoolSample:
    return PoolSample(at, workers, lookups, hits, misses, requests, items, size)


async def row_count(url: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.scalar(select(func.count()).select_from(samples_table))) or 0)
    finally:
        await engine.dispose()


async def test_samples_are_grouped_by_minute(metrics: SqlMetrics) -> None:
    # Minute 12:00: three samples; 12:01: none; 12:02: one, at its very start.
    await metrics.put(sample(T0 + timedelta(seconds=5), workers=1, lookups=4, hits=1, misses=3))
    await metrics.put(
        sample(T0 + timedelta(seconds=30.5), workers=2, lookups=6, items=50, size=1000)
    )
    await metrics.put(
        sample(
            T0 + timedelta(seconds=59.999999),
            workers=3,
            lookups=10,
            hits=9,
            misses=1,
            requests=20,
            items=70,
            size=3000,
        )
    )
    await metrics.put(sample(T0 + 2 * MINUTE, workers=4, lookups=0, hits=0, misses=0))

    minutes = await metrics.minutes(T0, T0 + 5 * MINUTE)

    assert minutes == [
        MinuteStats(T0, 3, 20, 17, 7, 44, 70, 3000),
        MinuteStats(T0 + 2 * MINUTE, 4, 0, 0, 0, 12, 100, 4096),
    ]
    assert minutes[0].miss_rate == pytest.approx(7 / 20)
    assert minutes[0].hit_rate == pytest.approx(17 / 20)
    assert minutes[1].miss_rate is None
    assert minutes[1].hit_rate is None
    assert all(m.minute.tzinfo is not None for m in minutes)


async def test_the_last_sample_of_a_minute_gives_its_gauges(metrics: SqlMetrics) -> None:
    # Stored out of order: the latest one is still the minute's last.
    await metrics.put(sample(T0 + timedelta(seconds=50), workers=5, items=9, size=90))
    await metrics.put(sample(T0 + timedelta(seconds=10), workers=1, items=1, size=10))

    (minute,) = await metrics.minutes(T0, T0 + MINUTE)

    assert (minute.workers, minute.items, minute.bytes) == (5, 9, 90)
    assert minute.lookups == 20


async def test_range_holds_the_minutes_that_start_in_it(metrics: SqlMetrics) -> None:
    for i in range(5):  # one sample in the middle of each minute 12:00 .. 12:04
        await metrics.put(sample(T0 + i * MINUTE + timedelta(seconds=30), workers=i + 1))

    async def workers(start: datetime, end: datetime) -> list[int]:
        return [m.workers for m in await metrics.minutes(start, end)]

    assert await workers(T0, T0 + 5 * MINUTE) == [1, 2, 3, 4, 5]
    assert await workers(T0 + MINUTE, T0 + 3 * MINUTE) == [2, 3]  # end excluded
    # A minute that starts before ``start`` is out, even its samples after ``start``;
    # the minute in which ``end`` falls is in (it starts before ``end``).
    assert await workers(T0 + timedelta(seconds=45), T0 + timedelta(minutes=2, seconds=1)) == [2, 3]
    assert await workers(T0 + timedelta(seconds=45), T0 + timedelta(seconds=50)) == []
    assert await workers(T0 + 3 * MINUTE, T0 + 3 * MINUTE) == []
    assert await workers(T0 + 10 * MINUTE, T0 + 20 * MINUTE) == []
    # Other time zones mean the same instants.
    plus_two = timezone(timedelta(hours=2))
    assert await workers(
        (T0 + MINUTE).astimezone(plus_two), (T0 + 2 * MINUTE).astimezone(plus_two)
    ) == [2]


async def test_minutes_keep_microseconds_apart(metrics: SqlMetrics) -> None:
    """A sample a microsecond before a minute ends belongs to that minute (MySQL: DATETIME(6))."""
    await metrics.put(sample(T0 + MINUTE - timedelta(microseconds=1), workers=1))
    await metrics.put(sample(T0 + MINUTE, workers=2))

    minutes = await metrics.minutes(T0, T0 + 2 * MINUTE)

    assert [(m.minute, m.workers) for m in minutes] == [(T0, 1), (T0 + MINUTE, 2)]


async def test_samples_older_than_the_retention_are_pruned(
    metrics: SqlMetrics, metrics_url: str
) -> None:
    def at(seconds: float) -> datetime:
        return T0 + timedelta(seconds=seconds)

    await metrics.put(sample(at(0), workers=1))  # prunes (nothing yet)
    await metrics.put(sample(at(50), workers=1))
    # The first put past the retention that comes a minute after the last prune
    # deletes what is older than RETENTION: the sample of 0 s.
    await metrics.put(sample(at(RETENTION.total_seconds() + 10), workers=2))
    assert await row_count(metrics_url) == 2

    # 45 s later: the sample of 50 s is now old too, but pruning waits a minute.
    await metrics.put(sample(at(RETENTION.total_seconds() + 55), workers=3))
    assert await row_count(metrics_url) == 3

    # 65 s after the last prune it runs again.
    await metrics.put(sample(at(RETENTION.total_seconds() + 75), workers=4))
    assert await row_count(metrics_url) == 3
    minutes = await metrics.minutes(at(0), at(RETENTION.total_seconds() + 120))
    assert [(m.minute - T0, m.workers) for m in minutes] == [
        (RETENTION, 3),
        (RETENTION + MINUTE, 4),
    ]


async def test_samples_survive_reopening(metrics_url: str) -> None:
    async with SqlMetrics.open(metrics_url) as store:
        await store.put(sample(T0))
    async with SqlMetrics.open(metrics_url) as store:
        assert len(await store.minutes(T0, T0 + MINUTE)) == 1


async def test_naive_datetimes_are_refused(metrics: SqlMetrics) -> None:
    naive = datetime(2024, 5, 1, 12, 0)
    with pytest.raises(ValueError, match="time zone"):
        await metrics.put(sample(naive))
    with pytest.raises(ValueError, match="time zone"):
        await metrics.minutes(naive, naive + MINUTE)


async def test_other_urls_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sqlite"):
        async with SqlMetrics.open(f"sqlite:///{tmp_path / 'metrics.db'}"):
            pass
    with pytest.raises(ValueError, match="not a database URL"):
        async with SqlMetrics.open("no url"):
            pass


async def test_an_unusable_database_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError, match="metrics store"):
        async with SqlMetrics.open(f"sqlite+aiosqlite:///{tmp_path / 'file' / 'metrics.db'}"):
            pass


async def test_reads_no_pool_size_can_fix_are_stored_and_summed(metrics: SqlMetrics) -> None:
    for seconds, missing, uncacheable in ((5, 3, 0), (10, 4, 2), (65, 0, 1)):
        await metrics.put(
            replace(
                sample(T0 + timedelta(seconds=seconds)), missing=missing, uncacheable=uncacheable
            )
        )

    minutes = await metrics.minutes(T0, T0 + 2 * MINUTE)

    assert [(m.missing, m.uncacheable) for m in minutes] == [(7, 2), (0, 1)]
    # Apart from the lookups and misses, which they are not part of.
    assert [(m.lookups, m.misses) for m in minutes] == [(20, 6), (10, 3)]


# The table as versions before the reads no pool size can fix created it.
_older_schema = MetaData()
_older_samples_table = Table(
    "metric_samples",
    _older_schema,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("at", Timestamp, nullable=False),
    *(
        Column(name, Integer if name == "workers" else BigInteger, nullable=False)
        for name in ("workers", "lookups", "hits", "misses", "requests", "items", "bytes")
    ),
    mysql_charset="utf8mb4",
)


async def test_a_table_of_an_older_version_gains_the_new_columns(metrics_url: str) -> None:
    database = make_url(metrics_url).database
    if metrics_url.startswith("sqlite") and database is not None:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(metrics_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_older_schema.create_all)
            await conn.execute(
                insert(_older_samples_table).values(
                    at=T0.replace(tzinfo=None),
                    workers=2,
                    lookups=10,
                    hits=7,
                    misses=3,
                    requests=12,
                    items=100,
                    bytes=4096,
                )
            )
    finally:
        await engine.dispose()

    async with SqlMetrics.open(metrics_url) as store:
        await store.put(replace(sample(T0 + MINUTE), missing=5, uncacheable=2))
        minutes = await store.minutes(T0, T0 + 2 * MINUTE)
    # Opened again (the columns are there now): nothing to add, nothing lost.
    async with SqlMetrics.open(metrics_url) as store:
        assert await store.minutes(T0, T0 + 2 * MINUTE) == minutes

    assert minutes == [
        MinuteStats(T0, 2, 10, 7, 3, 12, 100, 4096, missing=0, uncacheable=0),
        MinuteStats(T0 + MINUTE, 2, 10, 7, 3, 12, 100, 4096, missing=5, uncacheable=2),
    ]
