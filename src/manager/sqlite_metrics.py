"""The metrics store of the embedded mode: pool samples in a SQL table.

One code path over SQLite (aiosqlite, the embedded default) and MySQL
(aiomysql) with SQLAlchemy Core, as the metadata store does: on SQLite, WAL
and a busy timeout, reads in autocommit and write transactions that begin
with ``BEGIN IMMEDIATE`` (they take the write lock first, waiting up to the
busy timeout, instead of failing when they upgrade a read lock); writers of
this process queue on an asyncio lock. Samples older than ``RETENTION`` are
deleted as new ones come in; minutes are grouped in Python with
``minute_of``, so both databases give the same figures. A table an older
version created gains the columns added since (``add_absent_columns``), its
old rows counting no reads of missing or uncacheable images.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy import BigInteger, Column, Integer, MetaData, delete, insert, select, text

from imagecache.database import Database, Timestamp, required, table
from manager.metrics import MetricsStore, MinuteStats, PoolSample, minute_of

RETENTION = timedelta(hours=2)
# Pruning is one DELETE of at most a minute's samples; once a minute is plenty.
PRUNE_EVERY = timedelta(minutes=1)
_MINUTE = timedelta(minutes=1)
# The figures of a sample, in PoolSample's order after "at".
_FIGURES = ("lookups", "hits", "misses", "requests", "items", "bytes", "missing", "uncacheable")
# Added after the others: a server default, so an older table can gain them.
_ADDED_FIGURES = ("missing", "uncacheable")

schema = MetaData()

# No index on "at": pruning keeps the table at two hours of 5-second samples
# (about 1,500 rows), which a scan reads in well under a millisecond, and
# CREATE INDEX IF NOT EXISTS is not MySQL syntax.
samples_table = table(
    "metric_samples",
    schema,
    *required(at=Timestamp, workers=Integer),
    *required(**dict.fromkeys(_FIGURES[: -len(_ADDED_FIGURES)], BigInteger)),
    *(
        Column(name, BigInteger, nullable=False, server_default=text("0"))
        for name in _ADDED_FIGURES
    ),
    row_id=True,
    mysql={"mysql_charset": "utf8mb4"},
)


class SqlMetrics(MetricsStore):
    """Pool samples in the table ``metric_samples``, kept for ``RETENTION``.

    Every method but ``close`` raises StorageError when the database fails or
    cannot be reached, and ValueError for a naive datetime.
    """

    def __init__(self, database: Database) -> None:
        """Use ``open``: it creates the table."""
        self._db = database
        self._pruned_at: datetime | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator[SqlMetrics]:
        """A store on the database at ``url``, its table created if absent.

        ``url`` is ``sqlite+aiosqlite:///path/to/file.db`` (the folder is
        created) or ``mysql+aiomysql://user:password@host:port/database``, as
        for the metadata store (it may be the same database). The connections
        are closed on exit. Raises ValueError for a URL of another kind,
        StorageError when the database cannot be used.
        """
        async with Database.open(url, "metrics") as database:
            # IF NOT EXISTS: the manager may start while another process creates it.
            await database.create(schema)
            yield cls(database)

    async def put(self, sample: PoolSample) -> None:
        """Record ``sample``; at most once a minute, also delete samples older than RETENTION."""
        at = _naive(sample.at)
        prune = self._pruned_at is None or sample.at - self._pruned_at >= PRUNE_EVERY
        row = {"at": at, "workers": sample.workers}
        row |= {name: getattr(sample, name) for name in _FIGURES}
        with self._db.failures("store a sample"):
            async with self._db.write() as conn:
                await conn.execute(insert(samples_table), row)
                if prune:
                    await conn.execute(
                        delete(samples_table).where(samples_table.c.at < at - RETENTION)
                    )
        if prune:
            self._pruned_at = sample.at

    async def minutes(self, start: datetime, end: datetime) -> list[MinuteStats]:
        """One entry per minute that starts in [start, end) and has samples, oldest first.

        Each entry sums all the samples of its whole minute (``minute_of``).
        """
        first, stop = _ceil_minute(_utc(start)), _ceil_minute(_utc(end))
        if first >= stop:
            return []
        t = samples_table.c
        # PoolSample's fields in order; t[name], as t.items is the collection's own method.
        query = (
            select(*(t[name] for name in ("at", "workers", *_FIGURES)))
            .where(t.at >= _naive(first), t.at < _naive(stop))
            .order_by(t.at, t.id)
        )
        with self._db.failures("read the samples"):
            async with self._db.read() as conn:
                rows = (await conn.execute(query)).all()
        samples = [
            PoolSample(at.replace(tzinfo=UTC), *(int(value) for value in figures))
            for at, *figures in rows
        ]
        result = []
        for minute, group in itertools.groupby(samples, key=lambda s: _floor_minute(s.at)):
            stats = minute_of(list(group), minute)
            if stats is not None:
                result.append(stats)
        return result

    async def close(self) -> None:
        """Close the database connections (again: nothing)."""
        await self._db.close()


def _utc(moment: datetime) -> datetime:
    """``moment`` in UTC; raises ValueError when it has no time zone."""
    if moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()} has no time zone")
    return moment.astimezone(UTC)


def _naive(moment: datetime) -> datetime:
    """``moment`` in UTC without its zone, as the column keeps it."""
    return _utc(moment).replace(tzinfo=None)


def _floor_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _ceil_minute(moment: datetime) -> datetime:
    floor = _floor_minute(moment)
    return floor if floor == moment else floor + _MINUTE
