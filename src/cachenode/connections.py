"""The connections of one node client: opened on demand, authenticated, the least busy picked.

A ``NodeClient`` keeps up to ``size`` connections to its node, each of which
pipelines any number of requests (``cachenode.connection``). ``ready`` gives
one that may be sent on at once, without awaiting anything: the two calls of
a cache miss and the fast path's CHECKs take it. ``get`` starts another
connection when every open one is busy and there is room for it, and waits
only for the first one.
"""

from __future__ import annotations

import asyncio
import ssl

from cachenode.connection import Connection
from cachenode.errors import NodeError, NodeUnavailable
from cachenode.protocol import Opcode
from cachenode.status import Status


class Connections:
    """Up to ``size`` connections to the node at ``host:port``."""

    def __init__(
        self,
        host: str,
        port: int,
        size: int,
        connect_timeout: float,
        token: bytes,
        tls: ssl.SSLContext | None,
    ) -> None:
        if size < 1:
            raise ValueError("pool_size must be at least 1")
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.connect_timeout = connect_timeout
        self._size = size
        self._token = token
        self._tls = tls
        self._open: list[Connection] = []
        self._connecting: asyncio.Task[Connection] | None = None

    def ready(self) -> Connection | None:
        """The connection ``get`` would return at once, when it may be sent
        on now; None when one must be opened or waited for."""
        least_busy: Connection | None = None
        for connection in self._open:
            if connection.closed:
                return None  # ``get`` lets it go
            if least_busy is None or connection.in_flight < least_busy.in_flight:
                least_busy = connection
        if least_busy is None or not least_busy.ready:
            return None
        if least_busy.in_flight == 0 or len(self._open) >= self._size:
            return least_busy
        return None

    def ready_behind(self, max_in_flight: int) -> Connection | None:
        """An open connection that may be sent on now, with fewer than
        ``max_in_flight`` requests before it; None when there is none."""
        for connection in self._open:
            if connection.ready and connection.in_flight < max_in_flight:
                return connection
        return None

    async def get(self) -> Connection:
        """The least busy open connection, or the first one once it is open.
        When every open one is busy and there is room, another is opened for
        later calls."""
        self._open = [c for c in self._open if not c.closed]
        idle = min(self._open, key=lambda c: c.in_flight, default=None)
        if idle is not None and (idle.in_flight == 0 or len(self._open) >= self._size):
            return idle
        # Open one more connection, shared by every caller that wants one now.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        if idle is not None:
            return idle
        return await asyncio.shield(self._connecting)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        connections, self._open = self._open, []
        for connection in connections:
            connection.close()
        # Transports finish closing on a later loop iteration; wait for them.
        if connections:
            await asyncio.wait([c.lost for c in connections], timeout=5)

    def _connected(self, task: asyncio.Task[Connection]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._open.append(task.result())

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(self.address),
                    self.host,
                    self.port,
                    ssl=self._tls,
                    server_hostname=self.host if self._tls is not None else None,
                )
                try:
                    if self._token:
                        await self._authenticate(connection)
                except BaseException:
                    connection.close()
                    raise
        except (OSError, TimeoutError, NodeError) as error:
            raise NodeUnavailable(f"cannot connect to {self.address}: {error}") from error
        return connection

    async def _authenticate(self, connection: Connection) -> None:
        """Send the token first on a new connection (AUTH); raises NodeUnavailable
        when the node refuses it."""
        reply = await connection.send(Opcode.AUTH, b"", self._token, 0, 0)
        if reply.status != Status.OK:
            raise NodeUnavailable(f"{self.address} refused this client's token")
