"""The node's binary protocol as a pure codec (docs/protocol.md): bytes in, frames out.

No I/O here. ``FrameDecoder.feed`` takes bytes as they arrive;
``FrameDecoder.next_frame`` returns the next whole frame, ``None`` when it
needs more bytes, and raises ``ProtocolError`` (nothing else) when the bytes
cannot be a frame. The encoders return the bytes to send.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from enum import IntEnum

from cachenode.errors import ProtocolError
from cachenode.status import Status

# The key limit is the store's; the decoder refuses longer keys before reading them.
from cachenode.store import MAX_KEY_LENGTH as MAX_KEY_LENGTH
from cachenode.streaminput import COLLECT_THRESHOLD, ReceiveBuffer, Value

MAGIC_REQUEST = 0xCA
MAGIC_RESPONSE = 0xCB
# magic, opcode, status, key length, extras length, value length, request id, flags, version
HEADER = struct.Struct(">BBHHHIIIQ")
HEADER_SIZE = HEADER.size  # 28
# Values up to this size are sent in one buffer behind their header; bigger
# ones go out as a buffer of their own, so they are never copied.
COALESCE_LIMIT = 16 * 1024
# Extras sit between the header and the key: a write ticket (SET, ADD), or
# milliseconds (a read lease asked for and granted by CHECK; how long read
# leases still run, in the replies of DELETE and CLEAR).
MAX_EXTRAS_LENGTH = 32
TICKET = struct.Struct(">Q")
MILLISECONDS = struct.Struct(">I")
# A frame may never declare more; a node refuses values above its own maximum
# item size (default 16 MiB) with TOO_LARGE and skips them without buffering.
MAX_VALUE_LENGTH = 1 << 30
MAX_REQUEST_ID = (1 << 32) - 1
KEYS_ENTRY = struct.Struct(">HI")  # key length, counted size; then the key
DEFAULT_KEYS_COUNT = 1000
MAX_KEYS_COUNT = 10_000


class Opcode(IntEnum):
    GET = 0x01
    SET = 0x02
    ADD = 0x03
    DELETE = 0x04
    CLEAR = 0x05
    STATS = 0x06
    CONFIG = 0x07
    PING = 0x08
    KEYS = 0x09
    LEASE = 0x0A  # GET, and on a miss the right to fill the key (or LEASED)
    CHECK = 0x0B  # the version of the cached item, without its value
    RELEASE = 0x0C  # give a lease back without filling
    TICKET = 0x0D  # a write ticket: versioned writes must carry a recent one
    AUTH = 0x0E  # the node's token: first on every connection when the node has one
    UNCACHEABLE = 0x0F  # a miss no pool size can fix (flags: a MissKind); also releases
    LOOKUP = 0x10  # GET (a lookup), and on a miss LEASE's answer


class MissKind(IntEnum):
    """Why a miss was no miss a bigger pool could fix (the flags of UNCACHEABLE)."""

    NO_IMAGE = 1  # the key has no image: the load answered "not found"
    TOO_LARGE = 2  # the image is over the node's maximum item size: never cached


@dataclass(slots=True)
class Frame:
    """One request or response. ``opcode`` is a plain int so unknown ones can be answered."""

    opcode: int
    request_id: int
    key: bytes = b""
    value: Value = b""
    status: int = Status.OK
    flags: int = 0
    version: int = 0
    extras: bytes = b""


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A well-formed frame whose value the decoder refused to buffer; its body is skipped.

    Its value exceeds the decoder's limit or, when ``busy``, the receive
    budget had no room for it (the values of other frames take it all).
    """

    opcode: int
    request_id: int
    key: bytes
    value_length: int
    extras: bytes = b""
    busy: bool = False


def encode_frame(
    magic: int,
    opcode: int,
    request_id: int,
    key: bytes = b"",
    value: Value = b"",
    *,
    status: int = Status.OK,
    flags: int = 0,
    version: int = 0,
    extras: bytes = b"",
) -> bytes:
    """Header, extras, key and value as one bytes object.

    For big values use ``encode_header`` and send the value as its own buffer.
    """
    return (
        encode_header(magic, opcode, request_id, key, len(value), status, flags, version, extras)
        + value
    )


def encode_header(
    magic: int,
    opcode: int,
    request_id: int,
    key: bytes,
    value_length: int,
    status: int = Status.OK,
    flags: int = 0,
    version: int = 0,
    extras: bytes = b"",
) -> bytes:
    """Header, extras and key of a frame whose value the caller sends right after."""
    header = HEADER.pack(
        magic, opcode, status, len(key), len(extras), value_length, request_id, flags, version
    )
    return header + extras + key


# A request is a frame with the request magic (and status 0).
encode_request = functools.partial(encode_frame, MAGIC_REQUEST)


