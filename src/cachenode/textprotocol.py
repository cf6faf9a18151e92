"""The memcached text protocol subset as a pure codec: bytes in, commands out.

Supported: get, gets (several keys), set, add, delete, flush_all, stats (also
stats items, slabs and cachedump), version, quit; see docs/protocol.md.
``TextDecoder.next_command`` returns a command, ``None`` when it needs more
bytes, and raises ``ProtocolError`` only when the stream can no longer be
parsed (a line without end, a data block without its CRLF); a well-framed but
invalid line comes out as ``BadCommand``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial

from cachenode.errors import ProtocolError
from cachenode.protocol import MAX_KEY_LENGTH
from cachenode.streaminput import COLLECT_THRESHOLD, ReceiveBuffer, Value

MAX_LINE_LENGTH = 2048
MAX_UINT32 = (1 << 32) - 1
MAX_FLAGS = MAX_UINT32
CRLF = b"\r\n"

# memcached's one-word replies, each a line of its own.
STORED, NOT_STORED, DELETED, NOT_FOUND, END, OK, ERROR = (
    word + CRLF
    for word in (b"STORED", b"NOT_STORED", b"DELETED", b"NOT_FOUND", b"END", b"OK", b"ERROR")
)
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
# memcached's reply when it has no memory for an item: here, no room in the receive budget.
OUT_OF_MEMORY = b"SERVER_ERROR out of memory storing object\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
ILLEGAL_SLAB = b"CLIENT_ERROR Illegal slab id\r\n"
# memcached's slab class ids are below this; libmemcached's memcdump asks for
# each class in turn and takes ILLEGAL_SLAB as the end of them.
SLAB_CLASSES = 64
# memcached never sends more than this in one cachedump reply, END included.
MAX_CACHEDUMP_REPLY = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Retrieve:
    keys: list[bytes]
    with_cas: bool


def _retrieve(parts: list[bytes]) -> TextCommand:
    keys = parts[1:]
    if not keys:
        return BadCommand(ERROR)
    if max(map(len, keys)) > MAX_KEY_LENGTH:
        return BadCommand(BAD_FORMAT)
    return Retrieve(keys, parts[0] == b"gets")


@dataclass(frozen=True, slots=True)
class StoreCommand:
    only_if_absent: bool  # add rather than set
    key: bytes
    flags: int
    exptime: int
    value: Value
    noreply: bool


@dataclass(frozen=True, slots=True)
class OversizedStore:
    """A set/add whose data block the decoder refused to buffer; the block is skipped.

    It exceeds the decoder's limit or, when ``busy``, the receive budget had no room for it.
    """

    key: bytes
    length: int
    noreply: bool
    busy: bool = False


def _storage_fields(parts: list[bytes]) -> tuple[bytes, int, int, int, bool] | None:
    """key, flags, exptime, length, noreply of a set/add line; None when malformed."""
    if len(parts) not in (5, 6) or (len(parts) == 6 and parts[5] != b"noreply"):
        return None
    flags, exptime, length = _integer(parts[2]), _integer(parts[3]), _integer(parts[4])
    if flags is None or exptime is None or length is None:
        return None
    if not 0 <= flags <= MAX_FLAGS or length < 0:
        return None
    return parts[1], flags, exptime, length, len(parts) == 6


@dataclass(frozen=True, slots=True)
class Delete:
    """``delete <key> [0] [noreply]`` (the 0 is memcached's legacy time)."""

    key: bytes
    noreply: bool


def _delete(parts: list[bytes]) -> TextCommand:
    # memcached still accepts a legacy time argument of 0: "delete <key> 0".
    arguments, noreply = _arguments(parts)
    if not arguments or len(arguments) > 2 or (len(arguments) == 2 and arguments[1] != b"0"):
        return BadCommand(BAD_FORMAT)
    if len(arguments[0]) > MAX_KEY_LENGTH:
        return BadCommand(BAD_FORMAT)
    return Delete(arguments[0], noreply)


@dataclass(frozen=True, slots=True)
class FlushAll:
    """``flush_all [0] [noreply]``: a delay other than 0 is not supported (a ``BadCommand``)."""

    noreply: bool


def _flush_all(parts: list[bytes]) -> TextCommand:
    arguments, noreply = _arguments(parts)
    if len(arguments) > 1:
        return BadCommand(BAD_FORMAT)
    delay = _integer(arguments[0]) if arguments else 0
    if delay is None:
        return BadCommand(BAD_FORMAT)
    if delay:
        return BadCommand(client_error("flush_all with a delay is not supported"))
    return FlushAll(noreply)


@dataclass(frozen=True, slots=True)
class Stats:
    """``stats [<group>]``: ``group`` is empty for the general statistics,
    else items or slabs (cachedump comes out as ``CacheDump``)."""

    group: bytes


def _stats(parts: list[bytes]) -> TextCommand:
    if len(parts) > 1 and parts[1] == b"cachedump":
        return _cachedump(parts)
    return Stats(b" ".join(parts[1:]))


@dataclass(frozen=True, slots=True)
class CacheDump:
    """``stats cachedump <class> <limit>``: the keys of one slab class; limit 0 means all."""

    slab_class: int
    limit: int


def _cachedump(parts: list[bytes]) -> TextCommand:
    if len(parts) != 4:
        return BadCommand(BAD_FORMAT)
    slab_class, limit = _integer(parts[2]), _integer(parts[3])
    # memcached reads both as unsigned 32-bit numbers.
    if slab_class is None or limit is None:
        return BadCommand(BAD_FORMAT)
    if not (0 <= slab_class <= MAX_UINT32 and 0 <= limit <= MAX_UINT32):
        return BadCommand(BAD_FORMAT)
    if slab_class >= SLAB_CLASSES:
        return BadCommand(ILLEGAL_SLAB)
    return CacheDump(slab_class, limit)


@dataclass(frozen=True, slots=True)
class Version:
    """``version``: the memcached version this node answers as."""


@dataclass(frozen=True, slots=True)
class Quit:
    """``quit``: the node closes the connection."""


def _bare(command: TextCommand, parts: list[bytes]) -> TextCommand:
    """``command`` when its line is its name alone (version, quit)."""
    return command if len(parts) == 1 else BadCommand(ERROR)


@dataclass(frozen=True, slots=True)
class BadCommand:
    """A complete line that is not a valid command; ``reply`` is what memcached answers."""

    reply: bytes


TextCommand = (
    Retrieve
    | StoreCommand
    | OversizedStore
    | Delete
    | FlushAll
    | Stats
    | CacheDump
    | Version
    | Quit
    | BadCommand
)


def value_header(key: bytes, flags: int, length: int, cas: int | None = None) -> bytes:
    """The ``VALUE`` line that precedes a value's data block in a get reply."""
    if cas is None:
        return b"VALUE %s %d %d\r\n" % (key, flags, length)
    return b"VALUE %s %d %d %d\r\n" % (key, flags, length, cas)


def stats_reply(stats: Iterable[tuple[str, object]]) -> bytes:
    """A stats reply: a ``STAT <name> <value>`` line for each, then ``END``."""
    lines = [f"STAT {name} {value}\r\n".encode() for name, value in stats]
    return b"".join(lines) + END


def cachedump_reply(entries: Iterable[tuple[bytes, int, int]], limit: int) -> bytes:
    """A ``stats cachedump`` reply from (key, value length, expiry) entries.

    Like memcached's: at most ``limit`` lines (0: no limit), within
    ``MAX_CACHEDUMP_REPLY`` bytes. Keys with spaces or control characters,
    which the text protocol cannot name, are left out.
    """
    lines: list[bytes] = []
    size = len(END)
    for key, length, expiry in entries:
        if not _is_text_key(key):
            continue
        line = b"ITEM %s [%d b; %d s]\r\n" % (key, length, expiry)
        size += len(line)
        if size > MAX_CACHEDUMP_REPLY:
            break
        lines.append(line)
        if len(lines) == limit:
            break
    return b"".join(lines) + END


def client_error(message: str) -> bytes:
    return b"CLIENT_ERROR " + message.encode() + CRLF


def server_error(message: str) -> bytes:
    return b"SERVER_ERROR " + message.encode() + CRLF


class TextDecoder:
    """Splits a byte stream of memcached text commands into command objects."""

    def __init__(self, max_value_length: int) -> None:
        self.buffer = ReceiveBuffer()  # what was received: feed it, or ``feed`` here
        self.max_value_length = max_value_length  # may change between feeds
        # A collected value's CRLF comes through the buffer like any other bytes.
        self._collecting: StoreCommand | None = None  # the command whose value is collected

    def feed(self, data: bytes) -> None:
        self.buffer.feed(data)

    @property
    def idle(self) -> bool:
        """True when no partial command is buffered."""
        return self.buffer.idle

    def next_command(self) -> TextCommand | None:
        buffer = self.buffer
        if buffer.skipping:
            return None
        if self._collecting is not None:
            return self._collected_command()
        newline = buffer.find_line_end(MAX_LINE_LENGTH + 1)
        data, pos = buffer.peek()
        if newline < 0:
            if len(data) - pos > MAX_LINE_LENGTH:
                raise ProtocolError("line too long")
            return None
        line_end = newline + 1
        parts = bytes(data[pos:newline]).split()
        name = parts[0] if parts else b""
        if name == b"set" or name == b"add":
            return self._storage_command(parts, line_end)
        buffer.consume(line_end)
        parse = _PARSERS.get(name)
        return parse(parts) if parse is not None else BadCommand(ERROR)

    def _collected_command(self) -> TextCommand | None:
        """The set/add whose value was collected, once the value and its CRLF are in."""
        buffer = self.buffer
        data, pos = buffer.peek()
        if buffer.missing or len(data) - pos < len(CRLF):
            return None
        if data[pos : pos + len(CRLF)] != CRLF:
            raise ProtocolError("bad data chunk")
        buffer.consume(pos + len(CRLF))
        command, self._collecting = self._collecting, None
        assert command is not None
        return replace(command, value=buffer.collected())

    def _storage_command(self, parts: list[bytes], line_end: int) -> TextCommand | None:
        buffer = self.buffer
        data, _ = buffer.peek()
        fields = _storage_fields(parts)
        if fields is None:
            buffer.consume(line_end)
            return BadCommand(BAD_FORMAT)
        key, flags, exptime, length, noreply = fields
        if length > self.max_value_length or len(key) > MAX_KEY_LENGTH:
            buffer.skip(line_end, length + len(CRLF))
            if len(key) > MAX_KEY_LENGTH:
                return BadCommand(BAD_FORMAT)
            return OversizedStore(key, length, noreply)
        end = line_end + length
        if len(data) < end + len(CRLF):
            if length >= COLLECT_THRESHOLD and len(data) < end:
                if not buffer.collect(line_end, length):
                    buffer.skip(line_end, length + len(CRLF))
                    return OversizedStore(key, length, noreply, busy=True)
                self._collecting = StoreCommand(
                    parts[0] == b"add", key, flags, exptime, b"", noreply
                )
            return None
        if data[end : end + len(CRLF)] != CRLF:
            raise ProtocolError("bad data chunk")
        value = buffer.take(line_end, end)
        buffer.consume(end + len(CRLF))
        return StoreCommand(parts[0] == b"add", key, flags, exptime, value, noreply)


# The parser of each command's line but set and add, which carry a data block.
_PARSERS: dict[bytes, Callable[[list[bytes]], TextCommand]] = {
    b"get": _retrieve,
    b"gets": _retrieve,
    b"delete": _delete,
    b"flush_all": _flush_all,
    b"stats": _stats,
    b"version": partial(_bare, Version()),
    b"quit": partial(_bare, Quit()),
}


def _arguments(parts: list[bytes]) -> tuple[list[bytes], bool]:
    """The arguments of a command line after its name, but a final ``noreply``;
    and whether it ends so."""
    noreply = parts[-1] == b"noreply"
    return (parts[1:-1] if noreply else parts[1:]), noreply


def _is_text_key(key: bytes) -> bool:
    """True when ``key`` has no space or control byte, so a text line can carry it."""
    return bool(key) and min(key) > 0x20 and 0x7F not in key


def _integer(field: bytes) -> int | None:
    """A decimal integer as memcached reads it (no '+', '_' or spaces, unlike int())."""
    digits = field[1:] if field.startswith(b"-") else field
    if not digits.isdigit() or len(digits) > 20:
        return None
    return int(field)
