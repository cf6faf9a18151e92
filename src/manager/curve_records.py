"""The miss curve's closed windows, kept in the metadata database for what-if.

One row per window the manager closed (manager.curves): when it opened (UTC),
how long it lasted, the pool it simulated (capacity per node, policy), the
lookups behind it and the predicted miss rate of every size 1..8 (NULL where
no sampled lookup said anything). In the metadata database, as the settings
and the activity history are (manager.records), so every manager and
``imagecache whatif`` read the same windows, on SQLite and MySQL alike.

Rows older than ``RETENTION`` are deleted as new ones come in, at most once
every ``PRUNE_EVERY``: CloudWatch keeps its 1-minute statistics 15 days, and
a curve without the minute it belongs to is no use to what-if.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Double, MetaData, Row, String, delete, insert, select

from imagecache.database import (
    Database,
    Store,
    Timestamp,
    naive_utc,
    optional,
    required,
    table,
)
from manager.curves import CurveWindow
from manager.misscurve import POOL_SIZES

RETENTION = timedelta(days=15)
PRUNE_EVERY = timedelta(hours=1)

_schema = MetaData()

# No index on "started": a scan of 15 days of minutes (21,600 rows) is a few
# milliseconds, what-if is asked for rarely, and CREATE INDEX IF NOT EXISTS
# is not MySQL syntax. Double: MySQL's FLOAT is single precision, too coarse
# for a window's length to end exactly where the next one starts.
curve_windows_table = table(
    "curve_windows",
    _schema,
    *required(started=Timestamp, seconds=Double, capacity_mb=Double, policy=String(16)),
    *required(lookups=BigInteger, sampled_lookups=BigInteger),
    *optional(**{f"miss_{size}": Double for size in POOL_SIZES}),
    row_id=True,
)
# The columns of a window as it is, beside "started" and the predictions.
_FIGURES = ("seconds", "capacity_mb", "policy", "lookups", "sampled_lookups")


@dataclass(frozen=True, slots=True)
class RecordedWindow:
    """One closed window of the miss curve, as stored."""

    started: datetime  # aware UTC
    seconds: float
    capacity_mb: float  # per node, as simulated
    policy: str  # "lru" or "random"
    lookups: int  # every lookup the gateways counted in the window
    sampled_lookups: int
    predicted_miss: tuple[float | None, ...]  # for POOL_SIZES

    @classmethod
    def of(cls, window: CurveWindow) -> RecordedWindow:
        started, predicted = window.started.astimezone(UTC), tuple(window.predicted_miss)
        figures = {name: getattr(window, name) for name in _FIGURES}
        return cls(started=started, predicted_miss=predicted, **figures)


class CurveRecords(Store):
    """The closed windows of the miss curve, kept ``RETENTION``.

    Every public method raises StorageError as ``Database`` says.
    """

    schema = _schema

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self._pruned_at: datetime | None = None

    async def add(self, window: RecordedWindow) -> None:
        """Store ``window``; at most once every PRUNE_EVERY, also delete the
        windows that opened more than RETENTION before it."""
        if len(window.predicted_miss) != len(POOL_SIZES):
            raise ValueError(f"a window predicts {len(POOL_SIZES)} sizes, not {window}")
        started = naive_utc(window.started)
        prune = self._pruned_at is None or window.started - self._pruned_at >= PRUNE_EVERY
        row = {"started": started} | {name: getattr(window, name) for name in _FIGURES}
        row |= {
            f"miss_{size}": rate
            for size, rate in zip(POOL_SIZES, window.predicted_miss, strict=True)
        }
        table = curve_windows_table
        with self._db.failures("record the miss curve's window"):
            async with self._db.write() as conn:
                await conn.execute(insert(table), row)
                if prune:
                    await conn.execute(delete(table).where(table.c.started < started - RETENTION))
        if prune:
            self._pruned_at = window.started

    async def windows(self, start: datetime, end: datetime) -> list[RecordedWindow]:
        """The windows that opened in [start, end), oldest first."""
        table = curve_windows_table
        query = (
            select(table)
            .where(table.c.started >= naive_utc(start), table.c.started < naive_utc(end))
            .order_by(table.c.started, table.c.id)
        )
        with self._db.failures("read the miss curve's windows"):
            async with self._db.read() as conn:
                rows = (await conn.execute(query)).all()
        return [_window_of(row) for row in rows]


def _window_of(row: Row[Any]) -> RecordedWindow:
    return RecordedWindow(
        started=row.started.replace(tzinfo=UTC),
        seconds=float(row.seconds),
        capacity_mb=float(row.capacity_mb),
        policy=row.policy,
        lookups=int(row.lookups),
        sampled_lookups=int(row.sampled_lookups),
        predicted_miss=tuple(
            None if rate is None else float(rate)
            for rate in (row._mapping[f"miss_{size}"] for size in POOL_SIZES)
        ),
    )
