"""The manager's /metrics: per-node memcached series and the pool's series.

A real manager with a local pool of node processes that require a token; the
answer is read with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cachenode.client import NodeAccess, NodeClient
from cachenode.protocol import MissKind
from cachenode.routing import parse_address
from cachenode.store import ITEM_OVERHEAD, MIB
from imagecache.config import Config, with_data_dir
from imagecache.database import Database
from manager.app import create_app as create_manager
from manager.appkeys import BACKEND, CONTROLLER, RECORDS
from manager.backends.base import NodeHandle
from manager.backends.local import LocalPool
from manager.prometheus import NODE_TIMEOUT
from manager.records import ManagerRecords
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import database_fixture, metadata_url_fixture  # noqa: F401
from tests.test_manager import free_port_range, running_system

GATEWAY_TOKEN = "gateway-token-for-tests"
NODE_TOKEN = "node-token-for-prometheus-tests"
NODE_SERIES = (
    "memcached_commands",
    "memcached_current_items",
    "memcached_current_bytes",
    "memcached_limit_bytes",
    "memcached_items_evicted",
    "imagecache_missing_lookups",
    "imagecache_uncacheable_lookups",
)


@dataclass
class Manager:
    server: TestServer
    http: ClientSession

    @property
    def members(self) -> list[NodeHandle]:
        return self.server.app[CONTROLLER].members

    async def configure(self, **params: str) -> None:
        async with self.http.post(
            self.server.make_url("/internal/configure_cache"),
            data=params,
            headers={"Authorization": f"Bearer {GATEWAY_TOKEN}"},
        ) as reply:
            assert reply.status == 200, await reply.text()

    async def scrape(self) -> dict[str, list[Sample]]:
        """The samples of /metrics by family name (counters without ``_total``)."""
        async with self.http.get(self.server.make_url("/metrics")) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain; version=")
            text = await reply.text()
        return {family.name: family.samples for family in text_string_to_metric_families(text)}


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    base = with_data_dir(Config(), tmp_path / "data")
    config = replace(
        base,
        node_token=NODE_TOKEN,
        gateway=replace(base.gateway, manager_token=GATEWAY_TOKEN),
        manager=replace(base.manager, password="correct horse", first_port=free_port_range()),
    )
    server = TestServer(create_manager(config), host="127.0.0.1")
    async with server, ClientSession() as http:
        yield Manager(server, http)


def client_of(node: NodeHandle) -> NodeClient:
    host, port = parse_address(node.address)
    return NodeClient(host, port, access=NodeAccess(NODE_TOKEN))


def by_node(samples: list[Sample]) -> dict[str, float]:
    return {sample.labels["node"]: sample.value for sample in samples}


def commands_of(samples: list[Sample], node_id: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["command"], s.labels["status"]): s.value
        for s in samples
        if s.labels["node"] == node_id
    }


@contextmanager
def paused(pids: list[int]) -> Iterator[None]:
    """The processes stopped (SIGSTOP): connections open, nothing answered."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


async def test_node_series_count_what_the_node_served(manager: Manager) -> None:
    # Two nodes of 1 MiB (the nodes require the token, so the scrape must send it).
    await manager.configure(numNodes="2", cacheSize="1")
    busy, idle = manager.members
    big, small = b"B" * 400_000, b"s" * 100
    async with client_of(busy) as node:
        for key in (b"big0", b"big1", b"big2"):  # 3 x 400 kB in 1 MiB: big0 is evicted
            assert await node.set(key, big)
        for key in (b"s0", b"s1", b"s2", b"s3"):
            assert await node.set(key, small)
        for key in (b"s0", b"s1", b"s2", b"s3", b"big0", b"ghost"):
            await node.get(key)
        assert await node.delete(b"s3")
        assert not await node.delete(b"ghost")

    families = await manager.scrape()

    assert by_node(families["memcached_up"]) == {
        busy.node_id: 1,
        idle.node_id: 1,
    }
    assert commands_of(families["memcached_commands"], busy.node_id) == {
        ("get", "hit"): 4,
        ("get", "miss"): 2,
        ("set", "hit"): 7,
        ("delete", "hit"): 1,
    }
    assert set(commands_of(families["memcached_commands"], idle.node_id).values()) == {0}
    assert all(s.name == "memcached_commands_total" for s in families["memcached_commands"])
    assert by_node(families["memcached_current_items"]) == {busy.node_id: 5, idle.node_id: 0}
    held = 2 * (4 + len(big) + ITEM_OVERHEAD) + 3 * (2 + len(small) + ITEM_OVERHEAD)
    assert by_node(families["memcached_current_bytes"]) == {busy.node_id: held, idle.node_id: 0}
    assert by_node(families["memcached_limit_bytes"]) == {busy.node_id: MIB, idle.node_id: MIB}
    assert by_node(families["memcached_items_evicted"]) == {busy.node_id: 1, idle.node_id: 0}
    assert families["imagecache_nodes"][0].value == 2


