"""The node's binary protocol session (docs/protocol.md): request frames in, reply bytes out."""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Callable

from cachenode.errors import CacheNodeError, InvalidConfig, InvalidKey, ProtocolError
from cachenode.leases import DEFAULT_LEASE_SECONDS, MAX_LEASE_SECONDS
from cachenode.node import Node
from cachenode.nodeconfig import apply_config, current_config
from cachenode.protocol import (
    COALESCE_LIMIT,
    DEFAULT_KEYS_COUNT,
    HEADER,
    HEADER_SIZE,
    MAGIC_REQUEST,
    MAGIC_RESPONSE,
    MAX_KEY_LENGTH,
    MAX_KEYS_COUNT,
    MILLISECONDS,
    TICKET,
    Frame,
    FrameDecoder,
    MissKind,
    Opcode,
    OversizedFrame,
    encode_keys_entries,
    encode_response,
)
from cachenode.sessions import DecodingSession, refused_for_budget
from cachenode.status import Status
from cachenode.store import Item
from cachenode.streaminput import Value

log = logging.getLogger(__name__)

_GET = int(Opcode.GET)
_GET_BYTE = bytes([_GET])
_OK = int(Status.OK)
_ADD = int(Opcode.ADD)
# Opcodes whose requests may carry extras: a write ticket, or a read lease's time.
_TAKES_EXTRAS = frozenset({int(Opcode.SET), int(Opcode.ADD), int(Opcode.CHECK)})


