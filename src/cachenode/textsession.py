"""The memcached text protocol session (docs/protocol.md): command lines in, reply bytes out."""

from __future__ import annotations

import logging

from cachenode import textprotocol as text
from cachenode.errors import ProtocolError, StoreError
from cachenode.node import Node
from cachenode.protocol import COALESCE_LIMIT, MAX_KEY_LENGTH
from cachenode.sessions import DecodingSession, refused_for_budget
from cachenode.status import Status
from cachenode.streaminput import Value

log = logging.getLogger(__name__)


class TextSession(DecodingSession):
    """Commands of the memcached text protocol subset, answered in order."""

    def __init__(self, node: Node) -> None:
        self.input = text.TextDecoder(node.store.max_item_size)
        super().__init__(node, self.input)

    def receive(self, data: bytes) -> list[Value]:
        decoder = self.input
        # Fast path for one whole "get <keys>" line per read, as a client that
        # waits on each reply sends it: no buffering, no command object.
        if (
            data[:4] == b"get "
            and len(data) <= text.MAX_LINE_LENGTH + 1
            and data.find(b"\n") == len(data) - 1
            and decoder.idle
        ):
            keys = data[4:].split()
            if keys and max(map(len, keys)) <= MAX_KEY_LENGTH:
                out: list[Value] = []
                self._retrieve(keys, False, out)
                return out
        return super().receive(data)

    def answer(self) -> list[Value]:
        decoder = self.input
        out: list[Value] = []
        try:
            while not self.closing and (command := decoder.next_command()) is not None:
                self._apply(command, out)
        except ProtocolError as error:
            log.warning("malformed text command, closing the connection: %s", error)
            out.append(text.client_error(str(error)))
            self.closing = True
        return out

    def _apply(self, command: text.TextCommand, out: list[Value]) -> None:
        store = self._node.store
        match command:
            case text.Retrieve(keys, with_cas):
                self._retrieve(keys, with_cas, out)
            case text.StoreCommand(only_if_absent, key, flags, exptime, value, noreply):
                reply = self._store(only_if_absent, key, flags, exptime, value)
                if not noreply:
                    out.append(reply)
            case text.OversizedStore(key, length, noreply, busy):
                self._node.leases.release(key)
                if busy:
                    refused_for_budget(self.buffer, length)
                if not noreply:
                    out.append(text.OUT_OF_MEMORY if busy else text.TOO_LARGE)
            case text.Delete(key, noreply):
                found = store.delete(key)
                self._node.leases.release(key)
                if not noreply:
                    out.append(text.DELETED if found else text.NOT_FOUND)
            case text.FlushAll(noreply):
                store.clear()
                self._node.leases.clear()
                if not noreply:
                    out.append(text.OK)
            case text.Stats(group):
                stats = self._node.memcached_stats(group)
                out.append(text.ERROR if stats is None else text.stats_reply(stats))
            case text.CacheDump(slab_class, limit):
                out.append(text.cachedump_reply(self._node.cache_dump(slab_class), limit))
            case text.Version():
                out.append(b"VERSION " + self._node.memcached_version.encode() + text.CRLF)
            case text.Quit():
                self.closing = True
            case text.BadCommand(reply):
                log.info("bad text command: %s", bytes(reply).decode(errors="replace").strip())
                out.append(reply)

    def _retrieve(self, keys: list[bytes], with_cas: bool, out: list[Value]) -> None:
        store = self._node.store
        for key in keys:
            item = store.get(key)
            if item is not None:
                value = item.value
                cas = item.version if with_cas else None
                header = text.value_header(key, item.flags, len(value), cas)
                if len(value) <= COALESCE_LIMIT:
                    out.append(header + value + text.CRLF)
                else:
                    out += (header, value, text.CRLF)
        out.append(text.END)

    def _store(
        self, only_if_absent: bool, key: bytes, flags: int, exptime: int, value: Value
    ) -> bytes:
        store = self._node.store
        expires_at = self._node.expiry_time(exptime)
        self._node.leases.release(key)
        try:
            if only_if_absent:
                stored = store.add(key, value, flags=flags, expires_at=expires_at)
                return text.STORED if stored is not None else text.NOT_STORED
            store.set(key, value, flags=flags, expires_at=expires_at)
            return text.STORED
        except StoreError as error:
            if error.status is Status.TOO_LARGE:
                return text.TOO_LARGE
            return text.client_error(str(error))