async def test_reads_no_pool_size_can_fix_are_counted_per_node(manager: Manager) -> None:
    await manager.configure(numNodes="2")
    busy, idle = manager.members
    async with client_of(busy) as node:
        for key in (b"ghost", b"ghost", b"huge"):
            assert await node.get(key) is None
        before = await manager.scrape()
        # What a gateway reports once the loads said "no image" and "too large".
        await node.uncacheable(b"ghost", MissKind.NO_IMAGE)
        await node.uncacheable(b"ghost", MissKind.NO_IMAGE)
        await node.uncacheable(b"huge", MissKind.TOO_LARGE)
        after = await manager.scrape()

    assert by_node(before["imagecache_missing_lookups"]) == {busy.node_id: 0, idle.node_id: 0}
    assert by_node(before["imagecache_uncacheable_lookups"]) == {busy.node_id: 0, idle.node_id: 0}
    assert by_node(after["imagecache_missing_lookups"]) == {busy.node_id: 2, idle.node_id: 0}
    assert by_node(after["imagecache_uncacheable_lookups"]) == {busy.node_id: 1, idle.node_id: 0}
    assert all(
        s.name == "imagecache_missing_lookups_total" for s in after["imagecache_missing_lookups"]
    )
    # Every get that missed stays a miss to memcached's series: a counter never goes down.
    for families in (before, after):
        assert commands_of(families["memcached_commands"], busy.node_id)[("get", "miss")] == 3


async def test_reads_of_a_key_with_no_image_through_a_gateway_are_counted(
    tmp_path: Path,
) -> None:
    reads = 4
    async with running_system(tmp_path) as system:
        for _ in range(reads):
            async with system.http.post(system.gateway.make_url("/api/key/ghost")) as reply:
                assert reply.status == 404
        scrape = Manager(system.manager, system.http).scrape
        # The gateway tells the node after it answers: wait for it, briefly.
        deadline = time.monotonic() + 5
        while True:
            families = await scrape()
            missing = sum(s.value for s in families["imagecache_missing_lookups"])
            if missing == reads or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)

    assert missing == reads
    assert sum(s.value for s in families["imagecache_uncacheable_lookups"]) == 0
    misses = [s.value for s in families["memcached_commands"] if s.labels["status"] == "miss"]
    assert sum(misses) == reads


async def test_a_node_that_does_not_answer_shows_only_up_0(manager: Manager) -> None:
    await manager.configure(numNodes="4")
    backend = manager.server.app[BACKEND]
    assert isinstance(backend, LocalPool)
    pids = backend.process_ids()
    answering, *silent = manager.members

    with paused([pids[node.node_id] for node in silent]):
        started = time.monotonic()
        families = await manager.scrape()
        elapsed = time.monotonic() - started

    # Read at once: three silent nodes cost one timeout, not three.
    assert elapsed < 2.5 * NODE_TIMEOUT, elapsed
    assert by_node(families["memcached_up"]) == {
        answering.node_id: 1,
        **{node.node_id: 0 for node in silent},
    }
    for name in NODE_SERIES:
        assert {s.labels["node"] for s in families[name]} == {answering.node_id}, name
    # Once they answer again, so do their series.
    families = await manager.scrape()
    assert set(by_node(families["memcached_up"]).values()) == {1}
    assert len(by_node(families["memcached_current_items"])) == 4


async def test_resizes_are_counted_by_cause(manager: Manager) -> None:
    families = await manager.scrape()
    assert {s.labels["cause"]: s.value for s in families["imagecache_resizes"]} == {
        "manual": 0,
        "automatic": 0,
        "failed": 0,
    }
    await manager.configure(numNodes="2")  # manual, through the API
    await manager.configure(numNodes="1")
    controller = manager.server.app[CONTROLLER]
    # The autoscaler's resizes carry its cause ("autoscaler: <reason>").
    await controller.resize(2, "autoscaler: miss rate 0.9 above 0.5", 0.9)
    await manager.server.app[RECORDS].add_activity(2, 2, "failed: could not start a node", None)

    families = await manager.scrape()

    assert {s.labels["cause"]: s.value for s in families["imagecache_resizes"]} == {
        "manual": 2,
        "automatic": 1,
        "failed": 1,
    }
    assert all(s.name == "imagecache_resizes_total" for s in families["imagecache_resizes"])
    assert families["imagecache_nodes"][0].value == 2


async def test_no_predicted_miss_ratio_without_a_prediction(manager: Manager) -> None:
    families = await manager.scrape()
    assert "imagecache_predicted_miss_ratio" not in families
    assert families["imagecache_nodes"][0].value == 1
    assert set(by_node(families["memcached_up"]).values()) == {1}


async def test_resize_kinds_are_counted_on_sqlite_and_mariadb(database: Database) -> None:
    records = await ManagerRecords.open(database)
    assert await records.count_resizes() == {"manual": 0, "automatic": 0, "failed": 0}
    for cause in (
        "configure_cache (API)",
        "manual expand by 2 (dashboard)",
        "manual: not the autoscaler: but named after it",
        "autoscaler: miss rate 90% > maxMiss",
        "autoscaler: miss rate 1% < minMiss",
        "autoscaler: miss rate 95% > maxMiss",
        "failed: could not start a node",
    ):
        await records.add_activity(1, 2, cause, None)
    assert await records.count_resizes() == {"manual": 3, "automatic": 3, "failed": 1}
