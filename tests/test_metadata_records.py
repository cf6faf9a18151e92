"""The manager's records' contract, run against SQLite and a real MariaDB alike."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Float, Integer, MetaData, Table, Text, insert

from imagecache.database import MYSQL_TABLE, Database, RowId, Timestamp, naive_utc_now
from manager.records import ManagerRecords
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import database_fixture, metadata_url_fixture  # noqa: F401


def old_activity_table() -> Table:
    """The activity table as versions before durations and lookups created it."""
    return Table(
        "activity",
        MetaData(),
        Column("id", RowId, primary_key=True, autoincrement=True),
        Column("at", Timestamp, nullable=False),
        Column("size_before", Integer, nullable=False),
        Column("size_after", Integer, nullable=False),
        Column("cause", Text, nullable=False),
        Column("miss_rate", Float, nullable=True),
        **MYSQL_TABLE,
    )


async def add_old_resize(database: Database, cause: str, miss_rate: float | None) -> None:
    """What an older version recorded for a resize, in its own activity table."""
    old = old_activity_table()
    await database.create(old.metadata)
    async with database.write() as conn:
        await conn.execute(
            insert(old),
            {
                "at": naive_utc_now(),
                "size_before": 1,
                "size_after": 2,
                "cause": cause,
                "miss_rate": miss_rate,
            },
        )


@pytest.fixture
async def records(database: Database) -> ManagerRecords:
    return await ManagerRecords.open(database)


async def test_settings_round_trip_and_overwrite(records: ManagerRecords) -> None:
    assert await records.get_settings() == {}
    await records.put_settings({"mode": "manual", "policy": "LRU", "capacity_mb": "64"})
    await records.put_settings({"policy": "RR", "maxMiss": "0.5"})
    await records.put_settings({})
    assert await records.get_settings() == {
        "mode": "manual",
        "policy": "RR",
        "capacity_mb": "64",
        "maxMiss": "0.5",
    }


async def test_activity_history_newest_first(records: ManagerRecords) -> None:
    assert await records.list_activity() == []
    await records.add_activity(1, 3, "manual expand by 2", None, duration_seconds=1.5)
    await records.add_activity(
        3, 2, "autoscaler: miss rate 2.0% < minMiss", 0.02, duration_seconds=4.25, lookups=1234
    )
    history = await records.list_activity()
    assert [(a.size_before, a.size_after) for a in history] == [(3, 2), (1, 3)]
    assert history[0].cause.startswith("autoscaler")
    assert history[0].miss_rate == pytest.approx(0.02)
    assert history[0].duration_seconds == pytest.approx(4.25)
    assert history[0].lookups == 1234
    assert history[1].miss_rate is None
    assert history[1].duration_seconds == pytest.approx(1.5)
    assert history[1].lookups is None
    assert history[0].at.tzinfo is not None
    assert len(await records.list_activity(limit=1)) == 1


async def test_an_old_activity_table_gains_durations_and_lookups(database: Database) -> None:
    """A data folder of an older version: its resizes stay, without the new figures."""
    await add_old_resize(database, "autoscaler: miss rate 70.0% > maxMiss", 0.7)
    records = await ManagerRecords.open(database)
    (old,) = await records.list_activity()
    assert (old.size_before, old.size_after, old.cause) == (
        1,
        2,
        "autoscaler: miss rate 70.0% > maxMiss",
    )
    assert old.miss_rate == pytest.approx(0.7)
    assert (old.duration_seconds, old.lookups) == (None, None)
    await records.add_activity(2, 4, "autoscaler: again", 0.6, duration_seconds=2.0, lookups=500)
    new, _ = await records.list_activity()
    assert new.duration_seconds == pytest.approx(2.0)
    assert new.lookups == 500
    assert await records.count_resizes() == {"manual": 0, "automatic": 2, "failed": 0}
