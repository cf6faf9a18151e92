"""The manager's records: its settings and the activity history of the pool's resizes.

Kept in the metadata database (``imagecache.database``), so every manager and
gateway process sees the same settings. Columns added to the activity table
since its first version are nullable: an older table gains them empty
(``Database.create``), and its rows read as "not recorded".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    MetaData,
    String,
    Text,
    case,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError

from imagecache.database import (
    Store,
    Timestamp,
    key,
    naive_utc_now,
    optional,
    record_of,
    required,
    table,
)

_SETTINGS_ATTEMPTS = 5

# What a resize's cause says about its kind (count_resizes): the autoscaler's
# causes begin with AUTOMATIC_CAUSE; a resize that failed is recorded with a
# cause beginning with FAILED_CAUSE (and the size it kept); any other is manual.
AUTOMATIC_CAUSE = "autoscaler:"
FAILED_CAUSE = "failed:"

_schema = MetaData()

activity_table = table(
    "activity",
    _schema,
    *required(at=Timestamp, size_before=Integer, size_after=Integer, cause=Text),
    # duration_seconds and lookups were added later (NULL in rows of older
    # versions): how long the resize took, and how many lookups the miss rate
    # that caused it was measured over.
    *optional(miss_rate=Float, duration_seconds=Float, lookups=BigInteger),
    row_id=True,
)

settings_table = table("settings", _schema, key("name", String(64)), *required(value=Text))


@dataclass(frozen=True, slots=True)
class Activity:
    """One resize of the pool: when it ended, from, to, why, how long it took
    (migration included), and the miss rate that caused it with the lookups it
    was measured over (automatic resizes only). None: not recorded (manual
    resizes have no miss rate; resizes of older versions, no duration)."""

    at: datetime  # timezone-aware UTC
    size_before: int
    size_after: int
    cause: str
    miss_rate: float | None
    duration_seconds: float | None = None
    lookups: int | None = None
    id: int | None = None  # the row's, which its announcements name (manager.announcements)


class ManagerRecords(Store):
    """The settings and the activity history, in the metadata database.

    Every public method raises StorageError as ``Database`` says.
    """

    schema = _schema

    async def get_settings(self) -> dict[str, str]:
        """Every stored setting, by name."""
        with self._db.failures("read the settings"):
            async with self._db.read() as conn:
                rows = (
                    await conn.execute(select(settings_table.c.name, settings_table.c.value))
                ).all()
        return {row.name: row.value for row in rows}

    async def put_settings(self, values: Mapping[str, str]) -> None:
        """Store ``values``, replacing settings of the same names, in one transaction."""
        if not values:
            return
        rows = [{"name": name, "value": value} for name, value in values.items()]
        with self._db.failures("store the settings"):
            for attempt in range(1, _SETTINGS_ATTEMPTS + 1):
                try:
                    async with self._db.write() as conn:
                        await conn.execute(
                            delete(settings_table).where(settings_table.c.name.in_(list(values)))
                        )
                        await conn.execute(insert(settings_table), rows)
                    return
                except IntegrityError:
                    # MySQL: a concurrent call inserted one of these names after our
                    # DELETE found none; now the row exists and the DELETE will lock it.
                    if attempt == _SETTINGS_ATTEMPTS:
                        raise

    async def add_activity(
        self,
        size_before: int,
        size_after: int,
        cause: str,
        miss_rate: float | None,
        duration_seconds: float | None = None,
        lookups: int | None = None,
    ) -> int:
        """Record one resize of the pool, ended now, in the activity history; its row's id."""
        row = {"at": naive_utc_now(), "size_before": size_before, "size_after": size_after}
        row |= {"cause": cause, "miss_rate": miss_rate}
        row |= {"duration_seconds": duration_seconds, "lookups": lookups}
        with self._db.failures("record the resize"):
            async with self._db.write() as conn:
                result = await conn.execute(insert(activity_table), row)
        key = result.inserted_primary_key
        assert key is not None  # an INSERT of one row
        return int(key[0])

    async def count_resizes(self) -> dict[str, int]:
        """How many resizes the history holds of each kind: manual, automatic, failed."""
        cause = activity_table.c.cause
        failed = cause.startswith(FAILED_CAUSE, autoescape=True)
        automatic = cause.startswith(AUTOMATIC_CAUSE, autoescape=True)
        # One row of sums, no GROUP BY: the same on SQLite and MySQL.
        query = select(
            func.count(),
            func.sum(case((failed, 1), else_=0)),
            func.sum(case((automatic, 1), else_=0)),
        ).select_from(activity_table)
        with self._db.failures("count the resizes"):
            async with self._db.read() as conn:
                total, failures, automatic_ones = (await conn.execute(query)).one()
        # SUM over no rows is NULL; MySQL's is a DECIMAL.
        failures, automatic_ones = int(failures or 0), int(automatic_ones or 0)
        return {
            "manual": int(total) - failures - automatic_ones,
            "automatic": automatic_ones,
            "failed": failures,
        }

    async def list_activity(self, limit: int = 100) -> list[Activity]:
        """The latest resizes, newest first."""
        query = select(activity_table).order_by(activity_table.c.id.desc()).limit(limit)
        with self._db.failures("read the activity history"):
            async with self._db.read() as conn:
                rows = (await conn.execute(query)).all()
        return [record_of(Activity, row, "at") for row in rows]
