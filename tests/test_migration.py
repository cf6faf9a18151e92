"""Resizes move the keys whose owner changed, and only those: the cache stays warm."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp

from cachenode.client import NodeClient
from cachenode.routing import Ring, parse_address
from imagecache.appkeys import SERVICE
from manager.appkeys import CONTROLLER
from manager.backends.base import NodeHandle
from tests.conftest import image_bytes
from tests.test_manager import System, running_system

IMAGES = {f"img-{i:03d}": image_bytes("PNG", (24, 24), (i, 255 - i, 7)) for i in range(60)}


async def keys_on(node: NodeHandle) -> set[bytes]:
    host, port = parse_address(node.address)
    async with NodeClient(host, port) as client:
        return {key async for key, _ in client.iter_keys()}


async def stats_of(node: NodeHandle) -> dict[str, int]:
    host, port = parse_address(node.address)
    async with NodeClient(host, port) as client:
        return await client.stats()


async def upload_all(system: System) -> None:
    for key, data in IMAGES.items():
        form = aiohttp.FormData()
        form.add_field("key", key)
        form.add_field("file", data, filename=f"{key}.png")
        async with system.http.post(system.gateway.make_url("/api/upload"), data=form) as reply:
            assert reply.status == 200


async def assert_each_key_only_on_its_owner(system: System) -> None:
    members = system.manager.app[CONTROLLER].members
    ring = Ring([n.node_id for n in members])
    placed: dict[bytes, str] = {}
    for node in members:
        for key in await keys_on(node):
            assert key not in placed, f"{key!r} is on {placed[key]} and {node.node_id}"
            assert ring.owner(key) == node.node_id, f"{key!r} is on a node that does not own it"
            placed[key] = node.node_id
        stats = await stats_of(node)
        assert stats["bytes"] <= stats["capacity"]
    assert set(placed) == {key.encode() for key in IMAGES}, "a resize lost cached keys"


async def test_grow_and_shrink_move_the_keys_to_their_new_owners(tmp_path: Path) -> None:
    async with running_system(tmp_path, collect_seconds=5) as system:
        await upload_all(system)
        controller = system.manager.app[CONTROLLER]
        for size in (3, 2, 4, 1):
            before = len(controller.members)
            await system.api("configure_cache", numNodes=str(size))
            report = controller.last_migration
            assert report is not None
            assert report.copied == report.moved > 0
            # Only keys whose owner changed moved: about 1 - before/after of them on a grow.
            if size > before:
                assert report.moved < len(IMAGES) * (1 - before / size) * 1.6 + 5
            await assert_each_key_only_on_its_owner(system)
        # Reads after all that are hits: nothing had to come from the blob store.
        service = system.gateway.app[SERVICE]
        reads_before = service.blob_reads
        for key, data in IMAGES.items():
            async with system.http.post(system.gateway.make_url(f"/api/key/{key}")) as reply:
                assert reply.status == 200
                assert base64.b64decode((await reply.json())["content"]) == data
        assert service.blob_reads == reads_before


async def test_a_shrink_within_capacity_keeps_the_counted_bytes_in_bounds(tmp_path: Path) -> None:
    async with running_system(tmp_path, collect_seconds=5) as system:
        await system.api("configure_cache", numNodes="3", cacheSize="0.05")  # 52 KB per node
        await upload_all(system)  # more than one node can hold
        await system.api("configure_cache", numNodes="1")
        (node,) = system.manager.app[CONTROLLER].members
        stats = await stats_of(node)
        assert 0 < stats["bytes"] <= stats["capacity"] == int(0.05 * (1 << 20))
