"""The least a Python server does to answer an image cache's miss: the floor under bench/misses.py.

Run by bench/misses.py, not by hand. One process on uvloop, no framework,
no coroutine: per ``GET /image/<key>`` it reads the key's row from the
gateway's own SQLite file (one prepared point query, in the loop), asks
memcached for the key (``--memcached``: text protocol over one of a few
connections kept open, answered by callback), reads the blob file with one
``pread`` and writes the head and the bytes; with ``--fill`` it then stores
the bytes in memcached with ``set ... noreply``, as a cache that admits
every miss (LRU, random eviction) must. A value memcached holds is served
from there.

There are no versions, leases, tickets, single flight, timeouts, metrics,
hand-overs or error handling: it is not a server to use but a lower bound on
what any Python server doing these steps costs, measured beside nginx and
the gateway on the same files, the same core and the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
from collections import deque
from collections.abc import Callable, Sequence
from itertools import cycle
from pathlib import Path
from typing import Final, cast

import uvloop

ROW_QUERY: Final = "SELECT blob_name, content_type FROM images WHERE key = ?"
MEMCACHED_CONNECTIONS: Final = 4
READY: Final = "floor server listening on port"  # and the port, when given 0
END: Final = b"END\r\n"

# What a memcached GET answers: the value, or None on a miss.
Answer = Callable[[bytes | None], None]


class Memcached(asyncio.Protocol):
    """One connection to memcached: GETs answered in order, fills without replies."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[Answer] = deque()
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get(self, key: bytes, answer: Answer) -> None:
        assert self.transport is not None
        self.waiting.append(answer)
        self.transport.write(b"get %s\r\n" % key)

    def fill(self, key: bytes, value: bytes) -> None:
        assert self.transport is not None
        self.transport.writelines(
            (b"set %s 0 0 %d noreply\r\n" % (key, len(value)), value, b"\r\n")
        )

    def connection_lost(self, exc: Exception | None) -> None:
        stop(f"memcached closed a connection ({exc or 'at its end'})")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            self.answer_waiting()
        except (ValueError, IndexError) as error:
            head = bytes(self.buffer[:80])
            stop(f"memcached sent what a GET's reply cannot be ({error}): {head!r}")

    def answer_waiting(self) -> None:
        while self.waiting:
            if self.buffer.startswith(END):
                del self.buffer[: len(END)]
                self.waiting.popleft()(None)
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            # VALUE <key> <flags> <bytes>\r\n<data>\r\nEND\r\n
            length = int(self.buffer[:line_end].split()[3])
            start = line_end + 2
            if len(self.buffer) < start + length + 2 + len(END):
                return
            value = bytes(self.buffer[start : start + length])
            del self.buffer[: start + length + 2 + len(END)]
            self.waiting.popleft()(value)


def stop(reason: str) -> None:
    """End the process at once: a floor that went wrong must not be measured."""
    print(f"floor server: {reason}", file=sys.stderr, flush=True)
    os._exit(1)


class FloorServer:
    """What every connection shares: the database, the blob folder, memcached."""

    def __init__(
        self, database: Path, blobs: Path, memcached: Sequence[Memcached], fill: bool
    ) -> None:
        self.rows = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        self.blobs = str(blobs)
        self.memcached = cycle(memcached) if memcached else None
        self.fill = fill


class FloorConnection(asyncio.Protocol):
    """One client connection: a request at a time, in order."""

    def __init__(self, server: FloorServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # an answer still on its way is dropped (``answer``)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.next_request()

    def next_request(self) -> None:
        head_end = self.buffer.find(b"\r\n\r\n")
        if self.busy or head_end < 0:
            return
        key = self.buffer[: self.buffer.find(b"\r\n")].split(b" ")[1].rpartition(b"/")[2]
        self.buffer = self.buffer[head_end + 4 :]
        self.busy = True
        memcached = self.server.memcached
        if memcached is None:
            self.answer(key, None)
        else:
            via = next(memcached)
            via.get(key, lambda value: self.answer(key, value, via))

    def answer(self, key: bytes, cached: bytes | None, via: Memcached | None = None) -> None:
        if self.transport is None:  # the client left (wrk, at the end of a run)
            return
        server = self.server
        row = server.rows.execute(ROW_QUERY, (key.decode(),)).fetchone()
        if row is None:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        else:
            blob_name, content_type = row
            if cached is not None:
                body = cached
            else:
                fd = os.open(os.path.join(server.blobs, blob_name[:2], blob_name), os.O_RDONLY)
                try:
                    body = os.pread(fd, os.fstat(fd).st_size, 0)
                finally:
                    os.close(fd)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
                content_type.encode(),
                len(body),
            )
            self.transport.writelines((head, body))
            if server.fill and cached is None and via is not None:
                via.fill(key, body)
        self.busy = False
        self.next_request()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    connections: list[Memcached] = []
    for _ in range(MEMCACHED_CONNECTIONS if args.memcached else 0):
        _, protocol = await loop.create_connection(Memcached, "127.0.0.1", args.memcached)
        connections.append(protocol)
    server = FloorServer(args.database, args.blobs, connections, args.fill)
    listening = await loop.create_server(
        lambda: FloorConnection(server), "127.0.0.1", args.port, backlog=1024
    )
    print(READY, listening.sockets[0].getsockname()[1], flush=True)
    await listening.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--database", type=Path, required=True, help="the gateway's SQLite file")
    parser.add_argument("--blobs", type=Path, required=True, help="the gateway's blob folder")
    parser.add_argument("--memcached", type=int, default=0, help="memcached's port (0: none)")
    parser.add_argument("--fill", action="store_true", help="store every miss in memcached")
    args = parser.parse_args(argv)
    if args.fill and not args.memcached:
        parser.error("--fill needs --memcached")
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
