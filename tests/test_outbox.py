"""Every committed change reaches the cache nodes: the invalidation outbox.

A gateway that committed a change and died before telling the nodes left its
invalidation in the outbox; a running gateway process delivers it (its
background loop), after which no node serves what the change replaced. A
commit whose reply was lost is read back, and so acknowledged and delivered
like any other. The dead gateway here is the test itself, committing through
the catalog as that gateway did; the nodes and the delivering gateway are
real processes sharing the data folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from cachenode.client import NodeClient
from imagecache.blobs import FolderBlobStore
from imagecache.catalog import ImageCatalog, UploadCommit
from imagecache.database import Database
from imagecache.errors import StorageError
from imagecache.images import inspect_image
from tests.conftest import NodeProcess, image_bytes, start_node_process
from tests.processes import embedded_gateway, gateway_on_nodes, read_image, upload_image

OLD = image_bytes("PNG", (8, 8), "red")
NEW = image_bytes("PNG", (8, 8), "blue")
KEY = "cat"


def which(data: bytes) -> str:
    """Which of the test's images ``data`` is, for a message."""
    return {OLD: "OLD", NEW: "NEW"}.get(data, f"{len(data)} other bytes")


async def read(http: aiohttp.ClientSession, gateway: str, key: str) -> tuple[int, str]:
    """A read through the gateway: its status and which image it answered."""
    status, body = await read_image(http, gateway, key)
    return status, which(body) if status == 200 else body.decode(errors="replace")


# A gateway delivers what the outbox holds every second: a pending entry is
# gone within this long, even on a loaded machine.
DELIVERY_SECONDS = 6.0


@pytest.fixture
def two_nodes() -> Iterator[list[NodeProcess]]:
    nodes = [start_node_process("--capacity-mb", "16") for _ in range(2)]
    yield nodes
    for node in nodes:
        node.process.kill()
        node.stop()


def address(node: NodeProcess) -> str:
    return f"{node.host}:{node.port}"


def pending_invalidations(data_dir: Path) -> int:
    with contextlib.closing(
        sqlite3.connect(f"file:{data_dir / 'imagecache.db'}?mode=ro", uri=True, timeout=5)
    ) as connection:
        (count,) = connection.execute("SELECT count(*) FROM invalidations").fetchone()
    return int(count)


async def outbox_emptied(data_dir: Path) -> float:
    """Seconds until the outbox is empty; fails after DELIVERY_SECONDS."""
    started = time.monotonic()
    while pending_invalidations(data_dir):
        waited = time.monotonic() - started
        assert waited < DELIVERY_SECONDS, f"invalidations still pending after {waited:.1f} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def dead_gateway(data_dir: Path) -> AsyncIterator[tuple[ImageCatalog, FolderBlobStore]]:
    """The catalog and blob store of a gateway about to die: what it commits
    there is never delivered by it."""
    async with Database.open(f"sqlite+aiosqlite:///{data_dir / 'imagecache.db'}") as database:
        blobs = FolderBlobStore(data_dir / "blobs")
        await blobs.prepare()
        yield await ImageCatalog.open(database), blobs


async def commit_upload(
    catalog: ImageCatalog, blobs: FolderBlobStore, key: str, data: bytes
) -> UploadCommit:
    """An upload's steps up to its commit (which puts its invalidation in the outbox)."""
    info = inspect_image(data)
    name = uuid.uuid4().hex
    await catalog.begin_upload(name)
    await blobs.put(name, data, info.content_type)
    return await catalog.commit_upload(
        key, name, info.content_type, len(data), info.width, info.height
    )


