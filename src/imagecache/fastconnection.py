"""One client connection on the fast path (``fastpath``), as an asyncio protocol.

It reads requests' heads (``fastrequests``), answers the image GETs from
kept copies (``keptcopies``) once their node vouches for them
(``versionchecks``), or else from the image service's read (a cache miss),
in order and pipelined, with back pressure and an idle timeout as aiohttp's
own; and at the first request it cannot answer (anything but an image) it hands
the transport, with every byte not yet answered, to aiohttp's protocol, which
serves the connection from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import TYPE_CHECKING, cast

from imagecache.errors import ImageNotFound
from imagecache.fastrequests import MAX_HEAD, ImageRequest, parse_image_request
from imagecache.keptcopies import KeptImage, etag_matches, header_lines, not_found_header_fields
from imagecache.memfiles import MemoryFile
from imagecache.service import Image
from imagecache.versionchecks import NO_ANSWER

if TYPE_CHECKING:  # fastpath imports this module
    from imagecache.fastpath import FastPath

# A connection stops taking requests while more than this waits to be sent.
WRITE_BUFFER_HIGH = 1 << 20
_CONNECTION_CLOSE = b"Connection: close\r\n"


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
        """Answer the requests received, in order, until one must wait or none
        is left; then read again if reading was paused for the queue."""
        while self._serve_one():
            pass
        self._update_reading()

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
            request.key, kept.version, lambda version: self._checked(version, request, kept, size)
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
            # Replaced, gone from the node, or the node failed: read it the
            # full way (around a failed node), as for a key with no copy. The
            # copy goes unless the node merely failed to answer: one its node
            # replaced is outdated, and one its node evicted would cost every
            # later read a CHECK that fails, until its node holds it again;
            # then a read of it is a hit, which keeps it anew.
            if version != NO_ANSWER:
                self._fast.copies.drop(request.key, kept.version)
            self._load(request, size)
            return
        if self._respond(request, kept, size, hit=True):
            self._serve_next()

    def _load(self, request: ImageRequest, size: int) -> None:
        """Read an image this gateway keeps no copy of the full way, keep it
        if its node served it, and answer; a key with no image gets its 404
        here too, and anything else (a failure) goes to aiohttp, which reads
        it again and answers as it would have."""
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
        failure = None if load.cancelled() else load.exception()
        if load.cancelled() or failure is not None:
            if self._transport is None or self._transport.is_closing():
                return
            if isinstance(failure, ImageNotFound):
                # Answered here: handed over, the key would be read (and its
                # miss counted on the node) a second time. A copy kept of the
                # key is of an image deleted since: it goes.
                self._fast.copies.drop(request.key)
                if self._respond_not_found(request, size, str(failure)):
                    self._serve_next()
                return
            self._hand_over()
            return
        image = load.result()
        kept = self._fast.copies.keep(
            image.key, image.version, image.content_type, image.data, from_node=image.from_node
        )
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
        # In aiohttp's order: the image's headers (keptcopies.image_header_fields),
        # then Date and Server, then Connection.
        date = fast.date_line()
        closing = request.close or fast.stopping
        connection = _CONNECTION_CLOSE if closing else b""
        if request.if_none_match and etag_matches(request.if_none_match, kept.etag):
            transport.write(
                b"HTTP/1.1 304 Not Modified\r\n%s%s%s\r\n"
                % (kept.not_modified_headers, date, connection)
            )
        else:
            head = b"HTTP/1.1 200 OK\r\n%s%s%s\r\n" % (kept.headers, date, connection)
            if kept.file is None or not self._send_file(transport, head, kept.file):
                transport.writelines([head, kept.body])
        return self._answered(transport, closing)

    def _respond_not_found(self, request: ImageRequest, size: int, message: str) -> bool:
        """Answer ``request`` with the 404 of a key with no image, as the image
        handler of ``pages`` does; True as ``_respond``."""
        transport = self._transport
        assert transport is not None
        del self._buffer[:size]
        fast = self._fast
        fast.counters.not_found += 1
        body = message.encode()
        closing = request.close or fast.stopping
        transport.writelines(
            [
                b"HTTP/1.1 404 Not Found\r\n%s%s%s\r\n"
                % (
                    header_lines(not_found_header_fields(len(body))),
                    fast.date_line(),
                    _CONNECTION_CLOSE if closing else b"",
                ),
                body,
            ]
        )
        return self._answered(transport, closing)

    def _answered(self, transport: asyncio.Transport, closing: bool) -> bool:
        """After a response: close when asked to; else True when more requests wait."""
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
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()

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
