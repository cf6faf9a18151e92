"""Receiving the rest of a large value straight into its buffer, for the node
and its client alike.

An asyncio protocol gets every read as a new bytes object, and a value that
spans reads is then copied once more into its own buffer. While such a value
is on its way, the connection's transport is handed to an in-place reader:
its reads land in the value's buffer (``ReceiveBuffer.value_buffer``), so the
kernel's copy is the value's only one, as memcached receives its items. When
the value is complete the transport goes back to the connection's protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from cachenode.streaminput import ReceiveBuffer


def receive_in_place(
    transport: asyncio.Transport,
    owner: asyncio.Protocol,
    buffer: ReceiveBuffer,
    decode: Callable[[], None],
) -> None:
    """Receive the rest of the value ``buffer`` misses (the bytes fed last
    began it) in place, calling ``decode`` after each read, then give
    ``transport`` back to ``owner``. Nothing to do when nothing is missing."""
    if buffer.missing and not transport.is_closing():
        # Only the transport holds the reader: no cycle keeps a closed
        # connection, or the value it was receiving, alive.
        transport.set_protocol(_InPlaceReader(transport, owner, buffer, decode))


@dataclass(slots=True)
class _InPlaceReader(asyncio.BufferedProtocol):
    """Stands in for ``owner`` while ``buffer`` misses part of a large value."""

    transport: asyncio.Transport
    owner: asyncio.Protocol
    buffer: ReceiveBuffer
    decode: Callable[[], None]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer.value_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.buffer.value_received(nbytes)
        self.decode()
        if not self.buffer.missing and not self.transport.is_closing():
            self.transport.set_protocol(self.owner)

    # Everything else that happens meanwhile is the owner's business.

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()

    def eof_received(self) -> bool | None:
        return self.owner.eof_received()
