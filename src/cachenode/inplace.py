"""Receiving the rest of a large value straight into its buffer, for the node
and its client alike.

An asyncio protocol gets every read as a new bytes object, and a value that
spans reads is then copied once more into its own buffer. While such a value
is on its way, the connection's transport is handed to an in-place reader:
its reads land in the value's buffer (``StreamInput.value_buffer``), so the
kernel's copy is the value's only one, as memcached receives its items. When
the value is complete the transport goes back to the connection's protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cachenode.streaminput import StreamInput


def receive_in_place(
    transport: asyncio.Transport,
    owner: asyncio.Protocol,
    stream: StreamInput,
    decode: Callable[[], None],
) -> None:
    """Receive the rest of the value ``stream`` misses (the bytes fed last
    began it) in place, calling ``decode`` after each read, then give
    ``transport`` back to ``owner``. Nothing to do when nothing is missing."""
    if stream.missing and not transport.is_closing():
        # Only the transport holds the reader: no cycle keeps a closed
        # connection, or the value it was receiving, alive.
        transport.set_protocol(_InPlaceReader(transport, owner, stream, decode))


class _InPlaceReader(asyncio.BufferedProtocol):
    """Stands in for ``owner`` while ``stream`` misses part of a large value."""

    def __init__(
        self,
        transport: asyncio.Transport,
        owner: asyncio.Protocol,
        stream: StreamInput,
        decode: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._owner = owner
        self._stream = stream
        self._decode = decode

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._stream.value_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._stream.value_received(nbytes)
        self._decode()
        if not self._stream.missing and not self._transport.is_closing():
            self._transport.set_protocol(self._owner)

    # Everything else that happens meanwhile is the owner's business.

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._owner.pause_writing()

    def resume_writing(self) -> None:
        self._owner.resume_writing()

    def eof_received(self) -> bool | None:
        return self._owner.eof_received()
