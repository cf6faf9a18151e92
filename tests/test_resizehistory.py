"""Changes of the pool's size kept in the activity history and announced
(manager.resizehistory), over a real SQLite history."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from imagecache.database import Database
from imagecache.errors import StorageError
from manager.notify import ResizeNotice
from manager.records import ManagerRecords
from manager.resizehistory import ResizeHistory, change_of


class Opened:
    def __init__(self, database: Database, records: ManagerRecords) -> None:
        self.database = database
        self.records = records
        self.announced: list[ResizeNotice] = []
        self.history = ResizeHistory(records, self.announced.append)

    async def break_history(self) -> None:
        async with self.database.write() as conn:
            await conn.execute(text("DROP TABLE activity"))


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[Opened]:
    async with Database.open(f"sqlite+aiosqlite:///{tmp_path / 'metadata.db'}") as database:
        yield Opened(database, await ManagerRecords.open(database))


async def test_a_resize_is_kept_and_announced_with_its_row(opened: Opened) -> None:
    started = time.monotonic() - 2.0
    change = change_of(1, 3, 3, "autoscaler: grow", 0.4, failed=False)
    await opened.history.keep(change, started, 900, must_keep=True)
    (row,) = await opened.records.list_activity()
    assert (row.size_before, row.size_after, row.cause, row.lookups) == (1, 3, change.cause, 900)
    assert row.miss_rate == pytest.approx(0.4)
    assert row.duration_seconds is not None
    assert row.duration_seconds >= 2.0
    (notice,) = opened.announced
    assert notice.activity_id == row.id
    assert (notice.size_before, notice.target, notice.size_kept, notice.failed) == (1, 3, 3, False)


async def test_a_change_that_keeps_the_size_is_kept_but_not_announced(opened: Opened) -> None:
    change = change_of(2, 2, 2, "pool follows its nodes: a left, b joined", None, failed=False)
    await opened.history.keep(change, time.monotonic(), announced=False)
    assert [row.cause for row in await opened.records.list_activity()] == [change.cause]
    assert opened.announced == []


async def test_a_history_that_fails_still_announces_a_failed_resize(opened: Opened) -> None:
    await opened.break_history()
    failure = change_of(2, 4, 2, "failed: grow: no capacity", None, failed=True)
    await opened.history.keep(failure, time.monotonic())
    (notice,) = opened.announced
    assert (notice.activity_id, notice.failed, notice.size_kept) == (None, True, 2)


async def test_a_resize_that_must_be_kept_raises_and_is_not_announced(opened: Opened) -> None:
    await opened.break_history()
    change = change_of(1, 2, 2, "operator", None, failed=False)
    with pytest.raises(StorageError):
        await opened.history.keep(change, time.monotonic(), must_keep=True)
    assert opened.announced == []
