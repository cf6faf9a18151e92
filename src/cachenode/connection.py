"""One connection of a node client: pipelined requests, replies matched by request id.

The node client (``cachenode.client``) keeps a few of these per node. A
connection sends any number of requests without waiting, resolves each
request's future when its reply arrives, and fails them all at once when
the connection is lost or the node's reply cannot be parsed.
"""

from __future__ import annotations

import asyncio
from typing import cast

from cachenode.errors import NodeReplyError, NodeUnavailable, ProtocolError
from cachenode.inplace import receive_in_place
from cachenode.protocol import (
    COALESCE_LIMIT,
    MAGIC_REQUEST,
    MAGIC_RESPONSE,
    MAX_REQUEST_ID,
    Frame,
    FrameDecoder,
    Opcode,
    OversizedFrame,
    encode_header,
)
from cachenode.status import Status


class Connection(asyncio.Protocol):
    """One TCP connection with its in-flight requests."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._decoder = FrameDecoder(MAGIC_RESPONSE)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._next_id = 1
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False
        # Kept: asyncio.get_running_loop() costs a getpid() system call each time.
        self._loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self._loop.create_future()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(NodeUnavailable(f"connection to {self._address} lost"))
        self._writable.set()
        self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        self._deliver()
        if self._decoder.buffer.missing and self._transport is not None:
            # The rest of a large value is on its way.
            receive_in_place(self._transport, self, self._decoder.buffer, self._deliver)

    def _deliver(self) -> None:
        """Resolve the requests whose replies the decoder now holds."""
        try:
            while (frame := self._decoder.next_frame()) is not None:
                if isinstance(frame, OversizedFrame):  # cannot happen: no limit is set
                    raise ProtocolError("oversized response")
                if frame.status == Status.MALFORMED:
                    # The node could not parse what we sent and is closing.
                    self._fail_all(
                        NodeReplyError(
                            Status.MALFORMED, bytes(frame.value).decode("utf-8", "replace")
                        )
                    )
                    self.close()
                    return
                future = self._pending.pop(frame.request_id, None)
                if future is not None and not future.done():
                    future.set_result(frame)
        except ProtocolError as error:
            self._fail_all(NodeUnavailable(f"bad reply from {self._address}: {error}"))
            self.close()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def request(
        self, opcode: Opcode, key: bytes, value: bytes, flags: int, version: int, extras: bytes
    ) -> asyncio.Future[Frame]:
        """Send one request; the returned future resolves to its reply frame."""
        if not self._writable.is_set():
            await self._writable.wait()
        if self.closed or self._transport is None or self._transport.is_closing():
            raise NodeUnavailable(f"connection to {self._address} is closed")
        return self.send(opcode, key, value, flags, version, extras)

    @property
    def ready(self) -> bool:
        """Open, and not pushing back: ``send`` may be called."""
        return (
            not self.closed
            and self._writable.is_set()
            and self._transport is not None
            and not self._transport.is_closing()
        )

    def send(
        self,
        opcode: Opcode,
        key: bytes,
        value: bytes,
        flags: int,
        version: int,
        extras: bytes = b"",
    ) -> asyncio.Future[Frame]:
        """``request`` for a connection known to be ready."""
        assert self._transport is not None
        request_id = self._next_id
        self._next_id = request_id + 1 if request_id < MAX_REQUEST_ID else 1
        future: asyncio.Future[Frame] = self._loop.create_future()
        self._pending[request_id] = future
        header = encode_header(
            MAGIC_REQUEST, opcode, request_id, key, len(value), 0, flags, version, extras
        )
        if len(value) <= COALESCE_LIMIT:
            self._transport.write(header + value)
        else:
            self._transport.writelines((header, value))
        return future

    def abandon(self) -> None:
        """Give up on this connection at once (fail closed): what is still in
        this side's buffers (the rest of a large value) is dropped, not sent
        late, and the connection is not used again. Bytes the node already
        received may still be applied when it wakes up: a late versioned write
        is refused by its write ticket's age (docs/protocol.md)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _fail_all(self, error: Exception) -> None:
        self.closed = True
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)


def abandon_if_cancelled(connection: Connection, future: asyncio.Future[Frame]) -> None:
    if future.cancelled():
        connection.abandon()
