"""The image catalog: image rows, the blob journal and the version counter.

Every upload committed gets the next version of one counter shared by every
key. On MySQL every transaction that changes images locks that counter's row
first, which serializes them without deadlocks (``imagecache.database`` has
the rest of how transactions run on each database).

Blob journal: ``begin_upload`` records a blob name as "uploading" before the
blob is written; ``commit_upload`` drops that entry in the transaction that
points the row at the blob and records the replaced blob as "garbage";
``blobs_to_delete`` lists what a clean-up may delete, and ``blob_deleted``
forgets a blob once it is gone. Whatever a crash interrupts, a restart finds
every blob that no row points at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from imagecache.database import (
    MYSQL_TABLE,
    Store,
    Timestamp,
    bump,
    counter,
    lock_counter,
    naive_utc,
    naive_utc_now,
)
from imagecache.errors import StorageError

UPLOADING = "uploading"
GARBAGE = "garbage"

_VERSION = "version"

_schema = MetaData()

images_table = Table(
    "images",
    _schema,
    Column("key", String(250), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("blob_name", String(128), nullable=False),
    Column("content_type", String(100), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("uploaded_at", Timestamp, nullable=False),
    **MYSQL_TABLE,
)

journal_table = Table(
    "blob_journal",
    _schema,
    Column("blob_name", String(128), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    **MYSQL_TABLE,
)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    key: str
    version: int
    blob_name: str
    content_type: str
    size: int
    width: int
    height: int
    uploaded_at: datetime  # timezone-aware UTC


class ImageCatalog(Store):
    """Image rows, the blob journal and the version counter, in the metadata database.

    Every public method raises StorageError as ``Database`` says.
    """

    schema = _schema
    counters = (_VERSION,)

    async def get_image(self, key: str) -> ImageRecord | None:
        """The row of ``key``, or None when there is none."""
        with self._db.failures(f"read the image {key!r}"):
            async with self._db.read() as conn:
                row = (
                    await conn.execute(select(images_table).where(images_table.c.key == key))
                ).first()
        return None if row is None else _image(row._mapping)

    async def list_images(self) -> list[ImageRecord]:
        """Every image row, ordered by key."""
        with self._db.failures("list the images"):
            async with self._db.read() as conn:
                rows = (await conn.execute(select(images_table).order_by(images_table.c.key))).all()
        return [_image(row._mapping) for row in rows]

    async def list_keys(self) -> list[str]:
        """Every key, in order."""
        with self._db.failures("list the keys"):
            async with self._db.read() as conn:
                result = await conn.execute(select(images_table.c.key).order_by(images_table.c.key))
                return list(result.scalars())

    async def current_version(self) -> int:
        """The highest version handed out so far (0 before the first upload)."""
        with self._db.failures("read the current version"):
            async with self._db.read() as conn:
                return await counter(conn, _VERSION)

    async def begin_upload(self, blob_name: str) -> None:
        """Journal ``blob_name`` as "uploading"; call it before writing the blob.

        Raises StorageError when that fails (also when the name is already
        journaled): then the blob must not be written.
        """
        with self._db.failures(f"journal the upload of blob {blob_name}"):
            async with self._db.write() as conn:
                await conn.execute(
                    insert(journal_table).values(
                        blob_name=blob_name, state=UPLOADING, created_at=naive_utc_now()
                    )
                )

    async def commit_upload(
        self, key: str, blob_name: str, content_type: str, size: int, width: int, height: int
    ) -> tuple[ImageRecord, str | None]:
        """Point ``key`` at the uploaded blob ``blob_name``, in one transaction.

        The row gets the next version of a counter shared by every key, so
        versions strictly increase in commit order; the blob's journal entry is
        dropped and the blob it replaces, if any, is journaled as garbage.
        Returns the new record and the replaced blob's name (None for a new key).
        Raises StorageError when it fails, or when ``blob_name`` is not journaled
        as uploading (never begun, abandoned, or collected as a stale upload):
        then nothing changed.
        """
        with self._db.failures(f"commit the upload of {key!r}"):
            async with self._db.write() as conn:
                version = await bump(conn, _VERSION)
                state = (
                    await conn.execute(
                        select(journal_table.c.state)
                        .where(journal_table.c.blob_name == blob_name)
                        .with_for_update()
                    )
                ).scalar_one_or_none()
                if state != UPLOADING:
                    raise StorageError(
                        f"blob {blob_name} of {key!r} is not being uploaded "
                        f"(journal says {state or 'nothing'}); upload it again"
                    )
                replaced = (
                    await conn.execute(
                        select(images_table.c.blob_name)
                        .where(images_table.c.key == key)
                        .with_for_update()
                    )
                ).scalar_one_or_none()
                record = ImageRecord(
                    key, version, blob_name, content_type, size, width, height, datetime.now(UTC)
                )
                values = _image_values(record)
                if replaced is None:
                    await conn.execute(insert(images_table).values(values))
                else:
                    await conn.execute(
                        update(images_table).where(images_table.c.key == key).values(values)
                    )
                await conn.execute(
                    delete(journal_table).where(journal_table.c.blob_name == blob_name)
                )
                if replaced == blob_name:
                    replaced = None  # committed twice: that blob is still in use
                if replaced is not None:
                    await _journal_garbage(conn, [replaced])
        return record, replaced

    async def abandon_upload(self, blob_name: str) -> None:
        """Mark an upload begun with ``begin_upload`` as garbage (it failed)."""
        with self._db.failures(f"abandon the upload of blob {blob_name}"):
            async with self._db.write() as conn:
                await conn.execute(
                    update(journal_table)
                    .where(journal_table.c.blob_name == blob_name)
                    .values(state=GARBAGE)
                )

    async def blob_deleted(self, blob_name: str) -> None:
        """Forget the journal entry of ``blob_name``, whose blob is gone."""
        with self._db.failures(f"forget blob {blob_name}"):
            async with self._db.write() as conn:
                await conn.execute(
                    delete(journal_table).where(journal_table.c.blob_name == blob_name)
                )

    async def blobs_to_delete(self, uploading_older_than: timedelta) -> list[str]:
        """Names of the blobs a clean-up should delete (then call ``blob_deleted``).

        These are the garbage entries, and the uploads begun longer ago than
        ``uploading_older_than`` (a crash or a lost commit). Those stale
        uploads become garbage here, so a late ``commit_upload`` of one fails
        instead of pointing a key at a blob being deleted.
        """
        with self._db.failures("list the blobs to delete"):
            async with self._db.write() as conn:
                stale = (journal_table.c.state == UPLOADING) & (
                    journal_table.c.created_at <= naive_utc_now() - uploading_older_than
                )
                await conn.execute(update(journal_table).where(stale).values(state=GARBAGE))
                result = await conn.execute(
                    select(journal_table.c.blob_name)
                    .where(journal_table.c.state == GARBAGE)
                    .order_by(journal_table.c.created_at, journal_table.c.blob_name)
                )
                return list(result.scalars())

    async def delete_all(self) -> list[str]:
        """Delete every image row and journal its blob as garbage, in one transaction.

        Returns the names of those blobs, in key order.
        """
        with self._db.failures("delete all images"):
            async with self._db.write() as conn:
                await lock_counter(conn, _VERSION)
                result = await conn.execute(
                    select(images_table.c.blob_name).order_by(images_table.c.key).with_for_update()
                )
                names = list(result.scalars())
                await _journal_garbage(conn, names)
                await conn.execute(delete(images_table))
        return names


def _image(row: RowMapping) -> ImageRecord:
    return ImageRecord(
        key=row["key"],
        version=int(row["version"]),
        blob_name=row["blob_name"],
        content_type=row["content_type"],
        size=int(row["size"]),
        width=int(row["width"]),
        height=int(row["height"]),
        uploaded_at=row["uploaded_at"].replace(tzinfo=UTC),
    )


def _image_values(record: ImageRecord) -> dict[str, Any]:
    return {
        "key": record.key,
        "version": record.version,
        "blob_name": record.blob_name,
        "content_type": record.content_type,
        "size": record.size,
        "width": record.width,
        "height": record.height,
        "uploaded_at": naive_utc(record.uploaded_at),
    }


async def _journal_garbage(conn: AsyncConnection, blob_names: Sequence[str]) -> None:
    if not blob_names:
        return
    now = naive_utc_now()
    await conn.execute(delete(journal_table).where(journal_table.c.blob_name.in_(blob_names)))
    await conn.execute(
        insert(journal_table),
        [{"blob_name": name, "state": GARBAGE, "created_at": now} for name in blob_names],
    )
