"""Point reads (the cache-miss path's row query) on SQLite and a real MariaDB."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import bindparam, func, select
from sqlalchemy.engine import make_url

from imagecache.catalog import ImageCatalog, StoredImage, images_table
from imagecache.database import Database
from imagecache.engines import create_engine
from imagecache.errors import StorageError
from imagecache.pointreads import (
    PointReader,
    PointStatement,
    SqlitePointReader,
    point_reader_for,
)
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import database_fixture, metadata_url_fixture, upload  # noqa: F401


@asynccontextmanager
async def reader_for(url: str) -> AsyncIterator[PointReader]:
    """A point reader of the database at ``url``, on an engine of its own."""
    engine, _ = await create_engine(make_url(url))
    reader = await point_reader_for(engine, "under test")
    try:
        yield reader
    finally:
        await reader.close()
        await engine.dispose()


VERSION_OF_KEY = select(images_table.c.version, images_table.c.blob_name).where(
    images_table.c.key == bindparam("key")
)


@pytest.fixture
async def catalog(database: Database) -> ImageCatalog:
    return await ImageCatalog.open(database)


@pytest.fixture
async def reader(
    metadata_url: str, database: Database, catalog: ImageCatalog
) -> AsyncIterator[PointReader]:
    async with reader_for(metadata_url) as opened:
        yield opened


def statement_for(database: Database) -> PointStatement:
    return PointStatement(VERSION_OF_KEY, database.dialect)


async def test_a_point_read_sees_every_commit_before_it(
    metadata_url: str, database: Database, catalog: ImageCatalog, reader: PointReader
) -> None:
    statement = statement_for(database)
    assert await reader.first(statement, {"key": "cat"}) is None

    for _ in range(3):
        record, _ = await upload(catalog, "cat")
        # The reader's connection outlives each commit: what it reads must not
        # be a snapshot from before one (MySQL's default would be).
        assert tuple(await reader.first(statement, {"key": "cat"}) or ()) == (
            record.version,
            record.blob_name,
        )


async def test_keys_are_matched_exactly(
    metadata_url: str, database: Database, catalog: ImageCatalog, reader: PointReader
) -> None:
    record, _ = await upload(catalog, "Cat")
    statement = statement_for(database)

    assert await reader.first(statement, {"key": "cat"}) is None
    assert tuple(await reader.first(statement, {"key": "Cat"}) or ()) == (
        record.version,
        record.blob_name,
    )


async def test_a_mysql_connection_the_server_closed_is_replaced(
    mariadb_database_url: str,  # noqa: F811
) -> None:
    async with Database.open(mariadb_database_url) as database:
        catalog = await ImageCatalog.open(database)
        record, _ = await upload(catalog, "cat")
        async with reader_for(mariadb_database_url) as reader:
            connection_id = PointStatement(select(func.connection_id()), database.dialect)
            first = await reader.first(connection_id, {})
            assert first is not None
            async with database.write() as conn:
                await conn.exec_driver_sql(f"KILL CONNECTION {int(first[0])}")

            statement = PointStatement(VERSION_OF_KEY, database.dialect)
            row = await reader.first(statement, {"key": "cat"})
            assert tuple(row or ()) == (record.version, record.blob_name)


async def test_an_unreadable_sqlite_file_is_a_storage_error(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'metadata.db'}"
    async with Database.open(url) as database:
        await ImageCatalog.open(database)
        statement = PointStatement(VERSION_OF_KEY, database.dialect)
    (tmp_path / "metadata.db").write_bytes(b"not a database, " * 100)

    reader = SqlitePointReader(str(tmp_path / "metadata.db"), "under test")
    try:
        with pytest.raises(StorageError, match="metadata store under test could not read"):
            await reader.first(statement, {"key": "cat"})
    finally:
        await reader.close()


async def test_the_catalog_finds_an_image_with_a_point_read_that_sees_every_commit(
    catalog: ImageCatalog,
) -> None:
    assert await catalog.stored_image("cat") is None
    for _ in range(3):
        record, _ = await upload(catalog, "cat")
        assert await catalog.stored_image("cat") == StoredImage(
            record.version, record.blob_name, record.content_type
        )


async def test_an_in_memory_sqlite_database_is_read_through_its_engine() -> None:
    """Another connection to ``:memory:`` would open another, empty, database."""
    async with Database.open("sqlite+aiosqlite://") as database:
        catalog = await ImageCatalog.open(database)
        record, _ = await upload(catalog, "cat")
        assert await catalog.stored_image("cat") == StoredImage(
            record.version, record.blob_name, record.content_type
        )


async def test_point_reads_after_close_fail_and_open_nothing(tmp_path: Path) -> None:
    async with Database.open(f"sqlite+aiosqlite:///{tmp_path / 'metadata.db'}") as database:
        catalog = await ImageCatalog.open(database)
        assert await catalog.stored_image("cat") is None  # the reader opens
    # A load still running as the gateway shuts down:
    with pytest.raises(StorageError, match="is closed"):
        await catalog.stored_image("cat")
    assert not [t for t in threading.enumerate() if t.name.startswith("point-reads")]
