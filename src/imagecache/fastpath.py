"""The gateway's fast path: cache hits of ``GET /image/<key>`` served without aiohttp.

Every connection to the gateway starts here. A request that is a plain
``GET /image/<key>`` of an image this gateway keeps a copy of is answered
from that copy once the key's cache node confirms, with a CHECK round trip of
a few dozen bytes, that it still holds the same version; the image's bytes
neither cross from the node nor go through aiohttp's request machinery.
Anything else (another path or method, a body, an unusual header, a key with
no copy, a node that does not confirm, a failure) hands the connection, with
every byte not yet answered, to aiohttp's own protocol, which then serves it
for the rest of its life exactly as if the fast path did not exist.

Why a copy cannot be stale: it is served only when the owner node reports
the same version as the copy's, after the request arrived, and a version
names exactly one upload's bytes. So the reply is the one the node's GET
would have given at that moment, and docs/design.md argues why that one is
never older than the last acknowledged upload.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import NamedTuple

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_runner import BaseRunner

from cachenode.protocol import Frame
from cachenode.status import Status
from imagecache.cachepool import CachePool
from imagecache.keptcopies import KeptCopies, KeptImage

log = logging.getLogger(__name__)

# Heads longer than this go to aiohttp, which applies its own limits.
MAX_HEAD = 8192
# Header lines, each "\r\n" name ":" value; a name is an RFC 9110 token.
_HEADER_LINES = re.compile(rb"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*)*")
_HEADERS_OF_NOTE = re.compile(  # in the lowered head
    rb"\r\n(if-none-match|connection|content-length|transfer-encoding|expect|upgrade):([^\r\n]*)"
)
_REQUEST_LINE = re.compile(rb"GET /image/([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}) HTTP/1\.1")


class ImageRequest(NamedTuple):  # a tuple: made for every request, and cheaply
    key: str
    if_none_match: bytes  # the header's value, or b""
    close: bool  # "Connection: close": answer, then close


def parse_image_request(head: bytes) -> ImageRequest | None:
    """The request if ``head`` (without its blank line) is a plain image GET, else None.

    None means "let aiohttp decide": it is not an error here.
    """
    line_end = head.find(b"\r\n")
    if line_end < 0:
        line_end = len(head)
    match = _REQUEST_LINE.fullmatch(head, 0, line_end)
    if match is None or _HEADER_LINES.fullmatch(head, line_end) is None:
        return None  # not an image GET, or a malformed or folded header line
    if_none_match = b""
    close = False
    # Names are matched in a lowered copy; values come from the original
    # (an ETag is case-sensitive).
    for header in _HEADERS_OF_NOTE.finditer(head.lower(), line_end):
        name = header.group(1)
        value = head[header.start(2) : header.end(2)].strip()
        if name == b"if-none-match":
            if_none_match = value
        elif name == b"connection":
            tokens = {token.strip() for token in value.lower().split(b",")}
            if b"upgrade" in tokens:
                return None
            close = b"close" in tokens
        elif name != b"content-length" or value != b"0":
            return None  # a body, or a protocol change: aiohttp's business
    return ImageRequest(match.group(1).decode("ascii"), if_none_match, close)


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """If-None-Match as aiohttp's image handler reads it: ``*`` or a list holding the ETag."""
    if not if_none_match:
        return False
    tokens = [token.strip() for token in if_none_match.split(b",")]
    return b"*" in tokens or etag in tokens or b"W/" + etag in tokens


@dataclass
class FastPathCounters:
    served: int = 0  # requests answered from a kept copy
    handed_over: int = 0  # connections given to aiohttp
    checks: int = 0  # CHECKs sent (requests share them)


VersionCallback = Callable[[int | None], None]


