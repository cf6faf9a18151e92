"""What both protocols' sessions are: one connection's conversation with the node, without I/O.

A session takes the bytes a connection received and returns the buffers to
send back, in request order; ``closing`` turns true when the connection must
close once those are sent (a malformed stream, or ``quit``). The server picks
the session by the first byte a connection sends (``cachenode.server``): a
``BinarySession`` (cachenode.binarysession), a ``TextSession``
(cachenode.textsession), or a ``RefusedSession``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Protocol

from cachenode.node import Node
from cachenode.streaminput import ReceiveBuffer, Value

log = logging.getLogger(__name__)


class Session(Protocol):
    closing: bool

    @property
    def buffer(self) -> ReceiveBuffer:
        """What the session received: while its ``missing`` is not 0, a reader
        may receive those bytes in place (cachenode.inplace) and then ``answer``."""
        ...

    def receive(self, data: bytes) -> list[Value]: ...

    def answer(self) -> list[Value]:
        """The replies to what ``buffer`` holds now (bytes arrived in its value)."""
        ...


class Decoder(Protocol):
    """What a session needs of its protocol's decoder."""

    buffer: ReceiveBuffer
    max_value_length: int

    def feed(self, data: bytes) -> None: ...


class DecodingSession(ABC):
    """A session that answers, in order, what its protocol's decoder makes of the bytes."""

    def __init__(self, node: Node, decoder: Decoder) -> None:
        self._node = node
        self._decoder = decoder
        self.closing = False

    @property
    def buffer(self) -> ReceiveBuffer:
        return self._decoder.buffer

    def receive(self, data: bytes) -> list[Value]:
        """The replies to ``data``, decoded; a session's fast path may answer it first."""
        decoder = self._decoder
        decoder.max_value_length = self._node.store.max_item_size
        decoder.feed(data)
        return self.answer()

    @abstractmethod
    def answer(self) -> list[Value]:
        """The replies to everything decoded so far."""


class RefusedSession:
    """A connection this node does not serve: one reply, then it closes."""

    def __init__(self, reply: bytes) -> None:
        self._reply = reply
        self.buffer = ReceiveBuffer()
        self.closing = True

    def receive(self, data: bytes) -> list[Value]:
        log.warning("refused a connection: %s", self._reply.decode().strip())
        return [self._reply]

    def answer(self) -> list[Value]:
        return []


def refused_for_budget(buffer: ReceiveBuffer, length: int) -> str:
    """Log, once, a write ``buffer`` refused for want of room in its receive budget; say why."""
    budget = buffer.budget
    assert budget is not None, "only a budget refuses for want of room"
    message = (
        f"the node is receiving {budget.reserved} bytes of values at once, "
        f"at most {budget.limit()}: no room for {length} more, try again"
    )
    log.warning("refused a write: %s", message)
    return message