def encode_response(
    opcode: int,
    request_id: int,
    status: int = Status.OK,
    value: bytes = b"",
    *,
    key: bytes = b"",
    flags: int = 0,
    version: int = 0,
    extras: bytes = b"",
) -> bytes:
    return encode_frame(
        MAGIC_RESPONSE,
        opcode,
        request_id,
        key,
        value,
        status=status,
        flags=flags,
        version=version,
        extras=extras,
    )


def encode_keys_entries(entries: list[tuple[bytes, int]]) -> bytes:
    """The value of a KEYS response: each entry is key length, counted size, key."""
    pack = KEYS_ENTRY.pack
    return b"".join(pack(len(key), size) + key for key, size in entries)


def decode_keys_entries(value: Value) -> list[tuple[bytes, int]]:
    """Inverse of ``encode_keys_entries``; raises ProtocolError on a truncated value."""
    entries = []
    pos = 0
    while pos < len(value):
        if pos + KEYS_ENTRY.size > len(value):
            raise ProtocolError("truncated KEYS entry header")
        key_length, size = KEYS_ENTRY.unpack_from(value, pos)
        pos += KEYS_ENTRY.size
        if pos + key_length > len(value):
            raise ProtocolError("truncated KEYS entry key")
        entries.append((bytes(value[pos : pos + key_length]), size))
        pos += key_length
    return entries


class FrameDecoder:
    """Splits a byte stream into frames of one direction (requests or responses).

    ``max_value_length`` is the largest value to buffer; a bigger but legal
    frame comes out as ``OversizedFrame`` and its body is skipped as it
    arrives, so an oversized SET costs no memory and keeps the connection.
    So does a value to collect that its buffer's budget has no room for (``busy``).
    """

    def __init__(self, magic: int, max_value_length: int = MAX_VALUE_LENGTH) -> None:
        self.buffer = ReceiveBuffer()  # what was received: feed it, or ``feed`` here
        self._magic = magic
        self.max_value_length = max_value_length  # may change between feeds
        self._partial: Frame | None = None  # the frame whose value is being collected

    def feed(self, data: bytes) -> None:
        self.buffer.feed(data)

    @property
    def idle(self) -> bool:
        """True when every byte fed so far has come out as frames."""
        return self.buffer.idle

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        partial = self._partial
        # The header and key of a frame being collected were consumed with its first part.
        head = 0 if partial is None else HEADER_SIZE + len(partial.extras) + len(partial.key)
        return head + self.buffer.held

    def next_frame(self) -> Frame | OversizedFrame | None:
        buffer = self.buffer
        if self._partial is not None:
            if buffer.missing:
                return None
            frame, self._partial = self._partial, None
            frame.value = buffer.collected()
            return frame
        data, pos = buffer.peek()
        if buffer.skipping or len(data) - pos < HEADER_SIZE:
            return None
        (
            magic,
            opcode,
            status,
            key_length,
            extras_length,
            value_length,
            request_id,
            flags,
            version,
        ) = HEADER.unpack_from(data, pos)
        if (
            magic != self._magic
            or extras_length > MAX_EXTRAS_LENGTH
            or key_length > MAX_KEY_LENGTH
            or value_length > MAX_VALUE_LENGTH
        ):
            raise _header_error(self._magic, magic, extras_length, key_length, value_length)
        extras_start = pos + HEADER_SIZE
        key_start = extras_start + extras_length
        value_start = key_start + key_length
        end = value_start + value_length
        if len(data) < end:
            refused = value_length > self.max_value_length
            if len(data) < value_start or not (refused or value_length >= COLLECT_THRESHOLD):
                return None
        elif value_length <= self.max_value_length:
            key = bytes(data[key_start:value_start])  # of a bytes chunk: the slice itself
            extras = bytes(data[extras_start:key_start]) if extras_length else b""
            if value_length:
                value = buffer.take(value_start, end)
            else:
                value = b""
                buffer.consume(end)
            return Frame(opcode, request_id, key, value, status, flags, version, extras)
        else:
            refused = True
        key = bytes(data[key_start:value_start])
        extras = bytes(data[extras_start:key_start])
        if not refused and buffer.collect(value_start, value_length):
            self._partial = Frame(opcode, request_id, key, b"", status, flags, version, extras)
            return None
        buffer.skip(value_start, value_length)
        return OversizedFrame(opcode, request_id, key, value_length, extras, busy=not refused)


def _header_error(
    expected_magic: int, magic: int, extras_length: int, key_length: int, value_length: int
) -> ProtocolError:
    """What is wrong with a header that failed validation."""
    if magic != expected_magic:
        return ProtocolError(f"bad magic byte 0x{magic:02x}, expected 0x{expected_magic:02x}")
    if extras_length > MAX_EXTRAS_LENGTH:
        return ProtocolError(f"extras length {extras_length} exceeds {MAX_EXTRAS_LENGTH}")
    if key_length > MAX_KEY_LENGTH:
        return ProtocolError(f"key length {key_length} exceeds {MAX_KEY_LENGTH}")
    return ProtocolError(f"value length {value_length} exceeds {MAX_VALUE_LENGTH}")
