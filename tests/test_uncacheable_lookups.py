"""Misses no pool size can fix are counted apart (issue 11): reads of keys with no
image, and of images over the node's maximum item size, against real node processes."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient
from PIL import Image as PILImage

from cachenode.client import LeaseGranted, LeaseHeld, NodeClient
from cachenode.errors import NodeReplyError
from cachenode.protocol import MissKind
from cachenode.status import Status
from imagecache.app import create_app
from imagecache.config import Config, with_data_dir
from manager.appkeys import AUTOSCALER, CONTROLLER
from manager.backends.base import NodeHandle
from manager.collector import Collector
from tests.conftest import DEAD_URL, NodeProcess, image_bytes, start_node_process
from tests.test_collector import Clock, MemoryMetrics
from tests.test_manager import running_system

Gateway = TestClient[web.Request, web.Application]
READS = 5


@pytest.fixture
def small_item_node() -> Iterator[NodeProcess]:
    """A node process that refuses items over 1 MiB."""
    node = start_node_process("--capacity-mb", "64", "--max-item-mb", "1")
    yield node
    node.process.kill()
    node.stop()


@pytest.fixture
async def node(small_item_node: NodeProcess) -> AsyncIterator[NodeClient]:
    async with NodeClient(small_item_node.host, small_item_node.port, timeout=2) as client:
        yield client


@pytest.fixture
async def gateway(
    aiohttp_client: Callable[[web.Application], Awaitable[Gateway]],
    tmp_path: Path,
    small_item_node: NodeProcess,
) -> Gateway:
    """A gateway whose only cache node is ``small_item_node``."""
    base = with_data_dir(Config(), tmp_path / "data")
    address = f"{small_item_node.host}:{small_item_node.port}"
    config = replace(base, gateway=replace(base.gateway, nodes=(address,), manager_url=DEAD_URL))
    return await aiohttp_client(create_app(config))


def noise_png(width: int, height: int) -> bytes:
    """A PNG of random pixels: it hardly compresses, so it is about 3 bytes a pixel."""
    image = PILImage.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


async def upload(gateway: Gateway, key: str, data: bytes) -> None:
    form = FormData()
    form.add_field("key", key)
    form.add_field("file", io.BytesIO(data), filename=f"{key}.png", content_type="image/png")
    async with gateway.post("/api/upload", data=form) as reply:
        assert reply.status == 200, await reply.text()


async def read(gateway: Gateway, key: str) -> int:
    async with gateway.post(f"/api/key/{key}") as reply:
        await reply.read()
        return reply.status


async def counters(node: NodeClient) -> dict[str, int]:
    stats: dict[str, Any] = await node.stats()
    names = ("lookups", "hits", "misses", "missing_lookups", "uncacheable_lookups")
    return {name: int(stats[name]) for name in names}


async def test_reads_of_a_key_with_no_image_are_missing_lookups_not_misses(
    gateway: Gateway, node: NodeClient
) -> None:
    before = await counters(node)
    for _ in range(READS):
        assert await read(gateway, "ghost") == 404
    after = await counters(node)
    assert after["missing_lookups"] - before["missing_lookups"] == READS
    assert after["misses"] == before["misses"]
    assert after["lookups"] == before["lookups"]
    assert after["uncacheable_lookups"] == before["uncacheable_lookups"]


async def test_reads_of_an_image_over_the_item_limit_are_uncacheable_lookups(
    gateway: Gateway, node: NodeClient
) -> None:
    data = noise_png(1000, 700)
    assert len(data) > 2 * 1024 * 1024 > 1 << 20  # over the node's 1 MiB, under the 20 MB upload
    await upload(gateway, "huge", data)
    before = await counters(node)
    for _ in range(READS):
        assert await read(gateway, "huge") == 200
    after = await counters(node)
    assert after["uncacheable_lookups"] - before["uncacheable_lookups"] == READS
    assert after["misses"] == before["misses"]
    assert after["lookups"] == before["lookups"]
    assert after["missing_lookups"] == before["missing_lookups"]


async def test_ordinary_misses_still_count_as_misses(gateway: Gateway, node: NodeClient) -> None:
    await upload(gateway, "small", image_bytes("PNG"))
    await node.clear()  # the upload wrote it through: make the next read miss
    before = await counters(node)
    assert await read(gateway, "small") == 200  # a miss, then filled
    assert await read(gateway, "small") == 200  # a hit
    after = await counters(node)
    assert after["misses"] - before["misses"] == 1
    assert after["hits"] - before["hits"] == 1
    assert after["lookups"] - before["lookups"] == 2
    assert after["missing_lookups"] == before["missing_lookups"]
    assert after["uncacheable_lookups"] == before["uncacheable_lookups"]


async def test_a_report_moves_only_misses_the_node_counted(node: NodeClient) -> None:
    """A client cannot drive the counters below zero, nor move a hit."""
    await node.uncacheable(b"never-read", MissKind.NO_IMAGE)
    assert await counters(node) == {
        "lookups": 0,
        "hits": 0,
        "misses": 0,
        "missing_lookups": 0,
        "uncacheable_lookups": 0,
    }


async def test_a_report_of_an_unknown_kind_is_refused_and_changes_nothing(
    node: NodeClient,
) -> None:
    assert await node.get(b"absent") is None
    with pytest.raises(NodeReplyError) as refused:
        await node.uncacheable(b"absent", 7)  # type: ignore[arg-type]
    assert refused.value.status is Status.INVALID_ARGUMENT
    assert await counters(node) == {
        "lookups": 1,
        "hits": 0,
        "misses": 1,
        "missing_lookups": 0,
        "uncacheable_lookups": 0,
    }


async def test_a_minute_of_only_404s_is_no_evidence_to_grow(tmp_path: Path) -> None:
    """End to end with a short clock: judging every 0.5 s over a 1 s window.

    A read the collector samples between its miss and the gateway's report
    counts as a miss in that sample (and moves out in the next): a window can
    be off by the reads in flight at its edges, one here, so minLookups 5."""
    async with running_system(
        tmp_path,
        collect_seconds=0.2,
        autoscale_seconds=0.5,
        rate_window_seconds=1.0,
        settle_seconds=1.0,
    ) as system:
        await system.api(
            "configure_cache", mode="auto", maxMiss="0.5", minMiss="0.1", minLookups="5"
        )
        autoscaler = system.manager.app[AUTOSCALER]
        judged_before = len(autoscaler.decisions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0
        reads = 0
        while loop.time() < deadline:
            async with system.http.post(system.gateway.make_url("/api/key/ghost")) as reply:
                assert reply.status == 404
            reads += 1
        assert reads > 20
        assert system.manager.app[CONTROLLER].size == 1, "the pool grew on reads of no image"
        judged = list(autoscaler.decisions)[: len(autoscaler.decisions) - judged_before]
        assert judged, "the autoscaler judged nothing in 3 s"
        assert all(not decision.resizes for _, decision in judged)
        assert all("no evidence" in decision.reason for _, decision in judged)


async def test_the_collector_counts_them_apart_and_sees_no_restart(
    small_item_node: NodeProcess, node: NodeClient
) -> None:
    """A miss moved out after a sample shrinks lookups and misses: that is no
    restart (which would count the node's lifetime totals again)."""
    await node.set(b"hot", b"x")
    for _ in range(3):
        assert await node.get(b"hot") == b"x"
    clock = Clock()
    metrics = MemoryMetrics()
    collector = Collector(metrics, clock=clock, window=timedelta(seconds=60))
    members = [NodeHandle("n1", f"{small_item_node.host}:{small_item_node.port}")]
    try:
        await collector.collect(members)  # the baseline
        assert await node.get(b"ghost") is None
        clock.advance(5)
        missed = await collector.collect(members)
        await node.uncacheable(b"ghost", MissKind.NO_IMAGE)
        assert await node.get(b"huge") is None
        await node.uncacheable(b"huge", MissKind.TOO_LARGE)
        clock.advance(5)
        moved = await collector.collect(members)
    finally:
        await collector.close()
    assert (missed.lookups, missed.misses, missed.missing, missed.uncacheable) == (1, 1, 0, 0)
    assert (moved.lookups, moved.hits, moved.misses) == (-1, 0, -1)
    assert (moved.missing, moved.uncacheable) == (1, 1)
    assert moved.requests == 1  # the GET of "huge" (that of "ghost" counted before)
    minute = collector.last_minute()
    assert minute is not None
    assert (minute.lookups, minute.misses, minute.missing, minute.uncacheable) == (0, 0, 1, 1)
    assert minute.requests == 2  # the GETs were answered all the same
    assert minute.miss_rate is None  # no evidence either way


async def test_a_report_ends_the_keys_lease_as_release_does(node: NodeClient) -> None:
    """The load that held the lease sends UNCACHEABLE instead of RELEASE: the
    other gateways must be able to load the key at once."""
    assert isinstance(await node.lease(b"ghost", 2.0), LeaseGranted)
    assert isinstance(await node.lease(b"ghost", 2.0), LeaseHeld)
    await node.uncacheable(b"ghost", MissKind.NO_IMAGE)
    assert isinstance(await node.lease(b"ghost", 2.0), LeaseGranted)


async def test_concurrent_reads_that_share_one_load_each_move_their_miss(
    gateway: Gateway, node: NodeClient
) -> None:
    """Readers that join one load each counted a miss on the node: each is
    moved, not only the one whose load found no image (or too large a one)."""
    await upload(gateway, "huge", noise_png(1000, 700))
    before = await counters(node)
    statuses = await asyncio.gather(
        *(read(gateway, key) for key in ["ghost"] * READS + ["huge"] * READS)
    )
    assert statuses == [404] * READS + [200] * READS
    after = await counters(node)
    assert after["missing_lookups"] - before["missing_lookups"] == READS
    assert after["uncacheable_lookups"] - before["uncacheable_lookups"] == READS
    assert (after["lookups"], after["misses"]) == (before["lookups"], before["misses"])
