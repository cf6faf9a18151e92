"""The receive buffer both decoders own: received bytes, kept with as few copies as can be.

A decoder holds a ``ReceiveBuffer`` and reads it through its public API
(``peek``, ``consume``, ``take``, ``skip``, ``collect``), as h11's
connections own theirs. While everything fed before has been consumed, the
unconsumed input is the last fed chunk itself, so messages that arrive whole
are decoded without being copied into a buffer first; only a message split
across reads is gathered in a bytearray. A large value that arrives alone in
its chunk is not copied at all (``take``).

A large value that spans reads goes into one buffer of its final size
(``collect``), allocated without zeroing (``UNINITIALIZED_VALUE_BUFFERS``),
so that no byte of it is copied twice. A reader that owns its reads
(``cachenode.inplace``, for the node and its client) asks ``value_buffer``
where the ``missing`` bytes belong and receives them straight into the value:
the kernel's copy is then the only one, as in memcached. Bytes of a refused
value are dropped as they arrive (``skip``).

Such a buffer is reserved from a ``ReceiveBudget`` shared by all of a node's
connections before it is allocated: when the budget has no room the decoder
refuses the value and skips its bytes instead (docs/protocol.md, Limits).
A connection that goes away ``discard``s its buffer, which frees the value
and its reservation at once, whatever else still refers to the decoder.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import TypeAlias

# A value as decoded: bytes, or a read-only view of the chunk it arrived in
# (below) or of the buffer it was collected in. Nothing writes to either again.
Value: TypeAlias = bytes | memoryview

# Values at least this large are collected in a buffer of their own when they
# span reads (smaller ones are gathered with the rest of the input).
COLLECT_THRESHOLD = 64 * 1024
# A value at least this large that fills its chunk but for at most VIEW_SLACK
# bytes (a header, a command line) is kept as a view of the chunk rather than
# copied out of it: the chunk is a fresh bytes object already, and copying a
# 100 KB value once more, into memory cold in the CPU's caches, was a quarter
# of the node's time per SET. The slack bounds what a view keeps alive for
# nothing; a chunk of several values is copied from as before.
VIEW_MIN = 16 * 1024
VIEW_SLACK = 1024


# Value buffers are allocated without zeroing (below) when this is on: the
# node's CPU per 1 MB SET was 0.26 to 0.27 ms with it and 0.30 to 0.36 ms without
# (bench/node.py, --sizes 100K,1M, two rounds each; 100 KB SETs: 0.043 to
# 0.046 ms either way), because zeroing a buffer that is cold in the CPU's
# caches costs about as much as receiving into it. A micro-benchmark of the
# decoder alone, whose freed buffers stay warm, shows no difference. The one
# place that allocates them is ``ReceiveBuffer.collect``, which writes every
# byte before anything reads it (tests/test_inplace.py checks that no unwritten
# byte is ever stored or sent).
UNINITIALIZED_VALUE_BUFFERS = True


def uninitialized_bytearray() -> Callable[[int], bytearray]:
    """``bytearray(n)`` without zeroing it first. It calls CPython's
    ``PyByteArray_FromStringAndSize`` with NULL, which leaves the contents as
    allocated (as ``PyBytes_FromStringAndSize`` documents for bytes); anywhere
    else, plain bytearray. A private prototype leaves ``ctypes.pythonapi``'s
    shared function object as others may have typed it."""
    try:
        prototype = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)
        make = prototype(("PyByteArray_FromStringAndSize", ctypes.pythonapi))
    except (AttributeError, OSError):
        return bytearray
    return functools.partial(make, None)


# A buffer for a value of n bytes, to be written whole before it is read.
new_value_buffer: Callable[[int], bytearray] = (
    uninitialized_bytearray() if UNINITIALIZED_VALUE_BUFFERS else bytearray
)


class ReceiveBudget:
    """The bytes of values being collected across connections, capped at ``limit()``.

    Only values collected in a buffer of their own count (64 KiB or more,
    spanning reads): everything else a connection buffers is bounded by its
    size class and the line and read sizes. ``limit`` is asked at each
    reservation, so that it follows the node's settings as CONFIG changes them.
    """

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.reserved = 0  # bytes of the values being collected now
        self.refused = 0  # values refused for want of room, since start

    def reserve(self, count: int) -> bool:
        """Reserve ``count`` bytes; False, reserving nothing, when that would pass the limit."""
        if self.reserved + count > self.limit():
            self.refused += 1
            return False
        self.reserved += count
        return True

    def release(self, count: int) -> None:
        self.reserved -= count


class ReceiveBuffer:
    """The bytes a connection received and its decoder has not consumed yet.

    A decoder owns one and reads it through this API only. ``peek`` shows the
    unconsumed input as a buffer and the index where it starts; the other
    methods take indexes into that same buffer, which stays valid until the
    next ``feed``. Consuming is explicit: ``consume`` up to an index, ``take``
    a value, ``skip`` a refused value, or ``collect`` a large one that spans
    reads into a buffer of its own.
    """

    def __init__(self) -> None:
        self._data: bytes | bytearray = b""
        self._pos = 0
        self._skip = 0  # bytes of a refused value still to discard
        # What collected values are reserved from; set before the first feed
        # (the node's server sets its own). None collects any value.
        self.budget: ReceiveBudget | None = None
        self._value = bytearray()  # a large value being collected
        self._filled = 0  # bytes of it received so far
        self._collecting = False  # from collect() until collected()
        self.missing = 0  # bytes of it still to come: read them into value_buffer()

    def feed(self, data: bytes) -> None:
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        if self.missing:
            count = min(self.missing, len(data))
            with memoryview(data) as view:
                self._value[self._filled : self._filled + count] = view[:count]
            self.value_received(count)
            if count == len(data):
                return
            data = data[count:]
        if self._pos >= len(self._data):
            self._data = data
        elif isinstance(self._data, bytearray):
            del self._data[: self._pos]
            self._data += data
        else:
            self._data = bytearray(memoryview(self._data)[self._pos :])
            self._data += data
        self._pos = 0

    def peek(self) -> tuple[bytes | bytearray, int]:
        """The buffer holding the unconsumed input, and the index where that
        input starts in it; its bytes before that index are consumed. Only
        read it: it is valid until the next ``feed``."""
        return self._data, self._pos

    @property
    def idle(self) -> bool:
        """True when every byte fed has been consumed, none of a refused value
        is still to come and no value is being collected."""
        return self._pos >= len(self._data) and not self._skip and not self._collecting

    @property
    def skipping(self) -> bool:
        """True while bytes of a refused value are still to come (and be dropped)."""
        return self._skip > 0

    @property
    def held(self) -> int:
        """Bytes received and not consumed: the unconsumed input and the part
        of a value collected so far."""
        return self._filled + len(self._data) - self._pos

    def find_line_end(self, limit: int) -> int:
        """The index of the next LF within ``limit`` bytes of unconsumed
        input (the line's end is not included), or -1."""
        return self._data.find(b"\n", self._pos, self._pos + limit)

    def consume(self, end: int) -> None:
        """Consume the input up to index ``end``."""
        self._pos = end

    def take(self, start: int, end: int) -> Value:
        """The value at ``[start:end]``, consuming the input up to ``end``: a
        view of the chunk when that is worth it (VIEW_MIN), else a copy."""
        data = self._data
        self._pos = end
        if type(data) is bytes:
            if end - start >= VIEW_MIN and len(data) - (end - start) <= VIEW_SLACK:
                return memoryview(data)[start:end]
            return data[start:end]
        # A bytearray buffer changes later: its bytes are copied.
        with memoryview(data) as view:
            return bytes(view[start:end])

    def skip(self, start: int, length: int) -> None:
        """Drop the ``length`` bytes at ``start``, those still to come as they
        arrive, without buffering them; the input before ``start`` is consumed."""
        available = len(self._data) - start
        self._skip = max(0, length - available)
        self._pos = start + min(length, available)

    def collect(self, start: int, length: int) -> bool:
        """Start collecting the value of ``length`` bytes at ``start``, the
        rest of which is still to come; the input is consumed. False,
        consuming nothing, when the receive budget has no room for the value."""
        if self.budget is not None and not self.budget.reserve(length):
            return False
        self._value = new_value_buffer(length)
        with memoryview(self._data) as view:
            self._filled = len(view) - start
            self._value[: self._filled] = view[start:]
        self.missing = length - self._filled
        self._collecting = True
        self._data, self._pos = b"", 0
        return True

    def collected(self) -> Value:
        """The value collected, once nothing is missing (read-only from here on).
        Its reservation ends: from here on the store counts it, or nobody keeps it."""
        if self.budget is not None:
            self.budget.release(len(self._value))
        with memoryview(self._value) as view:
            value = view.toreadonly()
        self._value, self._filled, self._collecting = bytearray(), 0, False
        return value

    def value_buffer(self) -> memoryview:
        """Where the ``missing`` bytes of the large value being collected
        belong; a reader that receives into it reports them with ``value_received``."""
        return memoryview(self._value)[self._filled :]

    def value_received(self, count: int) -> None:
        self._filled += count
        self.missing -= count

    def discard(self) -> None:
        """Drop every byte held, a value being collected too, and give its
        reservation back: the connection is gone and feeds nothing more."""
        if self.budget is not None and self._value:
            self.budget.release(len(self._value))
        self._value, self._filled, self.missing, self._collecting = bytearray(), 0, 0, False
        self._data, self._pos, self._skip = b"", 0, 0
