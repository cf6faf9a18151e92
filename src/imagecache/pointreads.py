"""Reads of one row by its key at what the database costs: the cache-miss path's query.

A read through the engine (``Database.read``) checks a connection out of
SQLAlchemy's pool (on MySQL with a ping), builds a result object and checks
the connection back in (a rollback): about 460 us of the gateway's CPU on
SQLite for a row the database finds in a few microseconds (bench/misses.py).
A ``PointReader`` keeps its own connections to the same database and runs
one statement compiled once, straight through the driver:

- SQLite: one connection, in one worker thread of its own, so the event loop
  never waits on the file (about 30 us a read, most of it the thread hop);
- MySQL: a small pool of aiomysql connections in autocommit.

Each read is a statement of its own in autocommit, so it sees every write
committed before it began, as a read through the engine does: the version
rule of the cache (docs/design.md) holds for these rows as for any other.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import aiomysql
import pymysql
from sqlalchemy import Select
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from imagecache.engines import MYSQL_CONNECT_TIMEOUT_S, SQLITE_BUSY_TIMEOUT_MS, storage_failures
from imagecache.errors import StorageError

# A row's columns, in the statement's order.
Row = Sequence[Any]
# MySQL connections kept for point reads: reads beyond this many at once queue.
MYSQL_READ_CONNECTIONS = 8
# A MySQL connection idle this long is opened again (RDS closes idle ones).
MYSQL_RECYCLE_SECONDS = 3600


class PointStatement:
    """A ``SELECT`` of one row, compiled once for one database's dialect."""

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._names = tuple(compiled.positiontup or ())

    def parameters(self, values: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(values[name] for name in self._names)


class PointReader(Protocol):
    async def first(self, statement: PointStatement, values: dict[str, Any]) -> Row | None:
        """The statement's first row (its columns in order), or None.

        Raises StorageError when the database fails or cannot be reached.
        """
        ...

    async def close(self) -> None:
        """Close its connections."""
        ...


async def point_reader_for(engine: AsyncEngine, where: str) -> PointReader:
    """A reader for the database of ``engine``, connecting as it does;
    ``where`` names it in errors. Its connections open on first use."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            # Another connection would open another, empty, database.
            return EnginePointReader(engine, where)
        return SqlitePointReader(url.database, where)
    return await MysqlPointReader.open(url, engine.dialect, where)


class EnginePointReader:
    """Point reads through the engine itself: for an in-memory SQLite database,
    which only the engine's own connection holds."""

    def __init__(self, engine: AsyncEngine, where: str) -> None:
        self._engine = engine
        self._where = where

    async def first(self, statement: PointStatement, values: dict[str, Any]) -> Row | None:
        with storage_failures("metadata store", self._where, "read"):
            async with self._engine.connect() as connection:
                result = await connection.exec_driver_sql(
                    statement.sql, statement.parameters(values)
                )
                row = result.first()
        return None if row is None else tuple(row)

    async def close(self) -> None:
        """Nothing: the engine is its owner's to close."""


class SqlitePointReader:
    def __init__(self, path: str, where: str) -> None:
        self._path = path
        self._where = where
        # One thread owns the connection: reads never run on it at once.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="point-reads")
        self._connection: sqlite3.Connection | None = None

    async def first(self, statement: PointStatement, values: dict[str, Any]) -> Row | None:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._thread, self._first, statement.sql, statement.parameters(values)
            )
        except sqlite3.Error as error:
            raise StorageError(f"metadata store {self._where} could not read: {error}") from error

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown()

    def _first(self, sql: str, parameters: tuple[Any, ...]) -> Row | None:
        if self._connection is None:
            self._connection = self._connect()
        row: Row | None = self._connection.execute(sql, parameters).fetchone()
        return row

    def _connect(self) -> sqlite3.Connection:
        # isolation_level None: autocommit, no transaction left open between reads.
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA query_only = ON")
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class MysqlPointReader:
    def __init__(self, pool: aiomysql.Pool, where: str) -> None:
        self._pool = pool
        self._where = where

    @classmethod
    async def open(cls, url: URL, dialect: Dialect, where: str) -> MysqlPointReader:
        # The engine's own connection arguments (host, user, database, options).
        _, engine_args = dialect.create_connect_args(url)
        connect_args: dict[str, Any] = {"charset": "utf8mb4", **engine_args}
        # No connection yet (minsize 0): they open on first use.
        pool = await aiomysql.create_pool(
            minsize=0,
            maxsize=MYSQL_READ_CONNECTIONS,
            **connect_args,
            autocommit=True,
            connect_timeout=MYSQL_CONNECT_TIMEOUT_S,
            pool_recycle=MYSQL_RECYCLE_SECONDS,
        )
        return cls(pool, where)

    async def close(self) -> None:
        self._pool.close()
        await self._pool.wait_closed()

    async def first(self, statement: PointStatement, values: dict[str, Any]) -> Row | None:
        # The pool drops a connection the server closed (idle, fail-over) before
        # handing it out again; one that closes mid-read fails that read.
        try:
            async with self._pool.acquire() as connection, connection.cursor() as cursor:
                await cursor.execute(statement.sql, statement.parameters(values))
                row: Row | None = await cursor.fetchone()
                return row
        except (pymysql.err.MySQLError, OSError) as error:
            raise StorageError(f"metadata store {self._where} could not read: {error}") from error
