"""The deliveries of the resizes' announcements, in the metadata database.

One row per announcement and channel (``sns``, ``webhook``): the resize it
announces (the activity row's id), the document sent, and how its delivery
went: pending (with the tries so far and the last error), delivered (when,
after how many tries) or failed (after how many tries, the last error).
``manager.notify`` writes them as it delivers; the Activity page reads them.
The document is kept so that a delivery a stopped manager left pending is
taken up again by the next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, MetaData, Select, String, Text, insert, select, update

from imagecache.database import (
    RowId,
    Store,
    Timestamp,
    naive_utc_now,
    optional,
    record_of,
    required,
    table,
)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"

_schema = MetaData()

announcements_table = table(
    "announcements",
    _schema,
    # The activity row of the resize; NULL when the resize could not be recorded.
    # No index: Database.create makes none, and there are a row or two per resize.
    *optional(activity_id=RowId),
    # The document is the JSON sent.
    *required(channel=String(16), document=Text, state=String(16), tries=Integer),
    *optional(last_error=Text),
    *required(created_at=Timestamp),
    *optional(delivered_at=Timestamp),
    row_id=True,
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """How one announcement went on one channel."""

    id: int
    activity_id: int | None
    channel: str
    document: str
    state: str  # PENDING, DELIVERED or FAILED
    tries: int
    last_error: str | None
    delivered_at: datetime | None  # timezone-aware UTC


class Announcements(Store):
    """The deliveries of announcements. Every method raises StorageError as ``Database`` says."""

    schema = _schema

    async def add(
        self, activity_id: int | None, channels: Sequence[str], document: str
    ) -> list[int]:
        """A pending delivery of ``document`` on each of ``channels``; their ids, in that order."""
        ids = []
        with self._db.failures("record an announcement"):
            async with self._db.write() as conn:
                for channel in channels:
                    result = await conn.execute(
                        insert(announcements_table),
                        {
                            "activity_id": activity_id,
                            "channel": channel,
                            "document": document,
                            "state": PENDING,
                            "tries": 0,
                            "created_at": naive_utc_now(),
                        },
                    )
                    key = result.inserted_primary_key
                    assert key is not None  # an INSERT of one row
                    ids.append(int(key[0]))
        return ids

    async def tried(self, delivery_id: int, tries: int, error: str) -> None:
        """A try failed; the delivery stays pending."""
        await self._set(delivery_id, tries=tries, last_error=error)

    async def delivered(self, delivery_id: int, tries: int) -> None:
        await self._set(delivery_id, state=DELIVERED, tries=tries, delivered_at=naive_utc_now())

    async def failed(self, delivery_id: int, tries: int, error: str) -> None:
        """Given up: no more tries."""
        await self._set(delivery_id, state=FAILED, tries=tries, last_error=error)

    async def _set(self, delivery_id: int, **values: object) -> None:
        statement = (
            update(announcements_table)
            .where(announcements_table.c.id == delivery_id)
            .values(**values)
        )
        with self._db.failures("record an announcement's delivery"):
            async with self._db.write() as conn:
                await conn.execute(statement)

    async def pending(self) -> list[Delivery]:
        """The deliveries not yet delivered nor given up, oldest first."""
        query = (
            select(announcements_table)
            .where(announcements_table.c.state == PENDING)
            .order_by(announcements_table.c.id)
        )
        return await self._read(query, "read the pending announcements")

    async def of_resizes(self, activity_ids: Sequence[int]) -> dict[int, list[Delivery]]:
        """The deliveries of the resizes ``activity_ids``, by resize, in channel order."""
        if not activity_ids:
            return {}
        query = (
            select(announcements_table)
            .where(announcements_table.c.activity_id.in_(list(activity_ids)))
            .order_by(announcements_table.c.channel, announcements_table.c.id)
        )
        found: dict[int, list[Delivery]] = {}
        for delivery in await self._read(query, "read the announcements"):
            assert delivery.activity_id is not None
            found.setdefault(delivery.activity_id, []).append(delivery)
        return found

    async def _read(self, query: Select[Any], action: str) -> list[Delivery]:
        with self._db.failures(action):
            async with self._db.read() as conn:
                rows = (await conn.execute(query)).all()
        return [record_of(Delivery, row, "delivered_at") for row in rows]
