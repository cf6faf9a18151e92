"""The metadata store: image rows, the blob journal, pool membership and settings.

One code path over SQLite (the embedded default, aiosqlite) and MySQL/RDS
(aiomysql) with SQLAlchemy Core. What differs between the two databases lives
in ``imagecache.database`` (and in the column types of the schema):

- SQLite: the driver's own transaction handling is switched off and a write
  transaction starts with ``BEGIN IMMEDIATE``, so it takes the write lock
  first, waiting up to the busy timeout, instead of failing with "database is
  locked" when it upgrades a read lock; reads run in autocommit. WAL lets
  readers go on beside the writer (of this process or another one). Within
  one process, writers also queue on an asyncio lock.
- MySQL: READ COMMITTED, so the locking reads take no gap locks, and every
  transaction that changes images locks the "version" counter row first,
  which serializes those transactions without deadlocks.

Blob journal: ``begin_upload`` records a blob name as "uploading" before the
blob is written; ``commit_upload`` drops that entry in the transaction that
points the row at the blob and records the replaced blob as "garbage";
``blobs_to_delete`` lists what a clean-up may delete, and ``blob_deleted``
forgets a blob once it is gone. Whatever a crash interrupts, a restart finds
every blob that no row points at.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
)
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.schema import CreateTable

from imagecache.database import WRITE, open_database, storage_failures
from imagecache.errors import StorageError

UPLOADING = "uploading"
GARBAGE = "garbage"
NODE_STATES = frozenset({"active", "joining", "leaving"})

_VERSION = "version"
_EPOCH = "membership_epoch"
# An execution option of the engine that runs write transactions; the SQLite
# "begin" hook reads it.
_SETTINGS_ATTEMPTS = 5

# Naive UTC on both databases; MySQL's DATETIME keeps only whole seconds unless told.
_Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# Keys compare byte for byte (case-sensitive) and sort alike on both databases.
_MYSQL_TABLE: dict[str, Any] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}

schema = MetaData()

images_table = Table(
    "images",
    schema,
    Column("key", String(250), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("blob_name", String(128), nullable=False),
    Column("content_type", String(100), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("uploaded_at", _Timestamp, nullable=False),
    **_MYSQL_TABLE,
)

journal_table = Table(
    "blob_journal",
    schema,
    Column("blob_name", String(128), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("created_at", _Timestamp, nullable=False),
    **_MYSQL_TABLE,
)

counters_table = Table(
    "counters",
    schema,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
    **_MYSQL_TABLE,
)

nodes_table = Table(
    "nodes",
    schema,
    Column("node_id", String(64), primary_key=True),
    Column("address", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("position", Integer, nullable=False),
    **_MYSQL_TABLE,
)

activity_table = Table(
    "activity",
    schema,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("at", _Timestamp, nullable=False),
    Column("size_before", Integer, nullable=False),
    Column("size_after", Integer, nullable=False),
    Column("cause", Text, nullable=False),
    Column("miss_rate", Float, nullable=True),
    **_MYSQL_TABLE,
)

settings_table = Table(
    "settings",
    schema,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    **_MYSQL_TABLE,
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


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    address: str  # "host:port"
    state: str  # "active" | "joining" | "leaving"


@dataclass(frozen=True, slots=True)
class Activity:
    """One resize of the pool: when, from, to, why (and the miss rate that caused it)."""

    at: datetime  # timezone-aware UTC
    size_before: int
    size_after: int
    cause: str
    miss_rate: float | None


@dataclass(frozen=True, slots=True)
class Membership:
    epoch: int
    nodes: tuple[NodeRecord, ...]


class MetadataStore:
    """Image rows, the blob journal, pool membership and settings in one database.

    Every public method raises StorageError when the database fails or cannot
    be reached; then a write changed nothing (or, if only the reply was lost,
    may have been committed).
    """

    def __init__(
        self, engine: AsyncEngine, write_gate: AbstractAsyncContextManager[Any], where: str
    ) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{WRITE: True})
        self._write_gate = write_gate
        self._where = where

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator[MetadataStore]:
        """A store on the database at ``url``, its schema created if absent.

        ``url`` is ``sqlite+aiosqlite:///path/to/file.db`` (the folder is
        created) or ``mysql+aiomysql://user:password@host:port/database``.
        The connections are closed on exit. Raises ValueError for a URL of
        another kind, StorageError when the database cannot be used.
        """
        engine, write_gate, where = await open_database(url, "metadata")
        try:
            store = cls(engine, write_gate, where)
            await store._create_schema()
            yield store
        finally:
            await engine.dispose()

    async def get_image(self, key: str) -> ImageRecord | None:
        """The row of ``key``, or None when there is none."""
        with self._failures(f"read the image {key!r}"):
            async with self._engine.connect() as conn:
                row = (
                    await conn.execute(select(images_table).where(images_table.c.key == key))
                ).first()
        return None if row is None else _image(row._mapping)

    async def list_images(self) -> list[ImageRecord]:
        """Every image row, ordered by key."""
        with self._failures("list the images"):
            async with self._engine.connect() as conn:
                rows = (await conn.execute(select(images_table).order_by(images_table.c.key))).all()
        return [_image(row._mapping) for row in rows]

    async def list_keys(self) -> list[str]:
        """Every key, in order."""
        with self._failures("list the keys"):
            async with self._engine.connect() as conn:
                result = await conn.execute(select(images_table.c.key).order_by(images_table.c.key))
                return list(result.scalars())

    async def current_version(self) -> int:
        """The highest version handed out so far (0 before the first upload)."""
        with self._failures("read the current version"):
            async with self._engine.connect() as conn:
                return await _counter(conn, _VERSION)

    async def begin_upload(self, blob_name: str) -> None:
        """Journal ``blob_name`` as "uploading"; call it before writing the blob.

        Raises StorageError when that fails (also when the name is already
        journaled): then the blob must not be written.
        """
        with self._failures(f"journal the upload of blob {blob_name}"):
            async with self._write() as conn:
                await conn.execute(
                    insert(journal_table).values(
                        blob_name=blob_name, state=UPLOADING, created_at=_now()
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
        with self._failures(f"commit the upload of {key!r}"):
            async with self._write() as conn:
                version = await _bump(conn, _VERSION)
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
        with self._failures(f"abandon the upload of blob {blob_name}"):
            async with self._write() as conn:
                await conn.execute(
                    update(journal_table)
                    .where(journal_table.c.blob_name == blob_name)
                    .values(state=GARBAGE)
                )

    async def blob_deleted(self, blob_name: str) -> None:
        """Forget the journal entry of ``blob_name``, whose blob is gone."""
        with self._failures(f"forget blob {blob_name}"):
            async with self._write() as conn:
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
        with self._failures("list the blobs to delete"):
            async with self._write() as conn:
                stale = (journal_table.c.state == UPLOADING) & (
                    journal_table.c.created_at <= _now() - uploading_older_than
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
        with self._failures("delete all images"):
            async with self._write() as conn:
                await _lock_counter(conn, _VERSION)
                result = await conn.execute(
                    select(images_table.c.blob_name).order_by(images_table.c.key).with_for_update()
                )
                names = list(result.scalars())
                await _journal_garbage(conn, names)
                await conn.execute(delete(images_table))
        return names

    async def get_membership(self) -> Membership:
        """The cache pool's nodes in order and their epoch (0 and no nodes if never set)."""
        # One statement, so the epoch and the nodes always come from the same commit.
        query = (
            select(
                counters_table.c.value,
                nodes_table.c.node_id,
                nodes_table.c.address,
                nodes_table.c.state,
            )
            .select_from(counters_table.outerjoin(nodes_table, true()))
            .where(counters_table.c.name == _EPOCH)
            .order_by(nodes_table.c.position)
        )
        with self._failures("read the pool membership"):
            async with self._engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        if not rows:
            return Membership(0, ())
        members = tuple(
            NodeRecord(node_id, address, state)
            for _, node_id, address, state in rows
            if node_id is not None
        )
        return Membership(int(rows[0][0]), members)

    async def set_membership(self, nodes: Sequence[NodeRecord]) -> int:
        """Replace the pool's nodes (kept in the given order); returns the new epoch.

        Raises ValueError for an unknown node state or a repeated node id.
        """
        for node in nodes:
            if node.state not in NODE_STATES:
                raise ValueError(f"node {node.node_id}: unknown state {node.state!r}")
        if len({node.node_id for node in nodes}) != len(nodes):
            raise ValueError("node ids must be distinct")
        with self._failures("set the pool membership"):
            async with self._write() as conn:
                epoch = await _bump(conn, _EPOCH)
                await conn.execute(delete(nodes_table))
                if nodes:
                    await conn.execute(
                        insert(nodes_table),
                        [
                            {
                                "node_id": node.node_id,
                                "address": node.address,
                                "state": node.state,
                                "position": position,
                            }
                            for position, node in enumerate(nodes)
                        ],
                    )
        return epoch

    async def get_settings(self) -> dict[str, str]:
        """Every stored setting, by name."""
        with self._failures("read the settings"):
            async with self._engine.connect() as conn:
                rows = (
                    await conn.execute(select(settings_table.c.name, settings_table.c.value))
                ).all()
        return {row.name: row.value for row in rows}

    async def put_settings(self, values: Mapping[str, str]) -> None:
        """Store ``values``, replacing settings of the same names, in one transaction."""
        if not values:
            return
        rows = [{"name": name, "value": value} for name, value in values.items()]
        with self._failures("store the settings"):
            for attempt in range(1, _SETTINGS_ATTEMPTS + 1):
                try:
                    async with self._write() as conn:
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
        self, size_before: int, size_after: int, cause: str, miss_rate: float | None
    ) -> None:
        """Record one resize of the pool in the activity history."""
        row = {
            "at": _now(),
            "size_before": size_before,
            "size_after": size_after,
            "cause": cause,
            "miss_rate": miss_rate,
        }
        with self._failures("record the resize"):
            async with self._write() as conn:
                await conn.execute(insert(activity_table), row)

    async def list_activity(self, limit: int = 100) -> list[Activity]:
        """The latest resizes, newest first."""
        query = select(activity_table).order_by(activity_table.c.id.desc()).limit(limit)
        with self._failures("read the activity history"):
            async with self._engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [
            Activity(
                at=row.at.replace(tzinfo=UTC),
                size_before=row.size_before,
                size_after=row.size_after,
                cause=row.cause,
                miss_rate=row.miss_rate,
            )
            for row in rows
        ]

    async def _create_schema(self) -> None:
        with self._failures("create the schema"):
            async with self._write() as conn:
                # create_all, but IF NOT EXISTS: two processes may start at once.
                for table in schema.sorted_tables:
                    await conn.execute(CreateTable(table, if_not_exists=True))
            try:
                async with self._write() as conn:
                    present = set(
                        (
                            await conn.execute(select(counters_table.c.name).with_for_update())
                        ).scalars()
                    )
                    missing = [{"name": n, "value": 0} for n in (_VERSION, _EPOCH)]
                    missing = [row for row in missing if row["name"] not in present]
                    if missing:
                        await conn.execute(insert(counters_table), missing)
            except IntegrityError:
                pass  # another process created them at the same moment

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self._write_gate, self._writer.begin() as conn:
            yield conn

    def _failures(self, action: str) -> AbstractContextManager[None]:
        return storage_failures("metadata store", self._where, action)


