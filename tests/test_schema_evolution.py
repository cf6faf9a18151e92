"""Schema evolution: a table an older version created gains the columns added
since, on SQLite and a real MariaDB alike (``Database.create``, ``add_absent_columns``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from imagecache.database import Database, add_absent_columns
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import metadata_url_fixture  # noqa: F401

# A default with the characters a driver or SQLAlchemy could take for parameters.
LABEL_DEFAULT = "50% off: :now"


def old_things() -> Table:
    """The table as an older version created it."""
    return Table(
        "things",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", String(32), nullable=False),
    )


def new_things() -> Table:
    """The same table with the columns a newer version added."""
    return Table(
        "things",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", String(32), nullable=False),
        Column("note", Text, nullable=True),
        Column("score", Integer, nullable=False, server_default=text("7")),
        Column("label", String(32), nullable=False, server_default=LABEL_DEFAULT),
    )


@pytest.fixture
def sync_engine(metadata_url: str) -> Iterator[Engine]:
    """A second, synchronous client of the same database: another process's doing."""
    url = make_url(metadata_url)
    driver = "sqlite" if url.get_backend_name() == "sqlite" else "mysql+pymysql"
    engine = create_engine(url.set(drivername=driver))
    try:
        yield engine
    finally:
        engine.dispose()


async def create_old_table_with_rows(url: str) -> None:
    old = old_things()
    async with Database.open(url) as database:
        await database.create(old.metadata)
        async with database.write() as conn:
            await conn.execute(insert(old), [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}])


async def column_names(database: Database, table: str) -> list[str]:
    async with database.read() as conn:
        return await conn.run_sync(
            lambda sync_conn: [column["name"] for column in inspect(sync_conn).get_columns(table)]
        )


async def test_old_table_gains_the_new_columns_and_keeps_its_rows(metadata_url: str) -> None:
    await create_old_table_with_rows(metadata_url)
    new = new_things()
    async with Database.open(metadata_url) as database:
        await database.create(new.metadata)
        assert await column_names(database, "things") == ["id", "name", "note", "score", "label"]
        async with database.write() as conn:
            await conn.execute(insert(new), {"id": 3, "name": "three", "note": "n", "score": 9})
            assert await add_absent_columns(conn, new) == []  # nothing left to add
        async with database.read() as conn:
            rows = (await conn.execute(select(new).order_by(new.c.id))).all()
    assert [tuple(row) for row in rows] == [
        (1, "one", None, 7, LABEL_DEFAULT),
        (2, "two", None, 7, LABEL_DEFAULT),
        (3, "three", "n", 9, LABEL_DEFAULT),
    ]


async def test_add_absent_columns_names_what_it_added(metadata_url: str) -> None:
    await create_old_table_with_rows(metadata_url)
    async with Database.open(metadata_url) as database, database.write() as conn:
        assert await add_absent_columns(conn, new_things()) == ["note", "score", "label"]


async def test_a_column_that_cannot_be_added_is_refused_and_nothing_changes(
    metadata_url: str,
) -> None:
    await create_old_table_with_rows(metadata_url)
    impossible = new_things()
    impossible.append_column(Column("rank", Integer, nullable=False))  # no server default
    async with Database.open(metadata_url) as database:
        with pytest.raises(ValueError, match="cannot add column rank to the existing table things"):
            await database.create(impossible.metadata)
        assert await column_names(database, "things") == ["id", "name"]


async def test_processes_starting_at_once_all_bring_the_table_up(metadata_url: str) -> None:
    await create_old_table_with_rows(metadata_url)

    async def start() -> None:
        async with Database.open(metadata_url) as database:
            await database.create(new_things().metadata)

    await asyncio.gather(*(start() for _ in range(4)))
    async with Database.open(metadata_url) as database:
        assert await column_names(database, "things") == ["id", "name", "note", "score", "label"]


async def test_a_column_another_process_adds_meanwhile_is_no_error(
    metadata_url: str, sync_engine: Engine
) -> None:
    """Between our look at the table and our ALTER, another process adds the same column."""
    await create_old_table_with_rows(metadata_url)
    raced: list[str] = []

    def add_it_first(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("ALTER TABLE") and not raced:
            raced.append(statement)
            with sync_engine.begin() as other:
                other.execute(text("ALTER TABLE things ADD COLUMN note TEXT"))

    async with Database.open(metadata_url) as database:
        # Outside a write transaction: on SQLite, its lock would keep the other process out.
        async with database.read() as conn:
            event.listen(conn.sync_engine, "before_cursor_execute", add_it_first)
            assert await add_absent_columns(conn, new_things()) == ["note", "score", "label"]
        assert raced, "the race was not staged"
        assert await column_names(database, "things") == ["id", "name", "note", "score", "label"]


async def test_other_failures_of_alter_are_raised(metadata_url: str, sync_engine: Engine) -> None:
    """Only "the column exists" is tolerated: a table dropped meanwhile is a failure."""
    await create_old_table_with_rows(metadata_url)

    def drop_it_first(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("ALTER TABLE"):
            with sync_engine.begin() as other:
                other.execute(text("DROP TABLE IF EXISTS things"))

    async with Database.open(metadata_url) as database, database.read() as conn:
        event.listen(conn.sync_engine, "before_cursor_execute", drop_it_first)
        with pytest.raises(DBAPIError):
            await add_absent_columns(conn, new_things())
