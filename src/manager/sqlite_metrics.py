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
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
)
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    Table,
    delete,
    insert,
    select,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.schema import CreateTable

from imagecache.database import (
    WRITE,
    RowId,
    add_absent_columns,
    open_database,
    storage_failures,
)
from manager.metrics import MetricsStore, MinuteStats, PoolSample, minute_of

RETENTION = timedelta(hours=2)
# Pruning is one DELETE of at most a minute's samples; once a minute is plenty.
PRUNE_EVERY = timedelta(minutes=1)
_MINUTE = timedelta(minutes=1)
# An execution option of the engine that runs write transactions; the SQLite
# "begin" hook reads it.

# Naive UTC on both databases; MySQL's DATETIME keeps only whole seconds unless told.
_Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# SQLite numbers rows itself only for a column declared exactly INTEGER PRIMARY KEY.

schema = MetaData()

# No index on "at": pruning keeps the table at two hours of 5-second samples
# (about 1,500 rows), which a scan reads in well under a millisecond, and
# CREATE INDEX IF NOT EXISTS is not MySQL syntax.
samples_table = Table(
    "metric_samples",
    schema,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("at", _Timestamp, nullable=False),
    Column("workers", Integer, nullable=False),
    Column("lookups", BigInteger, nullable=False),
    Column("hits", BigInteger, nullable=False),
    Column("misses", BigInteger, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("items", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    # Added after the others: a server default, so an older table can gain them.
    Column("missing", BigInteger, nullable=False, server_default=text("0")),
    Column("uncacheable", BigInteger, nullable=False, server_default=text("0")),
    mysql_charset="utf8mb4",
)


class SqlMetrics(MetricsStore):
    """Pool samples in the table ``metric_samples``, kept for ``RETENTION``.

    Every method but ``close`` raises StorageError when the database fails or
    cannot be reached, and ValueError for a naive datetime.
    """

    def __init__(
        self, engine: AsyncEngine, write_gate: AbstractAsyncContextManager[Any], where: str
    ) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{WRITE: True})
        self._write_gate = write_gate
        self._where = where
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
        engine, write_gate, where = await open_database(url, "metrics")
        store = cls(engine, write_gate, where)
        try:
            with storage_failures("metrics store", where, "create or update the table"):
                async with store._write() as conn:
                    # IF NOT EXISTS: the manager may start while another process creates it.
                    await conn.execute(CreateTable(samples_table, if_not_exists=True))
                    await add_absent_columns(conn, samples_table)
            yield store
        finally:
            await store.close()

    async def put(self, sample: PoolSample) -> None:
        """Record ``sample``; at most once a minute, also delete samples older than RETENTION."""
        at = _naive(sample.at)
        prune = self._pruned_at is None or sample.at - self._pruned_at >= PRUNE_EVERY
        with storage_failures("metrics store", self._where, "store a sample"):
            async with self._write() as conn:
                await conn.execute(
                    insert(samples_table).values(
                        at=at,
                        workers=sample.workers,
                        lookups=sample.lookups,
                        hits=sample.hits,
                        misses=sample.misses,
                        requests=sample.requests,
                        items=sample.items,
                        bytes=sample.bytes,
                        missing=sample.missing,
                        uncacheable=sample.uncacheable,
                    )
                )
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
        # PoolSample's fields in order; t["items"], as t.items is the collection's own method.
        query = (
            select(
                t.at,
                t.workers,
                t.lookups,
                t.hits,
                t.misses,
                t.requests,
                t["items"],
                t.bytes,
                t.missing,
                t.uncacheable,
            )
            .where(t.at >= _naive(first), t.at < _naive(stop))
            .order_by(t.at, t.id)
        )
        with storage_failures("metrics store", self._where, "read the samples"):
            async with self._engine.connect() as conn:
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
        await self._engine.dispose()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self._write_gate, self._writer.begin() as conn:
            yield conn


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