def _now() -> datetime:
    """Now in UTC, naive, as the database columns keep it."""
    return _naive(datetime.now(UTC))


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


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
        "uploaded_at": _naive(record.uploaded_at),
    }


async def _counter(conn: AsyncConnection, name: str) -> int:
    result = await conn.execute(select(counters_table.c.value).where(counters_table.c.name == name))
    return int(result.scalar_one_or_none() or 0)


async def _lock_counter(conn: AsyncConnection, name: str) -> int:
    """The counter's value, its row locked until the transaction ends (MySQL)."""
    result = await conn.execute(
        select(counters_table.c.value).where(counters_table.c.name == name).with_for_update()
    )
    return int(result.scalar_one())


async def _bump(conn: AsyncConnection, name: str) -> int:
    """Increment the counter ``name`` and return its new value."""
    value = await _lock_counter(conn, name) + 1
    await conn.execute(
        update(counters_table).where(counters_table.c.name == name).values(value=value)
    )
    return value


async def _journal_garbage(conn: AsyncConnection, blob_names: Sequence[str]) -> None:
    if not blob_names:
        return
    now = _now()
    await conn.execute(delete(journal_table).where(journal_table.c.blob_name.in_(blob_names)))
    await conn.execute(
        insert(journal_table),
        [{"blob_name": name, "state": GARBAGE, "created_at": now} for name in blob_names],
    )
