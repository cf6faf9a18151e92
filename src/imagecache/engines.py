"""How an engine is made for each SQL database the project uses, and what differs.

- SQLite, by SQLAlchemy's documented recipe for pysqlite/aiosqlite: the
  driver's own transaction handling is switched off and a write transaction
  (a connection with the ``WRITE`` execution option) starts with ``BEGIN
  IMMEDIATE``, so it takes the write lock first, waiting up to the busy
  timeout, instead of failing with "database is locked" when it upgrades a
  read lock; reads run in autocommit. WAL lets readers go on beside the
  writer (of this process or another one). Within one process, writers also
  queue on an asyncio lock.
- MySQL: READ COMMITTED, so the locking reads take no gap locks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from imagecache.errors import StorageError

SQLITE_BUSY_TIMEOUT_MS = 10_000
MYSQL_CONNECT_TIMEOUT_S = 10
# Execution option that marks a connection's transactions as writes.
WRITE = "imagecache_write"


@contextmanager
def storage_failures(store: str, where: str, action: str) -> Iterator[None]:
    """Turn database and connection failures into StorageError naming the ``store``."""
    try:
        yield
    except (DBAPIError, PoolTimeoutError, OSError) as error:
        reason = error.orig if isinstance(error, DBAPIError) and error.orig else error
        raise StorageError(f"{store} {where} could not {action}: {reason}") from error


async def open_database(
    url: str, store: str
) -> tuple[AsyncEngine, AbstractAsyncContextManager[Any], str]:
    """The engine for the database ``url``, its write gate (``create_engine``) and
    the URL without its password, for messages about ``store``.

    Raises ValueError for a URL that is not sqlite+aiosqlite or mysql+aiomysql,
    StorageError when the database cannot be opened.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ValueError(f"not a database URL: {error}") from error
    where = parsed.render_as_string(hide_password=True)
    if parsed.drivername not in ("sqlite+aiosqlite", "mysql+aiomysql"):
        raise ValueError(f"{store} URL must be sqlite+aiosqlite or mysql+aiomysql: {where}")
    with storage_failures(f"{store} store", where, "open the database"):
        engine, write_gate = await create_engine(parsed)
    return engine, write_gate, where


async def create_engine(url: URL) -> tuple[AsyncEngine, AbstractAsyncContextManager[Any]]:
    """The engine for ``url`` and what write transactions of this process enter first.

    Everything that differs between the databases is here.
    """
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        try:
            await _sqlite_use_wal(engine)
        except BaseException:
            await engine.dispose()
            raise
        # SQLite runs one writer at a time anyway: this process's writers queue
        # here rather than in SQLite's sleep-and-retry busy handler, which stays
        # the protection against other processes.
        return engine, asyncio.Lock()
    engine = create_async_engine(
        url,
        isolation_level="READ COMMITTED",
        pool_pre_ping=True,  # RDS closes idle connections and fails over
        pool_recycle=3600,
        connect_args={"connect_timeout": MYSQL_CONNECT_TIMEOUT_S},
    )
    return engine, nullcontext()


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy's recipe: the driver emits no BEGIN of its own (_sqlite_begin does).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


async def _sqlite_use_wal(engine: AsyncEngine) -> None:
    """Put the database file in WAL mode (it stays so, for every connection).

    Switching can fail with "database is locked" at once, without waiting for
    the busy timeout, while another process opens the same new file: retry.
    """
    deadline = asyncio.get_running_loop().time() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("PRAGMA journal_mode = WAL")
            return
        except OperationalError as error:
            if "locked" not in str(error.orig) or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.02)


def _sqlite_begin(connection: Connection) -> None:
    if connection.get_execution_options().get(WRITE):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
