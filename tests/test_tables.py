"""How the stores declare their tables (imagecache.database: table, key, required,
optional, record_of), on SQLite and a real MariaDB alike: what the database then
enforces, and how a row comes back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from sqlalchemy import Integer, MetaData, String, insert, select
from sqlalchemy.exc import IntegrityError

from imagecache.database import (
    Database,
    Store,
    Timestamp,
    key,
    optional,
    record_of,
    required,
    table,
)
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import database_fixture, metadata_url_fixture  # noqa: F401

_schema = MetaData()
numbered = table(
    "test_numbered",
    _schema,
    *required(name=String(16), at=Timestamp),
    *optional(tries=Integer, seen_at=Timestamp),
    row_id=True,
)
keyed = table("test_keyed", _schema, key("name", String(16)), *required(value=Integer))


class _Tables(Store):
    schema = _schema


@dataclass(frozen=True, slots=True)
class Numbered:
    id: int
    name: str
    at: datetime
    seen_at: datetime | None  # "tries" has no field: left out


async def test_required_columns_refuse_null_and_optional_ones_take_it(database: Database) -> None:
    await _Tables.open(database)
    now = datetime(2024, 5, 1, 12, 0, 30, 250_000)
    async with database.write() as conn:
        await conn.execute(insert(numbered), {"name": "a", "at": now})
    for row in ({"name": None, "at": now}, {"name": "b", "at": None}):
        with pytest.raises(IntegrityError):
            async with database.write() as conn:
                await conn.execute(insert(numbered), row)
    async with database.read() as conn:
        rows = (await conn.execute(select(numbered))).all()
    assert [(row.name, row.tries, row.seen_at) for row in rows] == [("a", None, None)]


async def test_row_ids_number_the_rows_and_keys_are_unique(database: Database) -> None:
    await _Tables.open(database)
    now = datetime(2024, 5, 1, 12, 0)
    async with database.write() as conn:
        ids = [
            (await conn.execute(insert(numbered), {"name": name, "at": now})).inserted_primary_key
            for name in ("a", "b", "c")
        ]
        await conn.execute(insert(keyed), [{"name": "k", "value": 1}])
    assert [int(key_[0]) for key_ in ids if key_ is not None] == [1, 2, 3]
    with pytest.raises(IntegrityError):
        async with database.write() as conn:
            await conn.execute(insert(keyed), [{"name": "k", "value": 2}])


async def test_keys_compare_byte_for_byte(database: Database) -> None:
    """On MySQL too (utf8mb4_bin): keys differing in case or accents are distinct."""
    await _Tables.open(database)
    names = ["cat", "Cat", "CAT", "café", "cafe"]
    async with database.write() as conn:
        await conn.execute(insert(keyed), [{"name": n, "value": i} for i, n in enumerate(names)])
    async with database.read() as conn:
        found = (await conn.execute(select(keyed.c.value).where(keyed.c.name == "Cat"))).all()
        ordered = (await conn.execute(select(keyed.c.name).order_by(keyed.c.name))).scalars()
        assert [value for (value,) in found] == [1]
        assert list(ordered) == sorted(names, key=lambda n: n.encode())


async def test_record_of_maps_a_row_with_its_timestamps_in_utc(database: Database) -> None:
    await _Tables.open(database)
    at = datetime(2024, 5, 1, 12, 0, 30, 250_000)
    async with database.write() as conn:
        await conn.execute(insert(numbered), {"name": "a", "at": at, "tries": 3})
        await conn.execute(insert(numbered), {"name": "b", "at": at, "seen_at": at})
    async with database.read() as conn:
        rows = (await conn.execute(select(numbered).order_by(numbered.c.id))).all()
    records = [record_of(Numbered, row, "at", "seen_at") for row in rows]
    aware = at.replace(tzinfo=UTC)
    assert records == [Numbered(1, "a", aware, None), Numbered(2, "b", aware, aware)]
