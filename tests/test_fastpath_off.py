"""gateway.fast_path: on by default; off, aiohttp answers every request.

Real ``imagecache gateway`` processes over a real node process, configured
only through their environment (IMAGECACHE_FAST_PATH), as an operator would.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from imagecache.config import load_config
from imagecache.webguards import SECURITY_HEADERS
from tests.conftest import NodeProcess, image_bytes
from tests.processes import PartProcess, gateway_on_nodes
from tests.test_fastpath import get
from tests.test_fastpath_headers import raw_exchange

PNG = image_bytes("PNG", color="purple")


@asynccontextmanager
async def gateway_process(
    root: Path, node: NodeProcess, **settings: str
) -> AsyncIterator[PartProcess]:
    gateway = gateway_on_nodes(root, "gateway", [f"{node.host}:{node.port}"])
    gateway.environment.update(settings)
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.kill()


async def metrics(http: aiohttp.ClientSession, gateway: PartProcess) -> dict[str, float]:
    async with http.get(f"{gateway.url}/metrics") as reply:
        text = await reply.text()
    return {
        name.removeprefix("imagecache_gateway_"): float(value)
        for name, value in (line.split() for line in text.splitlines() if line[:1] != "#")
    }


async def upload(http: aiohttp.ClientSession, gateway: PartProcess, key: str) -> None:
    form = aiohttp.FormData()
    form.add_field("key", key)
    form.add_field("file", io.BytesIO(PNG), filename="x.png")
    async with http.post(f"{gateway.url}/api/upload", data=form) as reply:
        assert reply.status == 200, await reply.text()


async def test_with_the_fast_path_off_aiohttp_serves_the_hits(
    tmp_path: Path, node_process: NodeProcess
) -> None:
    async with (
        gateway_process(tmp_path, node_process, IMAGECACHE_FAST_PATH="off") as gateway,
        aiohttp.ClientSession() as http,
    ):
        await upload(http, gateway, "k")
        replies = await raw_exchange(
            gateway.port, *[get("/image/k")] * 3, get("/image/k", 'If-None-Match: "v1"')
        )
        counted = await metrics(http, gateway)
    assert [r.status_line.split()[1] for r in replies] == [b"200"] * 3 + [b"304"]
    assert all(r.body == PNG for r in replies[:3])
    for reply in replies:
        headers = dict(reply.headers)
        assert headers["ETag"] == '"v1"'
        assert headers["Cache-Control"] == "no-cache"
        # What the app adds to every response (webguards.add_security_headers).
        assert {name: headers[name] for name, _ in SECURITY_HEADERS} == dict(SECURITY_HEADERS)
    assert dict(replies[0].headers)["Content-Type"] == "image/png"
    # Hits, read from the node by aiohttp's handler: no connection met the fast path.
    assert counted["cache_hits_total"] >= 3
    assert counted["fast_path_served_total"] == 0
    assert counted["fast_path_loaded_total"] == 0
    assert counted["fast_path_handed_over_total"] == 0


async def test_the_fast_path_is_on_by_default(tmp_path: Path, node_process: NodeProcess) -> None:
    async with gateway_process(tmp_path, node_process) as gateway, aiohttp.ClientSession() as http:
        await upload(http, gateway, "k")
        replies = await raw_exchange(gateway.port, *[get("/image/k")] * 3)
        counted = await metrics(http, gateway)
    assert all(r.body == PNG for r in replies)
    assert counted["fast_path_served_total"] >= 2


def test_the_setting_comes_from_the_file_or_the_environment(tmp_path: Path) -> None:
    assert load_config(environ={}).gateway.fast_path is True
    assert load_config(environ={"IMAGECACHE_FAST_PATH": "0"}).gateway.fast_path is False
    assert load_config(environ={"IMAGECACHE_FAST_PATH": "1"}).gateway.fast_path is True
    path = tmp_path / "imagecache.toml"
    path.write_text("[gateway]\nfast_path = false\n")
    assert load_config(path, environ={}).gateway.fast_path is False