async def test_a_gateway_delivers_the_invalidation_of_a_gateway_that_died_after_its_commit(
    tmp_path: Path, node_process: NodeProcess
) -> None:
    data_dir = tmp_path / "data"
    gateway = gateway_on_nodes(tmp_path, "gateway", [address(node_process)])
    try:
        await gateway.start()
        async with (
            aiohttp.ClientSession() as http,
            NodeClient(node_process.host, node_process.port) as node_client,
        ):
            assert await upload_image(http, gateway.url, KEY, OLD) == 200
            assert await read(http, gateway.url, KEY) == (200, "OLD")
            cached = await node_client.get_item(KEY.encode())
            assert cached is not None
            assert cached.value == OLD
            async with dead_gateway(data_dir) as (catalog, blobs):
                committed = await commit_upload(catalog, blobs, KEY, NEW)
            assert committed.invalidation.id, "the commit put nothing in the outbox"
            waited = await outbox_emptied(data_dir)
            for _ in range(2):
                assert await read(http, gateway.url, KEY) == (200, "NEW"), f"{waited:.1f} s after"
            cached = await node_client.get_item(KEY.encode())
            if cached is not None:
                assert (which(cached.value), cached.version) == ("NEW", committed.record.version)
    finally:
        await gateway.kill()


async def test_a_delete_all_of_a_gateway_that_died_before_delivering_it_empties_every_node(
    tmp_path: Path, two_nodes: list[NodeProcess]
) -> None:
    data_dir = tmp_path / "data"
    keys = [f"key-{number}" for number in range(8)]
    gateway = gateway_on_nodes(tmp_path, "gateway", [address(node) for node in two_nodes])
    try:
        await gateway.start()
        async with contextlib.AsyncExitStack() as stack:
            http = await stack.enter_async_context(aiohttp.ClientSession())
            clients = [
                await stack.enter_async_context(NodeClient(node.host, node.port))
                for node in two_nodes
            ]
            for key in keys:
                assert await upload_image(http, gateway.url, key, OLD) == 200
                assert await read(http, gateway.url, key) == (200, "OLD")
            items = [(await client.stats())["items"] for client in clients]
            assert sum(items) == len(keys)
            async with dead_gateway(data_dir) as (catalog, _):
                deleted, invalidation = await catalog.delete_all()
                assert invalidation.id, "the delete-all put nothing in the outbox"
                # Its delivery reached the first node, then the gateway died.
                await clients[0].clear(version=invalidation.version)
            assert len(deleted) == len(keys)
            waited = await outbox_emptied(data_dir)
            items = [(await client.stats())["items"] for client in clients]
            assert items == [0, 0], f"items left on the nodes after {waited:.1f} s"
            for key in keys:
                assert (await read(http, gateway.url, key))[0] == 404, key
    finally:
        await gateway.kill()


class LostReplyCatalog(ImageCatalog):
    """The real catalog, whose commits go through but whose replies are lost."""

    async def commit_upload(
        self, key: str, blob_name: str, content_type: str, size: int, width: int, height: int
    ) -> UploadCommit:
        await super().commit_upload(key, blob_name, content_type, size, width, height)
        raise StorageError(f"could not commit the upload of {key!r}: connection lost")


async def test_an_upload_whose_commit_reply_was_lost_is_acknowledged_and_delivered(
    tmp_path: Path, node_process: NodeProcess
) -> None:
    data_dir = tmp_path / "data"
    node = address(node_process)
    reader = gateway_on_nodes(tmp_path, "gateway", [node])
    try:
        await reader.start()
        async with (
            aiohttp.ClientSession() as http,
            NodeClient(node_process.host, node_process.port) as node_client,
            embedded_gateway(data_dir, [node], catalog_type=LostReplyCatalog) as writer,
        ):
            assert await upload_image(http, reader.url, KEY, OLD) == 200
            assert await read(http, reader.url, KEY) == (200, "OLD")  # cached there
            result = await writer.service.upload(KEY, NEW)  # committed: no StorageError
            record = await writer.catalog.get_image(KEY)
            assert record is not None
            assert record.version == result.record.version
            assert result.record.blob_name == record.blob_name
            cached = await node_client.get_item(KEY.encode())
            if cached is not None:
                assert (which(cached.value), cached.version) == ("NEW", record.version)
            assert await read(http, reader.url, KEY) == (200, "NEW")
            assert (await writer.service.read(KEY)).data == NEW
            # The reply was lost with the outbox entry's id: a gateway's loop takes it out.
            await outbox_emptied(data_dir)
    finally:
        await reader.kill()
