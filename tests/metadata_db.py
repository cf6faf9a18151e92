"""The metadata database for the store tests, SQLite and a real MariaDB alike.

Use it from a test module with::

    from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
    from tests.metadata_db import database_fixture, metadata_url_fixture  # noqa: F401

The fixture ``metadata_url`` runs each test on both databases; ``database``
is that database, opened.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imagecache.catalog import ImageCatalog, ImageRecord
from imagecache.database import Database


@pytest.fixture(name="metadata_url", params=["sqlite", "mysql"])
def metadata_url_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        # A folder that does not exist yet: Database.open creates it.
        return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'metadata.db'}"
    url: str = request.getfixturevalue("mariadb_database_url")
    return url


@pytest.fixture(name="database")
async def database_fixture(metadata_url: str) -> AsyncIterator[Database]:
    async with Database.open(metadata_url) as opened:
        yield opened


def new_blob() -> str:
    return uuid.uuid4().hex


async def upload(
    catalog: ImageCatalog, key: str, blob_name: str | None = None, size: int = 10
) -> tuple[ImageRecord, str | None]:
    """What the gateway does around writing a blob: journal it, then commit it."""
    blob_name = blob_name or new_blob()
    await catalog.begin_upload(blob_name)
    committed = await catalog.commit_upload(key, blob_name, "image/png", size, 4, 3)
    return committed.record, committed.replaced_blob
