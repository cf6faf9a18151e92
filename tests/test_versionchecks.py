"""The fast path's CHECKs: what they count on the node, and whom they answer.

A real node (in this process, over TCP) and a real pool: the CHECKs and their
counts are the node's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from cachenode.client import NodeClient
from cachenode.server import NodeServer
from imagecache.cachepool import CachePool
from imagecache.fastpath import FastPathCounters
from imagecache.versionchecks import NO_ANSWER, VersionCallback, VersionChecks


async def node_hits(node_server: NodeServer) -> int:
    host, port = node_server.address
    async with NodeClient(host, port) as client:
        hits = (await client.stats())["hits"]
    assert isinstance(hits, int)
    return hits


@contextlib.asynccontextmanager
async def checks_of(
    node_server: NodeServer, version: int
) -> AsyncIterator[tuple[VersionChecks, CachePool]]:
    """Version checks over a pool of ``node_server`` alone (and the pool),
    the node holding the key "k" at ``version``, a connection open to it."""
    host, port = node_server.address
    async with NodeClient(host, port) as writer:
        ticket = await writer.ticket()
        assert await writer.set(b"k", b"v", flags=1, version=version, ticket=ticket)
    pool = CachePool(timeout=5.0)
    await pool.set_members([("n1", f"{host}:{port}")])
    try:
        assert await pool.members[0].client.check(b"other") is None  # a connection opened
        checks = VersionChecks(pool, 5.0, FastPathCounters())
        yield checks, pool
        checks.close()
    finally:
        await pool.close()


class Answers:
    """What the CHECKs told each named request, once ``expected`` were told."""

    def __init__(self, expected: int) -> None:
        self.told: dict[str, int | None] = {}
        self._expected = expected
        self._all = asyncio.Event()

    def to(self, name: str) -> VersionCallback:
        def told(version: int | None) -> None:
            self.told[name] = version
            if len(self.told) == self._expected:
                self._all.set()

        return told

    async def all(self) -> dict[str, int | None]:
        async with asyncio.timeout(5):
            await self._all.wait()
        return self.told


async def test_waiting_requests_for_another_copy_are_not_counted_by_the_next_check(
    node_server: NodeServer,
) -> None:
    """Requests waiting for one CHECK may hold copies of different versions (a
    newer one was kept meanwhile): the CHECK names the newest and counts only
    the requests holding it; the others are not served, and their own reads
    count them."""
    async with checks_of(node_server, version=2) as (checks, _):
        before = await node_hits(node_server)
        answers = Answers(3)
        assert checks.ask("k", 1, answers.to("first"))  # in flight, naming version 1
        assert checks.ask("k", 1, answers.to("old copy"))  # waiting for the next CHECK
        assert checks.ask("k", 2, answers.to("new copy"))
        assert await answers.all() == {"first": 2, "old copy": 2, "new copy": 2}
        # Only "new copy" is served from its copy: one hit. The others read on.
        assert await node_hits(node_server) - before == 1


async def test_a_request_that_came_during_a_check_is_never_answered_by_it(
    node_server: NodeServer,
) -> None:
    """A request that arrives while a CHECK is in flight waits for one sent
    after it: an upload acknowledged in between may have outdated the first.
    When none can be sent (here the node is set aside before the first
    returns), it gets no word and reads the key the full way."""
    async with checks_of(node_server, version=1) as (checks, pool):
        answers = Answers(2)
        assert checks.ask("k", 1, answers.to("first"))  # in flight
        assert checks.ask("k", 1, answers.to("came later"))  # waits for the next
        pool.members[0].dirty = True  # no next CHECK can be sent to it
        assert await answers.all() == {"first": 1, "came later": NO_ANSWER}
