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

Invalidation outbox: ``commit_upload`` and ``delete_all`` also write the
invalidation their change needs into ``invalidations``, in the same
transaction, so a committed change always finds its way to the cache nodes
(``imagecache.invalidation`` delivers them and calls ``invalidation_delivered``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    MetaData,
    String,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ColumnElement

from imagecache.database import (
    Store,
    Timestamp,
    bump,
    counter,
    key,
    naive_utc,
    naive_utc_now,
    required,
    table,
)
from imagecache.errors import StorageError

UPLOADING = "uploading"
GARBAGE = "garbage"
# The key of an invalidation of every key (delete all): no image has the empty key.
EVERY_KEY = ""

_VERSION = "version"

_schema = MetaData()

images_table = table(
    "images",
    _schema,
    key("key", String(250)),
    *required(version=BigInteger, blob_name=String(128), content_type=String(100)),
    *required(size=BigInteger, width=Integer, height=Integer, uploaded_at=Timestamp),
)

journal_table = table(
    "blob_journal",
    _schema,
    key("blob_name", String(128)),
    *required(state=String(16), created_at=Timestamp),
)

# The key EVERY_KEY: every key.
outbox_table = table(
    "invalidations", _schema, *required(key=String(250), version=BigInteger), row_id=True
)


@dataclass(frozen=True, slots=True)
class Invalidation:
    """Remove every item of ``key`` older than ``version`` from every cache node
    (every item, for EVERY_KEY). ``id`` 0: not in the outbox."""

    id: int
    key: str
    version: int


_STORED_IMAGE = select(
    images_table.c.version, images_table.c.blob_name, images_table.c.content_type
).where(images_table.c.key == bindparam("key"))


@dataclass(frozen=True, slots=True)
class StoredImage:
    """What a load needs of a key's row: which blob holds it, at which version."""

    version: int
    blob_name: str
    content_type: str


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

    async def stored_image(self, key: str) -> StoredImage | None:
        """Where the image of ``key`` is, or None: the cache-miss path's read,
        a point read (``Database.read_point``) that costs what the database does."""
        row = await self._db.read_point(_STORED_IMAGE, {"key": key})
        return None if row is None else StoredImage(*row)

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
    ) -> UploadCommit:
        """Point ``key`` at the uploaded blob ``blob_name``, in one transaction.

        The row gets the next version of a counter shared by every key, so
        versions strictly increase in commit order; the blob's journal entry is
        dropped, the blob it replaces, if any, is journaled as garbage, and the
        invalidation of older versions of ``key`` goes into the outbox.
        Raises StorageError when it fails, or when ``blob_name`` is not journaled
        as uploading (never begun, abandoned, or collected as a stale upload):
        then nothing changed.
        """
        with self._db.failures(f"commit the upload of {key!r}"):
            async with self._db.write() as conn:
                version = await bump(conn, _VERSION)
                journal = journal_table.c
                state = await _locked(conn, journal.state, journal.blob_name == blob_name)
                if state != UPLOADING:
                    raise StorageError(
                        f"blob {blob_name} of {key!r} is not being uploaded "
                        f"(journal says {state or 'nothing'}); upload it again"
                    )
                images = images_table.c
                replaced = await _locked(conn, images.blob_name, images.key == key)
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
                invalidation = await _outbox(conn, key, version)
        return UploadCommit(record, replaced, invalidation)

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

    async def delete_all(self) -> tuple[list[str], Invalidation]:
        """Delete every image row and journal its blob as garbage, in one transaction.

        Returns the names of those blobs, in key order, and the invalidation
        of every key it put in the outbox: below a fresh version, which no
        image has, so every item cached so far goes.
        """
        with self._db.failures("delete all images"):
            async with self._db.write() as conn:
                floor = await bump(conn, _VERSION)
                result = await conn.execute(
                    select(images_table.c.blob_name).order_by(images_table.c.key).with_for_update()
                )
                names = list(result.scalars())
                await _journal_garbage(conn, names)
                await conn.execute(delete(images_table))
                invalidation = await _outbox(conn, EVERY_KEY, floor)
        return names, invalidation

    async def versions(self, keys: Sequence[str]) -> dict[str, int]:
        """The current version of each of ``keys`` that has an image."""
        if not keys:
            return {}
        query = select(images_table.c.key, images_table.c.version).where(
            images_table.c.key.in_(list(keys))
        )
        with self._db.failures("read the versions of keys"):
            async with self._db.read() as conn:
                rows = (await conn.execute(query)).all()
        return {row.key: int(row.version) for row in rows}

    # -- the invalidation outbox ----------------------------------------------

    async def pending_invalidations(self, limit: int) -> list[Invalidation]:
        """Up to ``limit`` invalidations not yet delivered to every node, oldest first."""
        query = select(outbox_table).order_by(outbox_table.c.id).limit(limit)
        with self._db.failures("read the invalidation outbox"):
            async with self._db.read() as conn:
                rows = (await conn.execute(query)).all()
        return [Invalidation(int(row.id), row.key, int(row.version)) for row in rows]

    async def newest_invalidation_id(self) -> int:
        """The id of the newest pending invalidation (0 when there is none)."""
        query = select(func.max(outbox_table.c.id))
        with self._db.failures("read the invalidation outbox"):
            async with self._db.read() as conn:
                return int((await conn.execute(query)).scalar_one_or_none() or 0)

    async def invalidation_delivered(self, invalidation_id: int) -> None:
        """Every node has taken the invalidation ``invalidation_id``: it leaves the outbox."""
        with self._db.failures("update the invalidation outbox"):
            async with self._db.write() as conn:
                await conn.execute(delete(outbox_table).where(outbox_table.c.id == invalidation_id))

    def nothing_pending_after(
        self, invalidation_id: int
    ) -> Callable[[AsyncConnection], Awaitable[bool]]:
        """A check, for another store's transaction, that the outbox holds no
        invalidation newer than ``invalidation_id``."""

        async def check(conn: AsyncConnection) -> bool:
            newer = select(outbox_table.c.id).where(outbox_table.c.id > invalidation_id).limit(1)
            return (await conn.execute(newer)).first() is None

        return check


@dataclass(frozen=True, slots=True)
class UploadCommit:
    record: ImageRecord
    replaced_blob: str | None  # None for a new key
    invalidation: Invalidation


async def _outbox(conn: AsyncConnection, key: str, version: int) -> Invalidation:
    result = await conn.execute(insert(outbox_table).values(key=key, version=version))
    primary_key = result.inserted_primary_key
    assert primary_key is not None  # an INSERT of one row
    return Invalidation(int(primary_key[0]), key, version)


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


async def _locked(conn: AsyncConnection, column: Any, where: ColumnElement[bool]) -> Any:
    """``column`` of the row ``where`` selects, locked until the transaction ends; None: no row."""
    return (await conn.execute(select(column).where(where).with_for_update())).scalar_one_or_none()