class VersionChecks:
    """CHECKs of keys' versions with their nodes, shared by requests that may share them.

    A request may only rely on a CHECK sent after it arrived. So per key, one
    CHECK is in flight for the requests that came before it was sent; those
    arriving meanwhile wait for the next one, sent when it returns. A hot key
    costs one round trip per round trip time, whatever its request rate.
    """

    def __init__(self, pool: CachePool, timeout: float, counters: FastPathCounters) -> None:
        self._pool = pool
        self._timeout = timeout
        self._counters = counters
        self._in_flight: dict[str, list[VersionCallback]] = {}  # key -> who waits for it
        self._next: dict[str, list[VersionCallback]] = {}  # key -> who waits for the next

    def ask(self, key: str, callback: VersionCallback) -> bool:
        """Call ``callback`` with the node's version of ``key`` (None: no item, or
        the node failed) from a CHECK sent from now on; False when no node can
        be asked without waiting (then the callback is never called)."""
        if key in self._in_flight:
            self._next.setdefault(key, []).append(callback)
            return True
        if not self._send(key):
            return False
        self._in_flight[key] = [callback]
        return True

    def _send(self, key: str) -> bool:
        client = self._pool.usable_client(key)
        check = client.check_soon(key.encode()) if client is not None else None
        if check is None:
            return False
        self._counters.checks += 1
        timeout = asyncio.get_running_loop().call_later(self._timeout, check.cancel)
        check.add_done_callback(lambda done: self._answered(key, done, timeout))
        return True

    def _answered(
        self, key: str, check: asyncio.Future[Frame], timeout: asyncio.TimerHandle
    ) -> None:
        timeout.cancel()
        version: int | None = None
        if not check.cancelled() and check.exception() is None:
            reply = check.result()
            version = reply.version if reply.status == Status.OK else None
        callbacks = self._in_flight.pop(key)
        unasked: list[VersionCallback] = []
        waiting = self._next.pop(key, None)
        if waiting is not None:
            if self._send(key):
                self._in_flight[key] = waiting
            else:
                unasked = waiting
        for callback in callbacks:
            callback(version)
        for callback in unasked:
            callback(None)  # no node to ask: their requests go the full way


class FastPath:
    """What every fast-path connection shares: the copies, the pool, aiohttp's protocol."""

    def __init__(
        self,
        copies: KeptCopies,
        pool: CachePool,
        aiohttp_protocol: Callable[[], asyncio.Protocol],
        counters: FastPathCounters,
        *,
        timeout: float = 0.5,
    ) -> None:
        self.counters = counters
        self.copies = copies
        self.pool = pool
        self.aiohttp_protocol = aiohttp_protocol
        self.checks = VersionChecks(pool, timeout, counters)
        self.connections: set[FastConnection] = set()
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

    def close_all(self) -> None:
        for connection in list(self.connections):
            connection.close()


class FastConnection(asyncio.Protocol):
    """One client connection, until it is answered in full or handed to aiohttp."""

    def __init__(self, fast: FastPath) -> None:
        self._fast = fast
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._checking = False  # a CHECK is in flight: later requests wait their turn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._fast.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fast.connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._checking:
            self._serve_next()

    def eof_received(self) -> bool:
        return False  # close; anything half-sent is not worth answering

    # Big responses to a client that does not read must not pile up here.
    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _serve_next(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or not self._buffer:
            return
        end = self._buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
        if end < 0:
            if len(self._buffer) >= MAX_HEAD:
                self._hand_over()
            return
        request = parse_image_request(bytes(self._buffer[:end]))
        if request is None:
            self._hand_over()
            return
        kept = self._fast.copies.get(request.key)
        if kept is None or not self._fast.checks.ask(
            request.key, lambda version: self._checked(version, request, kept, end + 4)
        ):
            self._hand_over()
            return
        self._checking = True

    def _checked(
        self, version: int | None, request: ImageRequest, kept: KeptImage, size: int
    ) -> None:
        self._checking = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if version != kept.version:
            # Gone, replaced, or the node failed: aiohttp's handler reads it
            # the full way (around a failed node) and keeps a fresh copy.
            if version is not None:
                self._fast.copies.drop(request.key)
            self._hand_over()
            return
        del self._buffer[:size]
        self._fast.pool.counters.hits += 1
        self._fast.counters.served += 1
        date = self._fast.date_line()
        closing = b"Connection: close\r\n" if request.close else b""
        if etag_matches(request.if_none_match, kept.etag):
            transport.write(
                b"HTTP/1.1 304 Not Modified\r\n%s%s%s\r\n"
                % (date, closing, kept.not_modified_headers)
            )
        else:
            transport.writelines(
                [b"HTTP/1.1 200 OK\r\n%s%s%s\r\n" % (date, closing, kept.headers), kept.body]
            )
        if request.close:
            transport.close()
            return
        self._serve_next()

    def _hand_over(self) -> None:
        """From now on aiohttp serves this connection, starting with the unanswered bytes."""
        transport = self._transport
        assert transport is not None
        self._fast.connections.discard(self)
        self._fast.counters.handed_over += 1
        self._transport = None
        protocol = self._fast.aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._buffer:
            protocol.data_received(bytes(self._buffer))
        self._buffer.clear()


class FastPathSite(web.BaseSite):
    """A TCP site of ``runner`` whose connections start on the fast path."""

    def __init__(
        self,
        runner: BaseRunner,
        host: str,
        port: int,
        fast_path: Callable[[Callable[[], asyncio.Protocol]], FastPath],
        *,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._make_fast_path = fast_path
        self.fast: FastPath | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The port listened on (the one bound, once started on port 0)."""
        return self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        fast = self.fast = self._make_fast_path(server)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FastConnection(fast),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
        if self._port == 0 and self._server.sockets:
            self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        if self.fast is not None:
            self.fast.close_all()