class BinarySession(DecodingSession):
    """Requests of the binary protocol (docs/protocol.md), answered in order."""

    def __init__(self, node: Node) -> None:
        self.input = FrameDecoder(MAGIC_REQUEST, node.store.max_item_size)
        super().__init__(node, self.input)
        # A node with a token answers nothing before an AUTH that carries it.
        self._authenticated = not node.token
        self._handlers: dict[int, Callable[[Frame], list[Value]]] = {
            Opcode.AUTH: self._auth,
            Opcode.GET: self._get,
            Opcode.SET: self._write,
            Opcode.ADD: self._write,
            Opcode.DELETE: self._delete,
            Opcode.CLEAR: self._clear,
            Opcode.STATS: self._stats,
            Opcode.CONFIG: self._config,
            Opcode.PING: self._ping,
            Opcode.KEYS: self._keys,
            Opcode.LEASE: self._lease,
            Opcode.LOOKUP: self._lookup,
            Opcode.CHECK: self._check,
            Opcode.RELEASE: self._release,
            Opcode.TICKET: self._ticket,
            Opcode.UNCACHEABLE: self._uncacheable,
        }

    def receive(self, data: bytes) -> list[Value]:
        decoder = self.input
        # Fast path for what a client waiting on each reply sends: one whole
        # GET per read. It halves the node's Python time per small GET; any
        # other shape (pipelined, split, or not a plain GET) takes the decoder.
        if (
            data[1:2] == _GET_BYTE
            and decoder.idle
            and len(data) >= HEADER_SIZE
            and self._authenticated
        ):
            magic, _, _, key_length, extras_length, value_length, request_id, _, _ = (
                HEADER.unpack_from(data)
            )
            if (
                magic == MAGIC_REQUEST
                and not extras_length
                and not value_length
                and key_length <= MAX_KEY_LENGTH
                and len(data) == HEADER_SIZE + key_length
            ):
                return self._get_reply(data[HEADER_SIZE:], request_id)
        return super().receive(data)

    def answer(self) -> list[Value]:
        decoder = self.input
        out: list[Value] = []
        try:
            while (frame := decoder.next_frame()) is not None:
                if not self._authenticated:
                    out.append(self._authenticate(frame))
                    if self.closing:
                        break
                    continue
                if isinstance(frame, OversizedFrame):
                    # A refused write ends the key's lease like any other.
                    self._node.leases.release(frame.key)
                    out.append(self._refusal(frame))
                    continue
                handler = self._handlers.get(frame.opcode)
                if frame.extras and handler is not None and frame.opcode not in _TAKES_EXTRAS:
                    message = f"opcode 0x{frame.opcode:02x} takes no extras"
                    out.append(
                        _bad_request(
                            frame.opcode, frame.request_id, Status.INVALID_ARGUMENT, message
                        )
                    )
                    continue
                if handler is None:
                    message = f"unknown opcode 0x{frame.opcode:02x}"
                    out.append(
                        _bad_request(frame.opcode, frame.request_id, Status.UNKNOWN_OPCODE, message)
                    )
                    continue
                try:
                    out += handler(frame)
                except CacheNodeError as error:
                    out.append(_error(frame.opcode, frame.request_id, error.status, str(error)))
        except ProtocolError as error:
            log.warning("malformed binary request, closing the connection: %s", error)
            out.append(_error(0, 0, Status.MALFORMED, str(error)))
            self.closing = True
        return out

    def _refusal(self, frame: OversizedFrame) -> bytes:
        """The reply to a write whose value the decoder refused to buffer."""
        if frame.busy:
            message = refused_for_budget(self.buffer, frame.value_length)
            return _error(frame.opcode, frame.request_id, Status.BUSY, message)
        message = (
            f"value of {frame.value_length} bytes exceeds the maximum item size "
            f"of {self._node.store.max_item_size} bytes"
        )
        return _error(frame.opcode, frame.request_id, Status.TOO_LARGE, message)

    def _authenticate(self, frame: Frame | OversizedFrame) -> Value:
        """The reply to the first request of a connection to a node with a token."""
        if (
            isinstance(frame, Frame)
            and frame.opcode == Opcode.AUTH
            and hmac.compare_digest(bytes(frame.value), self._node.token)
        ):
            self._authenticated = True
            return encode_response(Opcode.AUTH, frame.request_id)
        log.warning("a binary connection did not authenticate with the node's token: closing it")
        self.closing = True
        message = "this node requires AUTH with its token before anything else"
        return _error(frame.opcode, frame.request_id, Status.UNAUTHORIZED, message)

    def _auth(self, frame: Frame) -> list[Value]:
        # Authenticated already, or a node without a token: nothing to check.
        return [encode_response(Opcode.AUTH, frame.request_id)]

    def _get(self, frame: Frame) -> list[Value]:
        return self._get_reply(frame.key, frame.request_id)

    def _get_reply(self, key: bytes, request_id: int) -> list[Value]:
        return self._item_reply(_GET, self._node.store.get(key), request_id)

    def _item_reply(self, opcode: int, item: Item | None, request_id: int) -> list[Value]:
        if item is None:
            return [encode_response(opcode, request_id, Status.NOT_FOUND)]
        value = item.value
        # Plain ints: packing enum members costs a conversion each on the hot path.
        header = HEADER.pack(
            MAGIC_RESPONSE,
            opcode,
            _OK,
            0,
            0,
            len(value),
            request_id,
            item.flags,
            item.version,
        )
        if len(value) <= COALESCE_LIMIT:
            return [header + value]
        return [header, value]

    # Any write or delete of a key ends its lease, whatever its outcome: a
    # refused fill must let the next client that asks load the key.

    def _refused_write(self, frame: Frame) -> list[Value] | None:
        """The reply refusing a versioned write whose ticket is missing or too old.

        Such a write may carry a version that an invalidation has replaced
        since its client read it, and whose tombstone is gone (docs/protocol.md).
        """
        if not frame.version:
            return None
        if len(frame.extras) != TICKET.size:
            if frame.extras:
                raise InvalidKey(f"a write ticket is {TICKET.size} bytes, not {len(frame.extras)}")
            reason = b"a versioned write needs a write ticket (TICKET or LEASE)"
        elif self._node.store.ticket_is_valid(TICKET.unpack(frame.extras)[0]):
            return None
        else:
            reason = b"write ticket expired or from another incarnation of the node"
        self._node.leases.release(frame.key)
        return [encode_response(frame.opcode, frame.request_id, Status.NOT_STORED, value=reason)]

    def _write(self, frame: Frame) -> list[Value]:
        """SET, or ADD: stored only while the key holds no item."""
        if (refused := self._refused_write(frame)) is not None:
            return refused
        store = self._node.store
        write: Callable[..., Item | None] = store.add if frame.opcode == _ADD else store.set
        try:
            item = write(frame.key, frame.value, flags=frame.flags, version=frame.version)
        finally:
            self._node.leases.release(frame.key)
        if item is None:
            return [encode_response(frame.opcode, frame.request_id, Status.NOT_STORED)]
        return [encode_response(frame.opcode, frame.request_id, version=item.version)]

    def _delete(self, frame: Frame) -> list[Value]:
        try:
            found = self._node.store.delete(frame.key, frame.version)
        finally:
            self._node.leases.release(frame.key)
        status = Status.OK if found else Status.NOT_FOUND
        left = self._node.read_leases.seconds_left(frame.key, frame.version)
        return [encode_response(Opcode.DELETE, frame.request_id, status, extras=_ms(left))]

    def _clear(self, frame: Frame) -> list[Value]:
        self._node.store.clear(frame.version)
        self._node.leases.clear()
        left = self._node.read_leases.seconds_left_on_any()
        return [encode_response(Opcode.CLEAR, frame.request_id, extras=_ms(left))]

    def _lease(self, frame: Frame) -> list[Value]:
        # Not a lookup: the client's GET before it counted the miss, and
        # asking again while another client loads is no new request.
        if not frame.key:  # NOT_FOUND would read as a granted lease
            raise InvalidKey("key is empty")
        item = self._node.store.peek(frame.key)
        if item is not None:
            self._node.leases.found += 1
            return self._item_reply(frame.opcode, item, frame.request_id)
        return self._lease_reply(frame)

    def _lookup(self, frame: Frame) -> list[Value]:
        # A GET (a lookup, counted) that answers a miss as LEASE does: a
        # cache miss's first round trip is also its lease's.
        if not frame.key:  # NOT_FOUND would read as a granted lease
            raise InvalidKey("key is empty")
        item = self._node.store.get(frame.key)
        if item is not None:
            return self._item_reply(frame.opcode, item, frame.request_id)
        return self._lease_reply(frame)

    def _lease_reply(self, frame: Frame) -> list[Value]:
        """A missing key's lease: granted (NOT_FOUND, with the fill's ticket) or LEASED."""
        seconds = min(frame.flags / 1000 or DEFAULT_LEASE_SECONDS, MAX_LEASE_SECONDS)
        left = self._node.leases.acquire(frame.key, seconds)
        if not left:  # granted, with the ticket its fill needs
            ticket = self._node.store.ticket()
            return [
                encode_response(frame.opcode, frame.request_id, Status.NOT_FOUND, version=ticket)
            ]
        return [
            encode_response(
                frame.opcode, frame.request_id, Status.LEASED, flags=math.ceil(left * 1000)
            )
        ]

    def _check(self, frame: Frame) -> list[Value]:
        # A hit counts as many lookups as the reads the CHECK answers (flags);
        # a miss counts none: those reads go on to a GET, which counts them.
        # So does a CHECK naming another version than the item's (the
        # client's copy is outdated: it reads the key anew); 0 names none.
        item = self._node.store.peek(frame.key)
        if item is None:
            return [encode_response(Opcode.CHECK, frame.request_id, Status.NOT_FOUND)]
        if frame.version in (0, item.version):
            self._node.store.count_hits(max(1, frame.flags))
        granted = b""
        if frame.extras:
            if len(frame.extras) != MILLISECONDS.size:
                raise InvalidKey(f"a read lease time is {MILLISECONDS.size} bytes")
            asked = MILLISECONDS.unpack(frame.extras)[0] / 1000
            granted = _ms(self._node.read_leases.grant(frame.key, item.version, asked), up=False)
        return [
            encode_response(
                Opcode.CHECK,
                frame.request_id,
                flags=item.flags,
                version=item.version,
                extras=granted,
            )
        ]

    def _ticket(self, frame: Frame) -> list[Value]:
        ticket = self._node.store.ticket()
        return [encode_response(Opcode.TICKET, frame.request_id, version=ticket)]

    def _release(self, frame: Frame) -> list[Value]:
        self._node.leases.release(frame.key)
        return [encode_response(Opcode.RELEASE, frame.request_id)]

    def _uncacheable(self, frame: Frame) -> list[Value]:
        # The load behind a counted miss found no image, or one too large to
        # cache: no pool size makes that a hit, so it leaves ``misses`` (what
        # the autoscaler grows on). It ends the key's lease like RELEASE, so a
        # gateway that held it needs no second request.
        if frame.flags not in tuple(MissKind):
            message = f"UNCACHEABLE flags must be 1 (no image) or 2 (too large), not {frame.flags}"
            return [_bad_request(frame.opcode, frame.request_id, Status.INVALID_ARGUMENT, message)]
        self._node.leases.release(frame.key)
        self._node.store.count_unfixable_miss(too_large=frame.flags == MissKind.TOO_LARGE)
        return [encode_response(Opcode.UNCACHEABLE, frame.request_id)]

    def _stats(self, frame: Frame) -> list[Value]:
        body = json.dumps(self._node.stats()).encode()
        return [encode_response(Opcode.STATS, frame.request_id, value=body)]

    def _config(self, frame: Frame) -> list[Value]:
        if frame.value:
            apply_config(self._node, frame.value)
        return [encode_response(Opcode.CONFIG, frame.request_id, value=current_config(self._node))]

    def _ping(self, frame: Frame) -> list[Value]:
        return [
            encode_response(
                Opcode.PING,
                frame.request_id,
                value=self._node.version.encode(),
                version=self._node.store.boot_id,
            )
        ]

    def _keys(self, frame: Frame) -> list[Value]:
        try:
            cursor = int(frame.key) if frame.key else None
        except ValueError:
            raise InvalidConfig(f"bad KEYS cursor {frame.key!r}") from None
        count = min(frame.flags or DEFAULT_KEYS_COUNT, MAX_KEYS_COUNT)
        entries, next_cursor = self._node.store.scan(cursor, count)
        resume = str(next_cursor).encode() if next_cursor else b""
        return [
            encode_response(
                Opcode.KEYS, frame.request_id, value=encode_keys_entries(entries), key=resume
            )
        ]


def _ms(seconds: float, *, up: bool = True) -> bytes:
    """``seconds`` as the extras of milliseconds: rounded up for a time to wait
    out, down for a lease granted, so that neither side is ever short."""
    ms = math.ceil(seconds * 1000) if up else math.floor(seconds * 1000)
    return MILLISECONDS.pack(ms)


def _error(opcode: int, request_id: int, status: Status, message: str) -> bytes:
    return encode_response(opcode, request_id, status, value=message.encode())


def _bad_request(opcode: int, request_id: int, status: Status, message: str) -> bytes:
    """The reply to a request that is wrong in itself, with its one log line."""
    log.info("bad request: %s", message)
    return _error(opcode, request_id, status, message)
