"""The gateway's fast path: cache hits of ``GET /image/<key>`` served without aiohttp.

Every connection to the gateway starts here. A request that is a plain
``GET /image/<key>`` of an image this gateway keeps a copy of is answered
from that copy while the key's cache node vouches for its version: under a
read lease the node granted, or else once a CHECK round trip of a few dozen
bytes confirms it; the image's bytes neither cross from the node nor go
through aiohttp's request machinery. A cache miss (a key with no copy, or
whose copy its node no longer confirms) is read the full way (the image
service's read: the node, the metadata, the blob store), kept when its node
served it, and answered here as well; so is the 404 of a key with no image.
Anything else (another path or method, a body, an unusual header, a
failure) hands the connection, with every byte not yet answered,
to aiohttp's own protocol, which then serves it for the rest of its life
exactly as if the fast path did not exist.
The setting gateway.fast_path (IMAGECACHE_FAST_PATH) turns it off: then
every connection is aiohttp's from the start, through its middlewares.

Why a copy cannot be stale: it is served only when the owner node reports
the same version as the copy's, after the request arrived or under a read
lease that still holds (``VersionChecks``), and a version names exactly one
upload's bytes. So the reply is one the node's GET could have given while
the request was under way, and docs/design.md argues why that one is never
older than the last acknowledged upload.

The parts: ``fastrequests`` reads a request's head, ``versionchecks`` asks
the nodes, ``fastconnection`` serves one connection and hands it over; this
module holds what the connections share and the listening site.
aiohttp is bounded above in setup.cfg: the site and the hand-over lean on
its private parts, which tests/test_fastpath_contract.py pins down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from email.utils import formatdate

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_runner import BaseRunner

from imagecache.cachepool import CachePool
from imagecache.fastconnection import FastConnection
from imagecache.keptcopies import KeptCopies
from imagecache.keysamples import KeySampler
from imagecache.service import Image
from imagecache.versionchecks import VersionChecks

# On shutdown, requests in progress get this long to be answered.
SHUTDOWN_SECONDS = 5.0


@dataclass
class FastPathCounters:
    served: int = 0  # requests answered from a kept copy
    loaded: int = 0  # requests of keys with no copy, read the full way and answered here
    not_found: int = 0  # requests of keys with no image, answered 404 here
    handed_over: int = 0  # connections given to aiohttp
    checks: int = 0  # CHECKs sent (requests share them)


class FastPath:
    """What every fast-path connection shares: the copies, the pool, aiohttp's protocol."""

    def __init__(
        self,
        copies: KeptCopies,
        pool: CachePool,
        aiohttp_protocol: Callable[[], asyncio.Protocol],
        counters: FastPathCounters,
        *,
        load: Callable[[str], Coroutine[object, object, Image]] | None = None,
        timeout: float = 0.5,
        read_lease_seconds: float = 0.0,
        idle_timeout: float = 75.0,
        sampler: KeySampler | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()  # kept: getting it costs a system call
        self.counters = counters
        self.copies = copies
        self.pool = pool
        self.aiohttp_protocol = aiohttp_protocol
        # Reads an image the full way (ImageService.read), for a key with no copy.
        self.load = load
        self.loads: set[asyncio.Task[Image]] = set()  # held: the loop keeps only weak references
        self.checks = VersionChecks(pool, timeout, counters, read_lease_seconds)
        # As aiohttp's keep-alive timeout: a connection that sends nothing
        # (or never finishes a request) for this long is closed.
        self.idle_timeout = idle_timeout
        self.sampler = sampler  # counts the reads answered here, for the miss curve
        self.connections: set[FastConnection] = set()
        self.stopping = False
        self._drained: asyncio.Event | None = None  # set when the last connection is gone
        self._date_second = -1
        self._date_line = b""

    def date_line(self) -> bytes:
        """The Date and Server header lines, as aiohttp sends them."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date_line = b"Date: %s\r\nServer: %s\r\n" % (
                formatdate(now, usegmt=True).encode(),
                SERVER_SOFTWARE.encode(),
            )
        return self._date_line

    def forget(self, connection: FastConnection) -> None:
        """``connection`` closed or went to aiohttp."""
        self.connections.discard(connection)
        if not self.connections and self._drained is not None:
            self._drained.set()

    async def shut_down(self) -> None:
        """Close every connection once its request in progress is answered."""
        self.stopping = True
        for connection in list(self.connections):
            connection.close_when_idle()
        if self.connections:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_SECONDS):
                    await self._drained.wait()
        for connection in list(self.connections):
            connection.close()
        # Loads whose clients went away may still run: they must not outlive
        # the stores the app closes next.
        for load in list(self.loads):
            load.cancel()
        await asyncio.gather(*self.loads, return_exceptions=True)
        self.checks.close()


class FastPathSite(web.BaseSite):
    """A TCP site of ``runner`` whose connections start on the fast path.

    With ``fast_path`` None (gateway.fast_path off) it is a plain TCP site:
    aiohttp's protocol takes every connection from the start.
    """

    def __init__(
        self,
        runner: BaseRunner,
        host: str,
        port: int,
        fast_path: Callable[[Callable[[], asyncio.Protocol]], FastPath] | None,
        *,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._make_fast_path = fast_path
        self.fast: FastPath | None = None
        # SO_REUSEPORT, so that gateway workers (workers.py) listen on one port
        # side by side; may be set until start().
        self.reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The port listened on (the one bound, once started on port 0)."""
        return self._port

    async def start(self) -> None:
        await super().start()
        # aiohttp's own protocol factory (web_server.Server): every call makes
        # a RequestHandler, to which the fast path hands its connections.
        server = self._runner.server
        assert server is not None
        protocol: Callable[[], asyncio.Protocol] = server
        if self._make_fast_path is not None:
            fast = self.fast = self._make_fast_path(server)
            protocol = functools.partial(FastConnection, fast)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self.reuse_port,
        )
        if self._port == 0 and self._server.sockets:
            self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        if self.fast is not None:
            await self.fast.shut_down()
