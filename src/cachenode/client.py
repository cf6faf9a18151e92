"""Async client of one cache node over the binary protocol.

A small pool of connections per node (``cachenode.connections``); each
connection pipelines any number of requests, matching replies to requests by
request id. Every call is bounded by a timeout. Failures raise
``NodeUnavailable`` (``NodeTimeout`` for a timeout) or ``NodeReplyError`` for
an error status; a miss is not an error.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack, cast

from cachenode.connection import Connection, abandon_if_cancelled
from cachenode.connections import Connections
from cachenode.errors import NodeReplyError, NodeTimeout
from cachenode.leases import MAX_LEASE_SECONDS
from cachenode.protocol import (
    DEFAULT_KEYS_COUNT,
    MILLISECONDS,
    TICKET,
    Frame,
    MissKind,
    Opcode,
    decode_keys_entries,
)
from cachenode.routing import parse_address
from cachenode.status import Status

# check_soon queues behind at most this many requests; beyond, the caller
# takes the slower way, which may open another connection.
_SEND_SOON_MAX_IN_FLIGHT = 32
_MAX_U32 = (1 << 32) - 1
MAX_LEASE_MS = int(MAX_LEASE_SECONDS * 1000)


@dataclass(frozen=True, slots=True)
class NodeAccess:
    """How to reach nodes that protect themselves: the token sent first on every
    connection (AUTH), and TLS with the context that verifies the nodes."""

    token: str = ""
    tls: ssl.SSLContext | None = None


OPEN_ACCESS = NodeAccess()  # nodes without a token, in the clear


@dataclass(frozen=True, slots=True)
class CachedItem:
    """An item as the node holds it: its value, its flags and its version."""

    value: bytes
    flags: int
    version: int

    @classmethod
    def of(cls, frame: Frame) -> CachedItem:
        """The item a reply carries."""
        # A large value may come as a view of the read it arrived in (or of the
        # buffer it was collected in): callers get bytes, for web frameworks and
        # hashing alike, at the cost of one copy of such values only.
        return cls(bytes(frame.value), frame.flags, frame.version)


@dataclass(frozen=True, slots=True)
class LeaseHeld:
    """Another client is loading the key; ask again, at most this many seconds later."""

    seconds_left: float


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    """The key is missing and this client should load and fill it (or release
    it), writing with ``ticket``: the lease is also a write ticket."""

    ticket: int


class ClientOptions(TypedDict, total=False):
    """The keyword arguments of ``NodeClient``, for ``NodeClient.at``."""

    pool_size: int
    timeout: float
    connect_timeout: float
    access: NodeAccess


class NodeClient:
    """Talks to the node at ``host:port``; use as ``async with`` or call ``close``."""

    @classmethod
    def at(cls, address: str, **options: Unpack[ClientOptions]) -> NodeClient:
        """A client of the node at ``address`` (``host:port``); raises
        AddressError (a ValueError) when it is not one."""
        host, port = parse_address(address)
        return cls(host, port, **options)

    def __init__(
        self,
        host: str,
        port: int,
        *,
        pool_size: int = 2,
        timeout: float = 2.0,
        connect_timeout: float = 1.0,
        access: NodeAccess = OPEN_ACCESS,
    ) -> None:
        """``access``: the node's token and TLS, for nodes that require them."""
        self._connections = Connections(
            host, port, pool_size, connect_timeout, access.token.encode(), access.tls
        )
        self.host = host
        self.port = port
        self.address = self._connections.address
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._connections.close()

    # -- operations ---------------------------------------------------------

    async def get(self, key: bytes) -> bytes | None:
        """The value under ``key``, or None on a miss."""
        item = await self.get_item(key)
        return None if item is None else item.value

    async def get_item(self, key: bytes) -> CachedItem | None:
        """The value with its flags and version, or None on a miss."""
        frame = await self._call(Opcode.GET, key, accept=(Status.NOT_FOUND,))
        if frame.status == Status.NOT_FOUND:
            return None
        return CachedItem.of(frame)

    async def lease(self, key: bytes, seconds: float) -> CachedItem | LeaseGranted | LeaseHeld:
        """The item; or, on a miss, the lease to fill it for ``seconds`` (at most 60),
        unless another client holds it. Not counted as a lookup by the node."""
        return await self._item_or_lease(Opcode.LEASE, key, seconds)

    async def lookup(self, key: bytes, seconds: float) -> CachedItem | LeaseGranted | LeaseHeld:
        """A read: the item; on a miss, what ``lease`` answers, in the same round
        trip. Counted by the node as a lookup (a hit or a miss), as GET is."""
        return await self._item_or_lease(Opcode.LOOKUP, key, seconds)

    async def _item_or_lease(
        self, opcode: Opcode, key: bytes, seconds: float
    ) -> CachedItem | LeaseGranted | LeaseHeld:
        frame = await self._call(
            opcode,
            key,
            flags=min(max(1, round(seconds * 1000)), MAX_LEASE_MS),
            accept=(Status.NOT_FOUND, Status.LEASED),
        )
        if frame.status == Status.NOT_FOUND:
            return LeaseGranted(frame.version)
        if frame.status == Status.LEASED:
            return LeaseHeld(frame.flags / 1000)
        return CachedItem.of(frame)

    async def ticket(self) -> int:
        """A write ticket, for versioned writes of what this client reads from now on."""
        frame = await self._call(Opcode.TICKET)
        return frame.version

    async def release(self, key: bytes) -> None:
        """Give back a lease without filling the key (the load failed)."""
        await self._call(Opcode.RELEASE, key)

    async def uncacheable(self, key: bytes, kind: MissKind) -> None:
        """Tell the node that a miss of ``key`` it counted is one no pool size
        can fix (``kind``), and give back any lease on ``key``."""
        await self._call(Opcode.UNCACHEABLE, key, flags=int(kind))

    async def check(self, key: bytes) -> int | None:
        """The version of the cached item of ``key`` (a hit counts one lookup), or None."""
        frame = await self._call(Opcode.CHECK, key, flags=1, accept=(Status.NOT_FOUND,))
        return None if frame.status == Status.NOT_FOUND else frame.version

    def check_soon(
        self, key: bytes, requests: int = 1, lease_ms: int = 0, version: int = 0
    ) -> asyncio.Future[Frame] | None:
        """Send a CHECK of ``key`` on behalf of ``requests`` reads now, without
        awaiting anything, on a connection that is open and idle enough; None
        when there is none (then use ``check``). With ``lease_ms``, ask for a
        read lease that long (``read_lease_of`` the reply: what was granted).
        With ``version`` (the caller's copy's), the node counts the reads as
        hits only if it holds that version: else they go on to a read, which
        counts them.

        For callers that cannot afford a task per request (the gateway's fast
        path). The future gives the reply frame (OK with the version, or
        NOT_FOUND) or fails with NodeUnavailable; the caller sets its own
        timeout by cancelling it, which also forgets the request.
        """
        extras = MILLISECONDS.pack(min(lease_ms, _MAX_U32)) if lease_ms > 0 else b""
        connection = self._connections.ready_behind(_SEND_SOON_MAX_IN_FLIGHT)
        if connection is None:
            return None
        future = connection.send(Opcode.CHECK, key, b"", min(requests, _MAX_U32), version, extras)
        future.add_done_callback(functools.partial(abandon_if_cancelled, connection))
        return future

    async def set(
        self, key: bytes, value: bytes, *, flags: int = 0, version: int = 0, ticket: int = 0
    ) -> bool:
        """Store ``value``; False when ``version`` is older than the node's for this key,
        or when a versioned write's ``ticket`` (from ``ticket`` or ``lease``) is missing
        or too old.

        Raises NodeReplyError(TOO_LARGE) for a value the node refuses.
        """
        return await self._write(Opcode.SET, key, value, flags, version, ticket)

    async def add(
        self, key: bytes, value: bytes, *, flags: int = 0, version: int = 0, ticket: int = 0
    ) -> bool:
        """Store only if absent and not stale (as ``set``); False when the node did not."""
        return await self._write(Opcode.ADD, key, value, flags, version, ticket)

    async def delete(self, key: bytes, *, version: int = 0) -> bool:
        """Remove ``key``; False when it was not there.

        With ``version``: invalidate every older version, as the node's
        tombstone refuses older writes of the key for a while (docs/protocol.md).
        """
        frame = await self._call(Opcode.DELETE, key, version=version, accept=(Status.NOT_FOUND,))
        return frame.status == Status.OK

    async def invalidate(self, key: bytes, version: int) -> float:
        """Remove every version of ``key`` older than ``version`` (a versioned
        ``delete``); returns the seconds that read leases on them still run."""
        frame = await self._call(Opcode.DELETE, key, version=version, accept=(Status.NOT_FOUND,))
        return _seconds_of(frame)

    async def clear(self, *, version: int = 0) -> float:
        """Remove every item; with ``version``, also refuse older writes for a while.

        Returns the seconds that read leases on the removed items still run.
        """
        return _seconds_of(await self._call(Opcode.CLEAR, version=version))

    async def stats(self) -> dict[str, Any]:
        frame = await self._call(Opcode.STATS)
        return cast(dict[str, Any], json.loads(bytes(frame.value)))

    async def config(
        self,
        *,
        capacity_mb: float | None = None,
        policy: str | None = None,
        max_item_mb: float | None = None,
    ) -> dict[str, Any]:
        """Change any of the given settings (none: just read them); returns those in force."""
        settings = {
            name: value
            for name, value in (
                ("capacity_mb", capacity_mb),
                ("policy", policy),
                ("max_item_mb", max_item_mb),
            )
            if value is not None
        }
        body = json.dumps(settings).encode() if settings else b""
        frame = await self._call(Opcode.CONFIG, value=body)
        return cast(dict[str, Any], json.loads(bytes(frame.value)))

    async def ping(self) -> str:
        """The node's version; raises NodeUnavailable when it does not answer."""
        frame = await self._call(Opcode.PING)
        return bytes(frame.value).decode()

    async def boot_id(self) -> int:
        """The node's incarnation: a random number it draws when it starts."""
        frame = await self._call(Opcode.PING)
        return frame.version

    async def keys(
        self, cursor: bytes = b"", count: int = DEFAULT_KEYS_COUNT
    ) -> tuple[list[tuple[bytes, int]], bytes]:
        """One batch of (key, counted size) and the cursor of the next; b"" when done."""
        frame = await self._call(Opcode.KEYS, cursor, flags=count)
        return decode_keys_entries(frame.value), frame.key

    async def iter_keys(self, count: int = DEFAULT_KEYS_COUNT) -> AsyncIterator[tuple[bytes, int]]:
        """Every key of the node, in batches; keys present throughout appear at least once."""
        cursor = b""
        while True:
            batch, cursor = await self.keys(cursor, count)
            for entry in batch:
                yield entry
            if not cursor:
                return

    # -- plumbing -----------------------------------------------------------

    async def _write(
        self, opcode: Opcode, key: bytes, value: bytes, flags: int, version: int, ticket: int
    ) -> bool:
        frame = await self._call(
            opcode,
            key,
            value,
            flags=flags,
            version=version,
            extras=TICKET.pack(ticket) if ticket else b"",
            accept=(Status.NOT_STORED,),
        )
        return frame.status == Status.OK

    async def _call(
        self,
        opcode: Opcode,
        key: bytes = b"",
        value: bytes = b"",
        *,
        accept: tuple[Status, ...] = (),
        flags: int = 0,
        version: int = 0,
        extras: bytes = b"",
    ) -> Frame:
        """The reply to one request: OK, or one of the statuses it ``accept``s;
        any other status raises NodeReplyError."""
        connection = self._connections.ready()
        if connection is None:
            frame = await self._connect_and_call(opcode, key, value, flags, version, extras)
        else:
            # Sent at once, the timeout a timer rather than asyncio.timeout and
            # no coroutine in between: a cache miss makes two of these calls,
            # which this way cost the gateway about 15 us less CPU.
            future = connection.send(opcode, key, value, flags, version, extras)
            timer = asyncio.get_running_loop().call_later(
                self.timeout, self._time_out, connection, future
            )
            try:
                frame = await future
            except asyncio.CancelledError:
                connection.abandon()  # as ``_connect_and_call`` does
                if future.done() and not future.cancelled():
                    future.exception()  # timed out as well: retrieved, not logged
                raise
            finally:
                timer.cancel()
        if frame.status != Status.OK and frame.status not in accept:
            raise NodeReplyError(
                _status(frame.status), bytes(frame.value).decode("utf-8", "replace")
            )
        return frame

    def _time_out(self, connection: Connection, future: asyncio.Future[Frame]) -> None:
        if not future.done():
            future.set_exception(self._timeout_error())
            connection.abandon()

    def _timeout_error(self) -> NodeTimeout:
        return NodeTimeout(f"{self.address} did not answer within {self.timeout} s")

    async def _connect_and_call(
        self, opcode: Opcode, key: bytes, value: bytes, flags: int, version: int, extras: bytes
    ) -> Frame:
        """``_call`` when no connection may be sent on at once: the first one
        is opened, or the one chosen pushes back; the timeout covers the wait."""
        try:
            async with asyncio.timeout(self.timeout):
                connection = await self._connections.get()
                future = await connection.request(opcode, key, value, flags, version, extras)
                try:
                    return await future
                except asyncio.CancelledError:
                    # Timed out or cancelled: the request may still be queued
                    # on the connection, so the connection goes (``abandon``).
                    connection.abandon()
                    raise
        except TimeoutError:
            raise self._timeout_error() from None


def read_lease_of(frame: Frame) -> float:
    """The seconds of read lease a CHECK reply grants (0 when none)."""
    return _seconds_of(frame)


def _seconds_of(frame: Frame) -> float:
    if len(frame.extras) != MILLISECONDS.size:
        return 0.0
    return float(MILLISECONDS.unpack(frame.extras)[0]) / 1000


def _status(code: int) -> Status:
    try:
        return Status(code)
    except ValueError:
        return Status.INTERNAL_ERROR
