"""The metadata database as processes use it: every store on one database, opened
once per process, by several processes at once; SQLite and a real MariaDB alike.

Each store's own contract is in ``test_metadata_<store>.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from imagecache.catalog import ImageCatalog, ImageRecord
from imagecache.database import Database
from imagecache.errors import StorageError
from imagecache.poolmembers import MembershipStore, NodeRecord
from manager.records import ManagerRecords
from tests.mariadb import free_port, mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import metadata_url_fixture, upload  # noqa: F401

HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Stores:
    """What a manager opens on its database (a gateway: the first two)."""

    catalog: ImageCatalog
    members: MembershipStore
    records: ManagerRecords


@asynccontextmanager
async def process(url: str) -> AsyncIterator[Stores]:
    """The stores of one process, on the one database it opens."""
    async with Database.open(url) as database:
        yield Stores(
            await ImageCatalog.open(database),
            await MembershipStore.open(database),
            await ManagerRecords.open(database),
        )


async def test_reopening_keeps_everything(metadata_url: str) -> None:
    async with process(metadata_url) as stores:
        record, _ = await upload(stores.catalog, "cat")
        await stores.members.set_membership([NodeRecord("n", "127.0.0.1:1", "active")])
        await stores.records.put_settings({"mode": "auto"})
    async with process(metadata_url) as stores:
        assert await stores.catalog.get_image("cat") == record
        assert (await stores.members.get_membership()).epoch == 1
        assert await stores.records.get_settings() == {"mode": "auto"}
        assert (await upload(stores.catalog, "dog"))[0].version > record.version


async def test_stores_opened_at_once_share_one_schema(metadata_url: str) -> None:
    """A gateway and a manager starting together both create the schema if absent."""

    async def open_and_upload(key: str) -> int:
        async with process(metadata_url) as stores:
            return (await upload(stores.catalog, key))[0].version

    versions = await asyncio.gather(*(open_and_upload(f"key-{i}") for i in range(4)))
    assert sorted(versions) == [1, 2, 3, 4]


async def test_unreachable_mysql_is_a_storage_error() -> None:
    url = f"mysql+aiomysql://nobody:secret@127.0.0.1:{free_port()}/imagecache"
    with pytest.raises(StorageError, match="could not") as caught:
        async with process(url) as stores:
            await stores.catalog.list_keys()
    assert "secret" not in str(caught.value)


async def test_unusable_sqlite_path_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError):
        async with Database.open(f"sqlite+aiosqlite:///{tmp_path / 'file' / 'm.db'}"):
            pass


async def test_other_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="sqlite"):
        async with Database.open("postgresql+asyncpg://u@localhost/db"):
            pass


async def test_sqlite_two_processes_on_one_file_commit_concurrently(tmp_path: Path) -> None:
    """Like the gateway and the manager, two engines write the same file at once."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    async with process(url) as first, process(url) as second:

        async def uploads(stores: Stores, name: str) -> list[ImageRecord]:
            results = await asyncio.gather(
                *(upload(stores.catalog, key) for key in [f"{name}-{i % 5}" for i in range(20)]),
                *(stores.members.set_membership([]) for _ in range(3)),
                *(stores.records.put_settings({name: "x"}) for _ in range(3)),
            )
            return [result[0] for result in results if isinstance(result, tuple)]

        mine, theirs = await asyncio.gather(uploads(first, "first"), uploads(second, "second"))
        versions = [record.version for record in mine + theirs]
        assert len(versions) == 40
        assert len(set(versions)) == 40
        assert sorted(await first.catalog.list_keys()) == sorted(
            {f"{name}-{i}" for name in ("first", "second") for i in range(5)}
        )
        assert (await second.members.get_membership()).epoch == 6
        assert len(await first.catalog.blobs_to_delete(HOUR)) == 30  # each key replaced 3 times
