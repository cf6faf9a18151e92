"""The input side both decoders share: received bytes, kept with as few copies as can be.

Unconsumed input starts at ``_pos`` in ``_data``. While everything fed before
has been consumed, ``_data`` is the last fed chunk itself, so messages that
arrive whole are decoded without being copied into a buffer first; only a
message split across reads is gathered in a bytearray. A large value that
arrives alone in its chunk is not copied at all (``_value_of``).

A large value that spans reads is kept as the chunks it arrives in and joined
once when complete (``_parts``, ``_missing``): growing a buffer would copy it
again at every read. A decoder that starts collecting sets ``_parts`` to what
it already has and ``_missing`` to the bytes still to come. Bytes of a refused
value are dropped as they arrive (``_skip``).
"""

from __future__ import annotations

from typing import TypeAlias

# A value as decoded: bytes, or a view of the chunk it arrived in (below).
Value: TypeAlias = bytes | memoryview

# Values at least this large are collected in parts when they span reads.
COLLECT_THRESHOLD = 64 * 1024
# A value at least this large that fills its chunk but for at most VIEW_SLACK
# bytes (a header, a command line) is kept as a view of the chunk rather than
# copied out of it: the chunk is a fresh bytes object already, and copying a
# 100 KB value once more, into memory cold in the CPU's caches, was a quarter
# of the node's time per SET. The slack bounds what a view keeps alive for
# nothing; a chunk of several values is copied from as before.
VIEW_MIN = 16 * 1024
VIEW_SLACK = 1024


class StreamInput:
    def __init__(self) -> None:
        self._data: bytes | bytearray = b""
        self._pos = 0
        self._skip = 0  # bytes of a refused value still to discard
        self._parts: list[bytes | memoryview] = []  # a large value's chunks so far
        self._missing = 0  # bytes of that value still to come

    def feed(self, data: bytes) -> None:
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        if self._missing:
            if len(data) <= self._missing:
                self._parts.append(data)
                self._missing -= len(data)
                return
            self._parts.append(memoryview(data)[: self._missing])
            data = data[self._missing :]
            self._missing = 0
        if self._pos >= len(self._data):
            self._data = data
        elif isinstance(self._data, bytearray):
            del self._data[: self._pos]
            self._data += data
        else:
            self._data = bytearray(memoryview(self._data)[self._pos :])
            self._data += data
        self._pos = 0

    def _value_of(self, data: bytes | bytearray, start: int, end: int) -> Value:
        """The value at ``data[start:end]``, as a view when that is worth it (above)."""
        if type(data) is bytes:
            if end - start >= VIEW_MIN and len(data) - (end - start) <= VIEW_SLACK:
                return memoryview(data)[start:end]
            return data[start:end]
        # A bytearray buffer changes later: its bytes are copied.
        with memoryview(data) as view:
            return bytes(view[start:end])
