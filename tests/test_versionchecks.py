"""The fast path's CHECKs count on the node exactly the reads they let through.

A real node (in this process, over TCP) and a real pool: the CHECKs and their
counts are the node's own.
"""

from __future__ import annotations

import asyncio

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


async def test_waiting_requests_for_another_copy_are_not_counted_by_the_next_check(
    node_server: NodeServer,
) -> None:
    """Requests waiting for one CHECK may hold copies of different versions (a
    newer one was kept meanwhile): the CHECK names the newest and counts only
    the requests holding it; the others are not served, and their own reads
    count them."""
    host, port = node_server.address
    async with NodeClient(host, port) as writer:
        assert await writer.set(b"k", b"v2", flags=1, version=2, ticket=await writer.ticket())
    pool = CachePool(timeout=5.0)
    await pool.set_members([("n1", f"{host}:{port}")])
    try:
        assert await pool.members[0].client.check(b"other") is None  # a connection opened
        checks = VersionChecks(pool, 5.0, FastPathCounters())
        before = await node_hits(node_server)
        answers: dict[str, int | None] = {}
        done = asyncio.Event()

        def answer(name: str) -> VersionCallback:
            def told(version: int | None) -> None:
                answers[name] = version
                if len(answers) == 3:
                    done.set()

            return told

        assert checks.ask("k", 1, answer("first"))  # in flight, naming version 1
        assert checks.ask("k", 1, answer("old copy"))  # waiting for the next CHECK
        assert checks.ask("k", 2, answer("new copy"))
        async with asyncio.timeout(5):
            await done.wait()
        assert answers == {"first": 2, "old copy": 2, "new copy": 2}
        # Only "new copy" is served from its copy: one hit. The others read on.
        assert await node_hits(node_server) - before == 1
        checks.close()
    finally:
        await pool.close()


async def test_a_request_that_came_during_a_check_is_never_answered_by_it(
    node_server: NodeServer,
) -> None:
    """A request that arrives while a CHECK is in flight waits for one sent
    after it: an upload acknowledged in between may have outdated the first.
    When none can be sent (here the node is set aside before the first
    returns), it gets no word and reads the key the full way."""
    host, port = node_server.address
    async with NodeClient(host, port) as writer:
        assert await writer.set(b"k", b"v1", flags=1, version=1, ticket=await writer.ticket())
    pool = CachePool(timeout=5.0)
    await pool.set_members([("n1", f"{host}:{port}")])
    try:
        assert await pool.members[0].client.check(b"other") is None  # a connection opened
        checks = VersionChecks(pool, 5.0, FastPathCounters())
        answers: dict[str, int | None] = {}
        done = asyncio.Event()

        def answer(name: str) -> VersionCallback:
            def told(version: int | None) -> None:
                answers[name] = version
                if len(answers) == 2:
                    done.set()

            return told

        assert checks.ask("k", 1, answer("first"))  # in flight
        assert checks.ask("k", 1, answer("came later"))  # waits for the next
        pool.members[0].dirty = True  # no next CHECK can be sent to it
        async with asyncio.timeout(5):
            await done.wait()
        assert answers == {"first": 1, "came later": NO_ANSWER}
        checks.close()
    finally:
        await pool.close()
