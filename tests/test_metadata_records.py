"""The manager's records' contract, run against SQLite and a real MariaDB alike."""

from __future__ import annotations

import pytest

from imagecache.database import Database
from manager.records import ManagerRecords
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import database_fixture, metadata_url_fixture  # noqa: F401


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
    await records.add_activity(1, 3, "manual expand by 2", None)
    await records.add_activity(3, 2, "autoscaler: miss rate 2.0% < minMiss", 0.02)
    history = await records.list_activity()
    assert [(a.size_before, a.size_after) for a in history] == [(3, 2), (1, 3)]
    assert history[0].cause.startswith("autoscaler")
    assert history[0].miss_rate == pytest.approx(0.02)
    assert history[1].miss_rate is None
    assert history[0].at.tzinfo is not None
    assert len(await records.list_activity(limit=1)) == 1
