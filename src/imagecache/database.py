"""The SQL databases the project uses: SQLite (embedded) and MySQL/RDS, one code path.

``Database`` is the metadata database a process opens once (its engine made
as ``imagecache.engines`` says, which holds all that differs between the two
databases); each store built on it (the image catalog, the pool membership,
the manager's records) creates its own tables, and they share the
``counters`` table. Transactions that must not interleave lock one counter
row first (``lock_counter``), which serializes them without deadlocks.

Tables are created if absent, and a table an older version created gains the
columns added to the schema since (``add_absent_columns``): data folders and
databases of older versions keep working.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
)
from dataclasses import fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    Row,
    Select,
    String,
    Table,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.schema import CreateColumn, CreateTable

from imagecache.engines import WRITE, open_database, storage_failures
from imagecache.errors import StorageError
from imagecache.pointreads import PointReader, PointStatement, point_reader_for
from imagecache.pointreads import Row as PointRow

# MySQL's error for ADD COLUMN of a column that exists (ER_DUP_FIELDNAME).
_MYSQL_DUPLICATE_COLUMN = 1060

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Record = TypeVar("_Record", bound="DataclassInstance")

# Naive UTC on both databases; MySQL's DATETIME keeps only whole seconds unless told.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# An auto-increment id: 64 bits on MySQL; SQLite only auto-increments INTEGER.
RowId = BigInteger().with_variant(Integer(), "sqlite")
# Keys compare byte for byte (case-sensitive) and sort alike on both databases.
MYSQL_TABLE: dict[str, Any] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def table(
    name: str,
    schema: MetaData,
    *columns: Column[Any],
    row_id: bool = False,
    mysql: Mapping[str, Any] = MYSQL_TABLE,
) -> Table:
    """The table ``name`` of ``schema``: its ``columns``, after an auto-increment
    ``id`` primary key (``RowId``) if ``row_id``, with the MySQL options ``mysql``."""
    first = [Column("id", RowId, primary_key=True, autoincrement=True)] if row_id else []
    return Table(name, schema, *first, *columns, **mysql)


def key(name: str, type_: Any) -> Column[Any]:
    """The primary key column ``name``, of ``type_``, set by the store (not numbered)."""
    return Column(name, type_, primary_key=True)


def required(**types: Any) -> list[Column[Any]]:
    """A NOT NULL column of each name, of its type, in that order."""
    return [Column(name, type_, nullable=False) for name, type_ in types.items()]


def optional(**types: Any) -> list[Column[Any]]:
    """A nullable column of each name (NULL: not recorded), of its type, in that order."""
    return [Column(name, type_, nullable=True) for name, type_ in types.items()]


# Numbers that only grow (the image version, the membership epoch), one row each.
counters_table = table(
    "counters",
    MetaData(),
    key("name", String(32)),
    *required(value=BigInteger),
)


class Database:
    """The metadata database, opened once per process; the stores are built on it
    (or, named ``store``, a database of its own: the metrics store).

    The stores' methods read in ``read()`` and write in ``write()``, both
    within ``failures(action)``: so each raises StorageError when the database
    fails or cannot be reached; then a write changed nothing (or, if only the
    reply was lost, may have been committed).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        write_gate: AbstractAsyncContextManager[Any],
        where: str,
        store: str = "metadata",
    ) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{WRITE: True})
        self._write_gate = write_gate
        self._where = where
        self._store = store
        # Opened at the first point read: most processes never make one.
        self._point_reader: PointReader | None = None
        self._point_reader_opening = asyncio.Lock()
        self._point_statements: dict[Select[Any], PointStatement] = {}
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, store: str = "metadata") -> AsyncIterator[Database]:
        """The database at ``url``; the stores create their own tables.

        ``url`` is ``sqlite+aiosqlite:///path/to/file.db`` (the folder is
        created) or ``mysql+aiomysql://user:password@host:port/database``.
        The connections are closed on exit. Raises ValueError for a URL of
        another kind, StorageError (naming the ``store``) when the database
        cannot be used.
        """
        engine, write_gate, where = await open_database(url, store)
        database = cls(engine, write_gate, where, store)
        try:
            yield database
        finally:
            await database.close()

    async def close(self) -> None:
        """Close the connections (again: nothing); point reads fail from now on."""
        self._closed = True
        try:
            if self._point_reader is not None:
                reader, self._point_reader = self._point_reader, None
                await reader.close()
        finally:
            await self._engine.dispose()

    async def read_point(self, statement: Select[Any], values: dict[str, Any]) -> PointRow | None:
        """The first row of ``statement``, a read of one row by its key, at what
        the database costs: compiled once, run through the driver on
        connections of its own (imagecache.pointreads), in autocommit like
        ``read``. Raises StorageError as ``failures`` says."""
        if self._closed:
            raise StorageError(f"{self._store} store {self._where} is closed")
        compiled = self._point_statements.get(statement)
        reader = self._point_reader
        if compiled is None or reader is None:
            compiled, reader = await self._prepare_point_read(statement)
        return await reader.first(compiled, values)

    async def _prepare_point_read(
        self, statement: Select[Any]
    ) -> tuple[PointStatement, PointReader]:
        compiled = self._point_statements.get(statement)
        if compiled is None:
            compiled = self._point_statements[statement] = PointStatement(statement, self.dialect)
        async with self._point_reader_opening:
            if self._closed:  # closed while this waited
                raise StorageError(f"{self._store} store {self._where} is closed")
            if self._point_reader is None:
                self._point_reader = await point_reader_for(self._engine, self._where)
        return compiled, self._point_reader

    def read(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection for reads (in autocommit on SQLite)."""
        return self._engine.connect()

    @property
    def dialect(self) -> Dialect:
        """The database's SQL dialect (what statements compile for)."""
        return self._engine.dialect

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction, committed on exit unless it raises."""
        async with self._write_gate, self._writer.begin() as conn:
            yield conn

    def failures(self, action: str) -> AbstractContextManager[None]:
        """Turns database failures into StorageError saying what could not be done."""
        return storage_failures(f"{self._store} store", self._where, action)

    async def create(self, schema: MetaData, counters: Sequence[str] = ()) -> None:
        """Create the tables of ``schema`` and the ``counters`` (at 0) that are absent.

        Two processes may start at once: what the other one creates meanwhile is kept.
        """
        tables = [*schema.sorted_tables, *([counters_table] if counters else [])]
        with self.failures("create the schema"):
            async with self.write() as conn:
                # create_all, but IF NOT EXISTS; a table an older version created
                # gains the columns added since.
                for table in tables:
                    await conn.execute(CreateTable(table, if_not_exists=True))
                    await add_absent_columns(conn, table)
            if not counters:
                return
            try:
                async with self.write() as conn:
                    present = set(
                        (
                            await conn.execute(
                                select(counters_table.c.name)
                                .where(counters_table.c.name.in_(counters))
                                .with_for_update()
                            )
                        ).scalars()
                    )
                    missing = [{"name": n, "value": 0} for n in counters if n not in present]
                    if missing:
                        await conn.execute(insert(counters_table), missing)
            except IntegrityError:
                pass  # another process created them at the same moment


class Store:
    """A part of the metadata database with its own tables, which ``open`` creates if absent."""

    schema: ClassVar[MetaData]  # the store's tables
    counters: ClassVar[Sequence[str]] = ()  # the rows of ``counters_table`` it uses

    def __init__(self, database: Database) -> None:
        """Use ``open``: it creates the tables."""
        self._db = database

    @classmethod
    async def open(cls, database: Database) -> Self:
        """The store in ``database``, its tables and counters created if absent."""
        await database.create(cls.schema, cls.counters)
        return cls(database)


async def add_absent_columns(conn: AsyncConnection, table: Table) -> list[str]:
    """Add to the database's ``table`` the columns of ``table`` it lacks; their names.

    CREATE TABLE IF NOT EXISTS keeps a table an older version created as it
    was: this brings it up to the schema. Existing rows get the column's server
    default, or NULL. A process that adds the same column at the same moment is
    no error. Raises ValueError, adding nothing, when an absent column could not
    be added to a table with rows: one in the primary key, or NOT NULL without
    a server default (the schema must declare new columns nullable or give them
    a ``server_default``).
    """
    present = await conn.run_sync(
        lambda sync_conn: {column["name"] for column in inspect(sync_conn).get_columns(table.name)}
    )
    absent = [column for column in table.columns if column.name not in present]
    for column in absent:
        if column.primary_key or (not column.nullable and column.server_default is None):
            raise ValueError(
                f"cannot add column {column.name} to the existing table {table.name}:"
                " a column added to a table must be nullable or have a server default"
                " and not be part of the primary key"
            )
    preparer = conn.dialect.identifier_preparer
    for column in absent:
        definition = CreateColumn(column).compile(dialect=conn.dialect)
        try:
            # As the driver takes it: a default's text may hold ":" or "%".
            await conn.exec_driver_sql(
                f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {definition}"
            )
        except DBAPIError as error:
            if not _is_duplicate_column(error):
                raise
            # another process added it since we looked
    return [column.name for column in absent]


def _is_duplicate_column(error: DBAPIError) -> bool:
    """Whether ``error`` says the column to add exists (SQLite's or MySQL's words)."""
    reason = error.orig
    if reason is not None and reason.args and reason.args[0] == _MYSQL_DUPLICATE_COLUMN:
        return True
    return "duplicate column name" in str(reason).lower()


async def counter(conn: AsyncConnection, name: str) -> int:
    """The value of the counter ``name``."""
    result = await conn.execute(select(counters_table.c.value).where(counters_table.c.name == name))
    return int(result.scalar_one_or_none() or 0)


async def lock_counter(conn: AsyncConnection, name: str) -> int:
    """The counter's value, its row locked until the transaction ends (MySQL)."""
    result = await conn.execute(
        select(counters_table.c.value).where(counters_table.c.name == name).with_for_update()
    )
    return int(result.scalar_one())


async def bump(conn: AsyncConnection, name: str) -> int:
    """Increment the counter ``name`` and return its new value."""
    value = await lock_counter(conn, name) + 1
    await conn.execute(
        update(counters_table).where(counters_table.c.name == name).values(value=value)
    )
    return value


def naive_utc(moment: datetime) -> datetime:
    """``moment`` in UTC without its zone, as the ``Timestamp`` columns keep it."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def record_of(kind: type[_Record], row: Row[Any], *timestamps: str) -> _Record:
    """The ``kind`` (a dataclass) of ``row``: each field the column of its name,
    the ``timestamps`` (naive UTC, as ``Timestamp`` columns keep them) made
    timezone-aware UTC, a NULL one None. Columns no field names are left out."""
    columns = row._mapping
    values = {field.name: columns[field.name] for field in fields(kind) if field.name in columns}
    for name in timestamps:
        if values[name] is not None:
            values[name] = values[name].replace(tzinfo=UTC)
    return kind(**values)


def naive_utc_now() -> datetime:
    """Now in UTC, naive, as the ``Timestamp`` columns keep it."""
    return naive_utc(datetime.now(UTC))
