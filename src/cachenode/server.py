"""The cache node's TCP server: feeds each connection's bytes to its session.

All protocol work happens in the sessions (``cachenode.sessions``); this
module picks a connection's session by its first byte, moves bytes, applies
back-pressure (per connection, and across connections through the receive
budget) and manages the listening socket's lifetime.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import ssl
from dataclasses import dataclass
from typing import cast

from cachenode.binarysession import BinarySession
from cachenode.inplace import receive_in_place
from cachenode.node import Node
from cachenode.protocol import MAGIC_REQUEST
from cachenode.sessions import RefusedSession, Session
from cachenode.store import DEFAULT_MAX_ITEM_SIZE, MIB, Policy, Store
from cachenode.streaminput import ReceiveBudget, Value
from cachenode.textsession import TextSession

log = logging.getLogger(__name__)


def session_for(first_byte: int, node: Node) -> Session:
    """The session that speaks the protocol a connection's first byte announces."""
    if first_byte == MAGIC_REQUEST:
        return BinarySession(node)
    if not node.text_protocol:
        return RefusedSession(b"SERVER_ERROR the text protocol is off on this node\r\n")
    return TextSession(node)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 11311
    capacity_mb: float = 64
    policy: Policy = Policy.LRU
    max_item_mb: float = DEFAULT_MAX_ITEM_SIZE / MIB
    token: str = ""  # clients must AUTH with it first (docs/protocol.md); "" : none
    text_protocol: bool | None = None  # None: on without a token, off with one
    tls_cert: str = ""  # a PEM certificate chain and its key: TLS on every connection
    tls_key: str = ""

    def tls_context(self) -> ssl.SSLContext | None:
        """The server side of TLS, when a certificate is set (it must load)."""
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key or None)
        return context

    def make_node(self) -> Node:
        store = Store(
            int(self.capacity_mb * MIB),
            self.policy,
            max_item_size=int(self.max_item_mb * MIB),
        )
        return Node(store, token=self.token.encode(), text_protocol=self.text_protocol)


def receive_limit(store: Store) -> int:
    """How many bytes of values a node may be receiving at once, across all
    its connections: twice its maximum item size, or a quarter of its
    capacity if that is more (docs/protocol.md, Limits).

    Each value of 64 KiB or more that spans reads gets a buffer of its full
    size when its header arrives, and without a bound, clients that send
    headers and hold back the rest could make the node allocate any amount.
    Twice the item size lets a value of the largest size in whenever nothing
    else is arriving, and one more beside a slow sender of such a value; a
    quarter of the capacity lets a big node take many ordinary fills at once
    (4,000 of 64 KiB on a 1 GiB node). So the process holds at most its
    capacity in items plus this in values arriving (plus what connections
    buffer below 64 KiB each), 1.25 times its capacity for a node of 128 MiB
    or more with the default item size.
    """
    return max(2 * store.max_item_size, store.capacity // 4)


class Connection(asyncio.Protocol):
    """One client connection; the protocol is chosen by its first byte."""

    def __init__(self, node: Node, connections: set[Connection], receiving: ReceiveBudget) -> None:
        self._node = node
        self._connections = connections
        self._receiving = receiving
        self._session: Session | None = None
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._connections.add(self)
        self._node.current_connections += 1
        self._node.total_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._node.current_connections -= 1
        # A session lives in a reference cycle (its handler table refers back
        # to it) that only the cyclic collector frees, maybe seconds and
        # gigabytes later: a value half received goes now, with its share of
        # the node's receive budget.
        if self._session is not None:
            self._session.buffer.discard()
            self._session = None
        self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        session = self._session
        if session is None:
            session = self._session = session_for(data[0], self._node)
            session.buffer.budget = self._receiving
        self._send(session, session.receive(data))
        if session.buffer.missing:  # the rest of a large value is on its way
            assert self.transport is not None
            receive_in_place(self.transport, self, session.buffer, self._answer)

    def _answer(self) -> None:
        """Reply to what the session's input holds after bytes arrived in place."""
        assert self._session is not None
        self._send(self._session, self._session.answer())

    def _send(self, session: Session, replies: list[Value]) -> None:
        transport = self.transport
        assert transport is not None
        if len(replies) == 1:
            transport.write(replies[0])
        elif replies:
            transport.writelines(replies)
        if session.closing:
            transport.close()

    # A client that pipelines requests without reading the replies must not
    # make the node buffer without bound: stop reading until it catches up.
    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.resume_reading()


class NodeServer:
    """A listening node; ``start`` binds (port 0 picks a free port), ``stop`` closes all."""

    def __init__(self, config: NodeConfig, node: Node | None = None) -> None:
        self.config = config
        self.node = node or config.make_node()
        # The limit follows the store's settings as CONFIG changes them.
        self.receiving = ReceiveBudget(functools.partial(receive_limit, self.node.store))
        self._connections: set[Connection] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "server not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self.node, self._connections, self.receiving),
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=1024,
            ssl=self.config.tls_context(),
        )

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        connections = list(self._connections)
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()
        # Closing completes on a later loop iteration; wait so that no socket
        # outlives the server.
        if connections:
            await asyncio.wait([c.lost for c in connections], timeout=5)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> NodeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve(config: NodeConfig) -> None:
    """Run a node until SIGTERM or SIGINT, then close every connection and return."""
    server = NodeServer(config)
    await server.start()
    host, port = server.address
    store = server.node.store
    # The manager and the tests read this line to learn the port (with --port 0).
    print(f"cachenode listening on {host}:{port}", flush=True)
    log.info(
        "capacity %.1f MB, policy %s, max item %.1f MB",
        store.capacity / MIB,
        store.policy.value,
        store.max_item_size / MIB,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        await server.stop()
        log.info("cachenode on %s:%d stopped", host, port)
