"""Receiving the rest of a large value straight into its buffer, for the node
and its client alike.

An asyncio protocol gets every read as a new bytes object, and a value that
spans reads is then copied once more into its own buffer. While such a value
is on its way, the connection's transport is handed to an ``InPlaceReader``:
its reads land in the value's buffer (``StreamInput.value_buffer``), so the
kernel's copy is the value's only one, as memcached receives its items. When
the value is complete the transport goes back to the connection's protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cachenode.streaminput import StreamInput


class InPlaceReader(asyncio.BufferedProtocol):
    """Stands in for ``owner`` while its input misses part of a large value;
    ``decode`` is the owner's handling of what its input holds then."""

    def __init__(self, owner: asyncio.Protocol, decode: Callable[[], None]) -> None:
        self._owner = owner
        self._decode = decode
        self._stream = StreamInput()
        self._transport: asyncio.Transport | None = None

    def take_over(self, transport: asyncio.Transport, stream: StreamInput) -> None:
        """Receive in place while ``stream`` misses the rest of a value (the
        bytes fed last began it), then give ``transport`` back to the owner."""
        if stream.missing and not transport.is_closing():
            self._stream = stream
            self._transport = transport
            transport.set_protocol(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._stream.value_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._stream.value_received(nbytes)
        self._decode()
        transport = self._transport
        if not self._stream.missing and transport is not None and not transport.is_closing():
            transport.set_protocol(self._owner)

    # Everything else that happens meanwhile is the owner's business.

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._owner.pause_writing()

    def resume_writing(self) -> None:
        self._owner.resume_writing()

    def eof_received(self) -> bool | None:
        return self._owner.eof_received()
