"""The gateway's fast path: cache hits of ``GET /image/<key>`` served without aiohttp.

Every connection to the gateway starts here. A request that is a plain
``GET /image/<key>`` of an image this gateway keeps a copy of is answered
from that copy while the key's cache node vouches for its version: under a
read lease the node granted, or else once a CHECK round trip of a few dozen
bytes confirms it; the image's bytes neither cross from the node nor go
through aiohttp's request machinery.
Anything else (another path or method, a body, an unusual header, a key with
no copy, a node that does not confirm, a failure) hands the connection, with
every byte not yet answered, to aiohttp's own protocol, which then serves it
for the rest of its life exactly as if the fast path did not exist.

Why a copy cannot be stale: it is served only when the owner node reports
the same version as the copy's, after the request arrived or under a read
lease that still holds (``VersionChecks``), and a version names exactly one
upload's bytes. So the reply is one the node's GET could have given while
the request was under way, and docs/design.md argues why that one is never
older than the last acknowledged upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from email.utils import formatdate
from typing import NamedTuple, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_runner import BaseRunner

from cachenode.client import read_lease_of
from cachenode.protocol import Frame
from cachenode.status import Status
from imagecache.cachepool import LEASE_CLOCK_SHARE, CachePool, PoolMember
from imagecache.keptcopies import KeptCopies, KeptImage, etag_matches
from imagecache.keysamples import KeySampler
from imagecache.memfiles import MemoryFile
from imagecache.service import Image

log = logging.getLogger(__name__)

# Heads longer than this go to aiohttp, which applies its own limits.
MAX_HEAD = 8192
# A connection stops taking requests while more than this waits to be sent.
WRITE_BUFFER_HIGH = 1 << 20
# On shutdown, requests in progress get this long to be answered.
SHUTDOWN_SECONDS = 5.0
# Header lines, each "\r\n" name ":" value; a name is an RFC 9110 token.
# Values hold no control characters but tab (aiohttp answers those 400).
_HEADER_LINES = re.compile(rb"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*)*")
_HEADERS_OF_NOTE = re.compile(  # in the lowered head
    rb"\r\n(host|if-none-match|connection|content-length|transfer-encoding|expect|upgrade):"
    rb"([^\r\n]*)"
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
    seen: set[bytes] = set()
    # Names are matched in a lowered copy; values come from the original
    # (an ETag is case-sensitive).
    for header in _HEADERS_OF_NOTE.finditer(head.lower(), line_end):
        name = header.group(1)
        if name in seen:
            return None  # a repeated header: aiohttp's reading of it decides
        seen.add(name)
        value = head[header.start(2) : header.end(2)].strip()
        if name == b"host":
            continue
        if name == b"if-none-match":
            if_none_match = value
        elif name == b"connection":
            tokens = {token.strip() for token in value.lower().split(b",")}
            if b"upgrade" in tokens:
                return None
            close = b"close" in tokens
        elif name != b"content-length" or value != b"0":
            return None  # a body, or a protocol change: aiohttp's business
    if b"host" not in seen:
        return None  # HTTP/1.1 requires it; aiohttp answers 400
    return ImageRequest(match.group(1).decode("ascii"), if_none_match, close)


@dataclass
class FastPathCounters:
    served: int = 0  # requests answered from a kept copy
    loaded: int = 0  # requests of keys with no copy, read the full way and answered here
    handed_over: int = 0  # connections given to aiohttp
    checks: int = 0  # CHECKs sent (requests share them)


# What a CHECK told: the node's version of the key, None when it holds no
# item, or NO_ANSWER when the node failed or did not answer in time.
NO_ANSWER = -1
VersionCallback = Callable[[int | None], None]
# Reads served under read leases are reported to their nodes (as CHECK's
# count of reads), so that the nodes' hit rates stay true, at least this often.
REPORT_SECONDS = 1.0


@dataclass(slots=True)
class ReadLease:
    """A node's word that ``version`` of a key stays its current one until
    ``until`` (on this process's monotonic clock, with the margin taken)."""

    version: int
    node: PoolMember  # the node that granted it
    view: int  # the pool's view generation when it was asked for
    until: float
    reads: int = 0  # served under it and not yet reported to the node


class VersionChecks:
    """CHECKs of keys' versions with their nodes, shared by requests that may share them.

    A request may rely on a read lease (cachenode.readleases) that still
    holds, or else on a CHECK sent after it arrived. So per key, one CHECK is
    in flight for the requests that came before it was sent; those arriving
    meanwhile wait for the next one, sent when it returns. Each CHECK asks for
    a read lease, under which the key's requests are answered at once: a hot
    key costs one round trip per lease, whatever its request rate.

    Why a lease is never stale: the node counts it from when it answered the
    CHECK, this side from before it sent it, for ``LEASE_CLOCK_SHARE`` of its
    time; whoever invalidates the key waits out what the node reports before
    acknowledging (``CachePool.invalidate``). A lease taken under another view
    of the pool (a membership change, a node marked dirty) or from a node that
    no longer serves the key is not used.
    """

    def __init__(
        self,
        pool: CachePool,
        timeout: float,
        counters: FastPathCounters,
        read_lease_seconds: float = 0.0,
    ) -> None:
        # Kept: asyncio.get_running_loop() costs a getpid() system call each time.
        self._loop = asyncio.get_running_loop()
        self._pool = pool
        self._timeout = timeout
        self._counters = counters
        self._lease_ms = round(read_lease_seconds * 1000)
        self._in_flight: dict[str, list[VersionCallback]] = {}  # key -> who waits for it
        self._next: dict[str, list[VersionCallback]] = {}  # key -> who waits for the next
        self._leases: dict[str, ReadLease] = {}
        self._report_timer: asyncio.TimerHandle | None = None

    def leased(self, key: str, version: int) -> bool:
        """Whether a read of ``version`` of ``key`` may be answered now, under a read lease."""
        lease = self._leases.get(key)
        if lease is None or lease.version != version:
            return False
        now = time.monotonic()
        # Under the same view, the node that granted the lease still owns the key.
        if (
            now >= lease.until
            or lease.view != self._pool.view_generation
            or not self._pool.may_read(lease.node, now)
        ):
            return False
        lease.reads += 1
        return True

    def ask(self, key: str, callback: VersionCallback) -> bool:
        """Call ``callback`` with what a CHECK of ``key`` sent from now on tells;
        False when no node can be asked without waiting (then it is never called)."""
        if key in self._in_flight:
            self._next.setdefault(key, []).append(callback)
            return True
        if not self._send(key, 1):
            return False
        self._in_flight[key] = [callback]
        return True

    def close(self) -> None:
        """Report the reads served under leases, and stop."""
        self._report()
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None

    def _send(self, key: str, requests: int) -> bool:
        node = self._pool.usable_owner(key)
        if node is None:
            return False
        lease = self._leases.get(key)
        reported = lease.reads if lease is not None else 0
        sent_at = time.monotonic()
        view = self._pool.view_generation
        check = node.client.check_soon(key.encode(), requests + reported, self._lease_ms)
        if check is None:
            return False
        if lease is not None:
            lease.reads = 0
        self._counters.checks += 1
        timeout = self._loop.call_later(self._timeout, check.cancel)
        check.add_done_callback(
            lambda done: self._answered(key, done, timeout, node, view, sent_at)
        )
        return True

    def _answered(
        self,
        key: str,
        check: asyncio.Future[Frame],
        timeout: asyncio.TimerHandle,
        node: PoolMember,
        view: int,
        sent_at: float,
    ) -> None:
        timeout.cancel()
        version: int | None = NO_ANSWER
        if not check.cancelled() and check.exception() is None:
            reply = check.result()
            version = reply.version if reply.status == Status.OK else None
            self._take_lease(key, reply, node, view, sent_at)
        callbacks = self._in_flight.pop(key)
        waiting = self._next.pop(key, None) or []
        # After a failure the waiting requests go the full way at once, which
        # reads around the node, rather than waiting on it once more.
        if waiting and version != NO_ANSWER and self._send(key, len(waiting)):
            self._in_flight[key] = waiting
        else:
            callbacks += waiting
        for callback in callbacks:
            try:
                callback(version)
            except Exception:  # one connection's failure must not strand the others
                log.exception("fast path: answering a request failed")

    def _take_lease(
        self, key: str, reply: Frame, node: PoolMember, view: int, sent_at: float
    ) -> None:
        granted = read_lease_of(reply) if reply.status == Status.OK else 0.0
        if granted <= 0:
            self._leases.pop(key, None)
            return
        previous = self._leases.get(key)
        self._leases[key] = ReadLease(
            reply.version,
            node,
            view,
            sent_at + granted * LEASE_CLOCK_SHARE,
            previous.reads if previous is not None else 0,
        )
        if self._report_timer is None:
            self._report_timer = self._loop.call_later(REPORT_SECONDS, self._report_and_again)

    def _report_and_again(self) -> None:
        self._report()
        self._report_timer = (
            self._loop.call_later(REPORT_SECONDS, self._report_and_again) if self._leases else None
        )

    def _report(self) -> None:
        """Tell nodes the reads served under their leases (as lookups that hit,
        best effort), and forget leases that have ended."""
        now = time.monotonic()
        for key, lease in list(self._leases.items()):
            if lease.reads:
                report = lease.node.client.check_soon(key.encode(), lease.reads)
                if report is not None:
                    lease.reads = 0
                    timeout = self._loop.call_later(self._timeout, report.cancel)
                    report.add_done_callback(functools.partial(_settled, timeout))
            if lease.until <= now and (not lease.reads or lease.view != self._pool.view_generation):
                del self._leases[key]


def _settled(timeout: asyncio.TimerHandle, report: asyncio.Future[Frame]) -> None:
    """A report's reply (or failure, which changes nothing) has come."""
    timeout.cancel()
    if not report.cancelled():
        report.exception()  # retrieved: a failed report is not worth a log line


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
        self.checks.close()


class FastConnection(asyncio.Protocol):
    """One client connection, until it is answered in full or handed to aiohttp."""

    def __init__(self, fast: FastPath) -> None:
        self._fast = fast
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiting = False  # a CHECK or a load is in flight: later requests wait their turn
        self._write_paused = False  # the transport's buffer is full
        self._read_paused = False
        self._hand_over_waiting = False  # to aiohttp once the transport can write again
        self._active = False  # served or received something since the idle timer last fired
        self._last_head = b""  # the last head parsed, blank line included, and its request
        self._last_request: ImageRequest | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        # A descriptor of its own for the connection's socket, to send kept
        # images with sendfile(2) while the transport has nothing queued.
        self._sender: socket.socket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        raw = transport.get_extra_info("socket")
        if raw is not None and raw.type == socket.SOCK_STREAM:
            with contextlib.suppress(OSError):
                self._sender = socket.socket(fileno=os.dup(raw.fileno()))
        # Pushing back at the default 64 KiB would stall every response of a
        # 100 KB image for a loop iteration; this still bounds what one
        # client that does not read can make the gateway hold.
        self._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self._fast.connections.add(self)
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_sender()
        self._fast.forget(self)
        self._transport = None
        self._cancel_idle_timer()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._waiting:
            self._serve_next()
        else:
            self._update_reading()

    def eof_received(self) -> bool:
        return False  # close; anything half-sent is not worth answering

    # A client that does not read its responses must not make the gateway
    # buffer them: no new request is started while the transport pushes back.
    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        if self._hand_over_waiting:
            self._hand_over()
        elif not self._waiting:
            self._serve_next()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def close_when_idle(self) -> None:
        """Close now if no request is in progress, else once it is answered."""
        if not self._waiting and not self._write_paused:
            self.close()

    def _update_reading(self) -> None:
        """Read while there is room: no response piling up, no long queue of requests."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pause = self._write_paused or (self._waiting and len(self._buffer) > 4 * MAX_HEAD)
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _serve_next(self) -> None:
        """Answer the requests received, in order, until one must wait or none is left."""
        while self._serve_one():
            pass

    def _serve_one(self) -> bool:
        """Answer the first request received if it can be answered now; True
        when it was and the next one may follow."""
        transport = self._transport
        if transport is None or transport.is_closing() or self._write_paused:
            return False
        self._active = True
        if self._fast.stopping and not self._buffer:
            transport.close()
            return False
        buffer = self._buffer
        request = self._last_request
        # A keep-alive client mostly repeats its last head byte for byte; the
        # head ends at its first blank line, so a buffer that starts with the
        # last head (blank line included) holds that same head.
        if request is not None and buffer.startswith(self._last_head):
            size = len(self._last_head)
        else:
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
            if end < 0:
                if len(buffer) >= MAX_HEAD:
                    self._hand_over()
                return False
            size = end + 4
            self._last_head = bytes(buffer[:size])
            request = self._last_request = parse_image_request(self._last_head[:end])
            if request is None:
                self._hand_over()
                return False
        fast = self._fast
        kept = fast.copies.get(request.key)
        if kept is None:
            self._load(request, size)
            return False
        if fast.checks.leased(request.key, kept.version):
            return self._respond(request, kept, size, hit=True)
        if not fast.checks.ask(
            request.key, lambda version: self._checked(version, request, kept, size)
        ):
            self._hand_over()
            return False
        self._waiting = True
        if len(self._buffer) > 4 * MAX_HEAD:
            self._update_reading()
        return False

    def _checked(
        self, version: int | None, request: ImageRequest, kept: KeptImage, size: int
    ) -> None:
        self._waiting = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if version != kept.version:
            # Gone, replaced, or the node failed: aiohttp's handler reads it
            # the full way (around a failed node) and keeps a fresh copy.
            if version != NO_ANSWER:
                self._fast.copies.drop(request.key)
            self._hand_over()
            return
        if self._respond(request, kept, size, hit=True):
            self._serve_next()

    def _load(self, request: ImageRequest, size: int) -> None:
        """Read an image this gateway keeps no copy of the full way, keep it,
        and answer; anything but an image (a missing key, a failure) goes to
        aiohttp, which reads it again and answers as it would have."""
        fast = self._fast
        if fast.load is None:
            self._hand_over()
            return
        self._waiting = True
        load = fast.loop.create_task(fast.load(request.key))
        fast.loads.add(load)
        load.add_done_callback(lambda done: self._loaded(done, request, size))

    def _loaded(self, load: asyncio.Task[Image], request: ImageRequest, size: int) -> None:
        self._fast.loads.discard(load)
        self._waiting = False
        if load.cancelled() or load.exception() is not None:
            if self._transport is not None and not self._transport.is_closing():
                self._hand_over()
            return
        image = load.result()
        kept = self._fast.copies.keep(image.key, image.version, image.content_type, image.data)
        self._fast.counters.loaded += 1
        transport = self._transport
        if (
            transport is not None
            and not transport.is_closing()
            and self._respond(request, kept, size, hit=False)
        ):
            self._serve_next()

    def _respond(self, request: ImageRequest, kept: KeptImage, size: int, *, hit: bool) -> bool:
        """Answer ``request`` (``size`` bytes of the buffer) from ``kept``
        (``hit``: a kept copy, which the pool's counters have not seen yet);
        True when the connection stays open and holds more bytes to serve."""
        transport = self._transport
        assert transport is not None
        del self._buffer[:size]
        fast = self._fast
        if hit:
            fast.pool.counters.hits += 1
            fast.counters.served += 1
        sampler = fast.sampler
        if sampler is not None:  # a lookup of the image, hit or loaded (keysamples)
            sampler.batch.lookups += 1
            if kept.sample_bucket < sampler.threshold:
                sampler.keep(request.key, len(kept.body))
        date = fast.date_line()
        closing = request.close or fast.stopping
        connection = b"Connection: close\r\n" if closing else b""
        if request.if_none_match and etag_matches(request.if_none_match, kept.etag):
            transport.write(
                b"HTTP/1.1 304 Not Modified\r\n%s%s%s\r\n"
                % (date, connection, kept.not_modified_headers)
            )
        else:
            head = b"HTTP/1.1 200 OK\r\n%s%s%s\r\n" % (date, connection, kept.headers)
            if kept.file is None or not self._send_file(transport, head, kept.file):
                transport.writelines([head, kept.body])
        if closing:
            transport.close()
            return False
        # Pipelined requests (pause_writing has stopped reading if need be).
        return bool(self._buffer)

    def _send_file(self, transport: asyncio.Transport, head: bytes, file: MemoryFile) -> bool:
        """Send ``head`` and then ``file`` with sendfile(2), straight to the
        socket; what the socket does not take goes through the transport, in
        order. False when nothing was sent (then the caller writes it all)."""
        sender = self._sender
        if sender is None or transport.get_write_buffer_size():
            return False  # bytes written before must leave first
        try:
            # MSG_MORE: the head leaves in one segment with the body's start.
            sent = sender.send(head, socket.MSG_MORE)
        except OSError:  # would block, or a failed socket the transport will report
            return False
        if sent < len(head):
            transport.writelines([head[sent:], file.view])
            return True
        try:
            sent = os.sendfile(sender.fileno(), file.fd, 0, len(file))
        except OSError:
            sent = 0
        if sent < len(file):
            transport.write(file.view[sent:])
        return True

    def _close_sender(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def _hand_over(self) -> None:
        """From now on aiohttp serves this connection, starting with the unanswered bytes."""
        transport = self._transport
        assert transport is not None
        if self._write_paused:
            # aiohttp's protocol must not inherit a transport that reports
            # itself paused: it would never be told to resume.
            self._hand_over_waiting = True
            return
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        transport.set_write_buffer_limits()  # aiohttp's flow control, on the defaults
        self._cancel_idle_timer()
        self._close_sender()
        self._fast.forget(self)
        self._fast.counters.handed_over += 1
        self._transport = None
        protocol = self._fast.aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._buffer:
            protocol.data_received(bytes(self._buffer))
        self._buffer.clear()

    # One timer per connection, re-armed only when it fires: requests just
    # set a flag, which costs less than moving a timer each time. So an idle
    # connection closes after one to two idle timeouts.
    def _arm_idle_timer(self) -> None:
        self._idle_timer = self._fast.loop.call_later(self._fast.idle_timeout, self._idle_check)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_check(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if not self._active and not self._waiting and not self._write_paused:
            transport.close()
            return
        self._active = False
        self._arm_idle_timer()


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
            reuse_port=self.reuse_port,
        )
        if self._port == 0 and self._server.sockets:
            self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        if self.fast is not None:
            await self.fast.shut_down()
