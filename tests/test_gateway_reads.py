"""The read path: cache first, one blob read per miss, never stale, nodes may die."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.app import create_app
from imagecache.appkeys import POOL, SERVICE
from imagecache.config import Config
from tests.conftest import image_bytes, start_node_process

Client = TestClient[web.Request, web.Application]
PNG = image_bytes("PNG", (16, 16), "red")
GIF = image_bytes("GIF", (16, 16), "yellow")


def form(key: str, data: bytes) -> aiohttp.FormData:
    upload = aiohttp.FormData()
    upload.add_field("key", key)
    upload.add_field("file", data, filename="x.bin")
    return upload


async def upload(client: Client, key: str, data: bytes) -> None:
    response = await client.post("/api/upload", data=form(key, data))
    assert response.status == 200, await response.text()


async def test_image_endpoint_types_by_content_with_etag(gateway: Client) -> None:
    await upload(gateway, "looks.like.a.jpg", GIF)
    response = await gateway.get("/image/looks.like.a.jpg")
    assert response.status == 200
    assert response.content_type == "image/gif"
    assert await response.read() == GIF
    etag = response.headers["ETag"]
    assert response.headers["Cache-Control"] == "no-cache"
    again = await gateway.get("/image/looks.like.a.jpg", headers={"If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""
    await upload(gateway, "looks.like.a.jpg", PNG)
    changed = await gateway.get("/image/looks.like.a.jpg", headers={"If-None-Match": etag})
    assert changed.status == 200
    assert changed.content_type == "image/png"
    assert changed.headers["ETag"] != etag
    missing = await gateway.get("/image/nothing-here")
    assert missing.status == 404


async def test_concurrent_misses_of_one_key_read_the_blob_once(gateway: Client) -> None:
    await upload(gateway, "popular", PNG)
    await gateway.app[POOL].clear()  # the upload wrote through: make it a miss again
    service = gateway.app[SERVICE]
    before = service.blob_reads
    responses = await asyncio.gather(*(gateway.get("/image/popular") for _ in range(50)))
    bodies = [await response.read() for response in responses]
    assert bodies == [PNG] * 50
    assert service.blob_reads - before == 1
    # And the load filled the cache: later reads are hits.
    await gateway.get("/image/popular")
    assert service.blob_reads - before == 1


async def test_no_read_returns_an_image_older_than_the_last_acknowledged_upload(
    gateway: Client,
) -> None:
    versions = [image_bytes("PNG", (8, 8), (i * 13 % 256, i * 7 % 256, i)) for i in range(25)]
    index_of = {data: i for i, data in enumerate(versions)}
    await upload(gateway, "hot", versions[0])
    acknowledged: list[tuple[float, int]] = [(time.monotonic(), 0)]
    reads: list[tuple[float, int]] = []
    done = asyncio.Event()
    pool = gateway.app[POOL]

    async def writer() -> None:
        for i in range(1, len(versions)):
            await upload(gateway, "hot", versions[i])
            acknowledged.append((time.monotonic(), i))
            if i % 3 == 0:
                await pool.clear()  # force misses, so fills race with the next upload
        done.set()

    async def reader() -> None:
        while not done.is_set():
            started = time.monotonic()
            response = await gateway.get("/image/hot")
            assert response.status == 200
            reads.append((started, index_of[await response.read()]))

    await asyncio.gather(writer(), *(reader() for _ in range(8)))
    assert len(reads) > 100
    for started, seen in reads:
        newest_before = max(i for acked, i in acknowledged if acked <= started)
        assert seen >= newest_before, f"read at {started} saw {seen}, {newest_before} was acked"


async def test_a_node_killed_during_reads_fails_no_request(
    aiohttp_client: Any, gateway_config: Config
) -> None:
    node = start_node_process("--capacity-mb", "32")
    try:
        config = replace(
            gateway_config,
            gateway=replace(gateway_config.gateway, nodes=(f"{node.host}:{node.port}",)),
        )
        client: Client = await aiohttp_client(create_app(config))
        images = {f"img-{i}": image_bytes("PNG", (8, 8), (i, 0, 0)) for i in range(20)}
        for key, data in images.items():
            await upload(client, key, data)
        failures: list[str] = []
        served = 0

        async def reader(offset: int) -> None:
            nonlocal served
            deadline = time.monotonic() + 2.0
            i = offset
            while time.monotonic() < deadline:
                key = f"img-{i % 20}"
                response = await client.get(f"/image/{key}")
                if response.status != 200 or await response.read() != images[key]:
                    failures.append(f"{key}: {response.status}")
                served += 1
                i += 1

        async def killer() -> None:
            await asyncio.sleep(0.5)
            node.process.kill()

        await asyncio.gather(killer(), *(reader(n) for n in range(8)))
        assert failures == []
        assert served > 100
        assert client.app[POOL].counters.errors >= 1  # the node did fail under the load
    finally:
        node.process.kill()
        node.stop()
