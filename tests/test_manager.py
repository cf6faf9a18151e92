"""The manager with a local pool of real node processes, driven through the gateway's API."""

from __future__ import annotations

import asyncio
import io
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientSession, CookieJar
from aiohttp.test_utils import TestServer
from PIL import Image as PILImage

from cachenode.client import NodeClient
from cachenode.routing import parse_address
from imagecache.app import create_app as create_gateway
from imagecache.appkeys import POOL
from imagecache.config import Config, with_data_dir
from manager.app import create_app as create_manager
from manager.appkeys import AUTOSCALER, BACKEND, CONTROLLER, RECORDS
from tests.conftest import image_bytes

PASSWORD = "correct horse"
TOKEN = "gateway-token-for-tests"


def free_port_range(span: int = 20) -> int:
    """A base port with ``span`` free ports after it (probed, best effort)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        if base + span < 65000:
            return base
    raise RuntimeError("no free port range")


@dataclass
class System:
    config: Config
    manager: TestServer
    gateway: TestServer
    http: ClientSession

    async def api(self, call: str, expect: int = 200, **params: str) -> dict[str, Any]:
        async with self.http.post(self.gateway.make_url(f"/api/{call}"), params=params) as reply:
            body: dict[str, Any] = await reply.json()
            assert reply.status == expect, body
            return body


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[System]:
    async with running_system(tmp_path, collect_seconds=0.5) as running:
        yield running


@asynccontextmanager
async def running_system(tmp_path: Path, **manager_settings: Any) -> AsyncIterator[System]:
    """A manager with a local pool of node processes, and a gateway forwarding to it."""
    base = with_data_dir(Config(), tmp_path / "data")
    config = replace(
        base,
        gateway=replace(base.gateway, manager_token=TOKEN),
        manager=replace(
            base.manager, password=PASSWORD, first_port=free_port_range(), **manager_settings
        ),
    )
    manager = TestServer(create_manager(config), host="127.0.0.1")
    async with manager:
        manager_url = str(manager.make_url("")).rstrip("/")
        config = replace(config, gateway=replace(config.gateway, manager_url=manager_url))
        gateway = TestServer(create_gateway(config), host="127.0.0.1")
        async with (
            gateway,
            # unsafe: keep cookies of an IP address host (the test servers are on 127.0.0.1).
            ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
        ):
            yield System(config, manager, gateway, http)


async def answering_nodes(system: System) -> int:
    """How many node processes of the local pool answer PING."""
    nodes = await system.manager.app[BACKEND].nodes()
    answers = 0
    for node in nodes:
        host, port = parse_address(node.address)
        async with NodeClient(host, port, timeout=2) as client:
            await client.ping()
            answers += 1
    return answers


async def gateway_routes_over(system: System) -> tuple[str, ...]:
    """The gateway's node ids, once it has followed the membership (within 1 s)."""
    expected = tuple(sorted(n.node_id for n in system.manager.app[CONTROLLER].members))
    for _ in range(20):
        if system.gateway.app[POOL].node_ids == expected:
            break
        await asyncio.sleep(0.1)
    return system.gateway.app[POOL].node_ids


async def test_resizing_through_the_api_runs_that_many_nodes(system: System) -> None:
    assert (await system.api("getNumNodes"))["numNodes"] == 1
    for size in (3, 2, 1):
        answer = await system.api(
            "configure_cache", mode="manual", numNodes=str(size), cacheSize="3", policy="RR"
        )
        assert answer == {
            "success": "true",
            "mode": "manual",
            "numNodes": size,
            "cacheSize": 3,
            "policy": "RR",
        }
        assert (await system.api("getNumNodes")) == {"success": "true", "numNodes": size}
        assert await answering_nodes(system) == size
        routed = await gateway_routes_over(system)
        assert len(routed) == size
        assert routed == tuple(sorted(n.node_id for n in system.manager.app[CONTROLLER].members))
    # The settings reached the node.
    node = system.manager.app[CONTROLLER].members[0]
    host, port = parse_address(node.address)
    async with NodeClient(host, port) as client:
        assert await client.config() == {
            "capacity_mb": 3.0,
            "policy": "random",
            "max_item_mb": 16.0,
        }


@pytest.mark.parametrize(
    "params",
    [
        {"numNodes": "0"},
        {"numNodes": "9"},
        {"numNodes": "two"},
        {"policy": "FIFO", "numNodes": "2"},
        {"cacheSize": "-3", "numNodes": "2"},
        {"mode": "sometimes"},
    ],
)
async def test_requests_outside_the_rules_change_nothing(
    system: System, params: dict[str, str]
) -> None:
    before = await system.api("configure_cache")
    answer = await system.api("configure_cache", expect=400, **params)
    assert answer["success"] == "false"
    assert answer["error"]["code"] == 400
    assert answer["error"]["message"]
    assert await system.api("configure_cache") == before
    assert await answering_nodes(system) == 1


async def test_get_rate_reports_the_last_minute(system: System) -> None:
    empty = await system.api("getRate", rate="miss")
    assert empty == {"success": "true", "rate": "miss", "value": 0.0}
    node = system.manager.app[CONTROLLER].members[0]
    host, port = parse_address(node.address)
    async with NodeClient(host, port) as client:
        await system.api("getRate", rate="hit")  # a first reading of the node's counters
        await client.set(b"k", b"v")
        for _ in range(3):
            await client.get(b"k")
        await client.get(b"absent")
    miss = await system.api("getRate", rate="miss")
    hit = await system.api("getRate", rate="hit")
    assert miss["value"] == pytest.approx(0.25)
    assert hit["value"] == pytest.approx(0.75)
    bad = await system.api("getRate", expect=400, rate="sideways")
    assert bad["error"]["code"] == 400


async def test_the_internal_api_needs_the_token(system: System) -> None:
    async with system.http.post(system.manager.make_url("/internal/getNumNodes")) as reply:
        assert reply.status == 401
    headers = {"Authorization": "Bearer wrong"}
    async with system.http.post(
        system.manager.make_url("/internal/getNumNodes"), headers=headers
    ) as reply:
        assert reply.status == 401


async def test_pages_need_a_login_and_forms_a_csrf_token(system: System) -> None:
    manager = system.manager
    async with system.http.get(manager.make_url("/config"), allow_redirects=False) as reply:
        assert reply.status == 303
        assert reply.headers["Location"].startswith("/login")
    async with system.http.post(manager.make_url("/login"), data={"password": "wrong"}) as reply:
        assert reply.status == 401
        assert "Wrong password" in await reply.text()
    async with system.http.post(
        manager.make_url("/login"), data={"password": PASSWORD, "next": "/config"}
    ) as reply:
        assert reply.status == 200
        page = await reply.text()
        assert "Memory Configuration" in page
    async with system.http.post(
        manager.make_url("/config/resize"), data={"direction": "expand", "count": "1"}
    ) as reply:
        assert reply.status == 403  # no CSRF token
    assert system.manager.app[CONTROLLER].size == 1
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    async with system.http.post(
        manager.make_url("/config/resize"),
        data={"direction": "shrink", "count": "1", "csrf": csrf},
    ) as reply:
        assert "would leave 0 nodes" in await reply.text()
    async with system.http.post(
        manager.make_url("/config/resize"),
        data={"direction": "expand", "count": "1", "csrf": csrf},
    ) as reply:
        assert "from 1 to 2 nodes" in await reply.text()
    async with system.http.get(manager.make_url("/activity")) as reply:
        assert "manual expand by 1" in await reply.text()
    async with system.http.get(manager.make_url("/stats")) as reply:
        # Seven charts over time and the miss curve by pool size.
        assert (await reply.text()).count("<svg") == 8


async def test_the_autoscaler_grows_on_misses_and_shrinks_on_hits(tmp_path: Path) -> None:
    """End to end with a short clock: judging every 0.5 s over a 1 s window."""
    async with running_system(
        tmp_path,
        collect_seconds=0.2,
        autoscale_seconds=0.5,
        rate_window_seconds=1.0,
        settle_seconds=1.0,
    ) as system:
        await system.api(
            "configure_cache",
            mode="auto",
            maxMiss="0.5",
            minMiss="0.1",
            expRatio="2",
            shrinkRatio="0.5",
            cacheSize="0.1",
            minLookups="1",
        )
        controller = system.manager.app[CONTROLLER]

        async def upload(key: str, data: bytes) -> None:
            form = aiohttp.FormData()
            form.add_field("key", key)
            form.add_field("file", data, filename=f"{key}.png")
            async with system.http.post(system.gateway.make_url("/api/upload"), data=form) as reply:
                assert reply.status == 200

        async def read_until(paths: list[str], done: Any, seconds: float = 20) -> None:
            deadline = asyncio.get_running_loop().time() + seconds
            while not done() and asyncio.get_running_loop().time() < deadline:
                for path in paths:
                    async with system.http.post(system.gateway.make_url(path)) as reply:
                        assert reply.status == 200
                        await reply.read()

        # Every read misses: 12 images of about 30 KB read in turn, on nodes of
        # 0.1 MB that hold 3 of them (keys with no image would be no evidence).
        keys = [f"cold{n}" for n in range(12)]
        for key in keys:
            noise = bytes(random.Random(key).randbytes(100 * 100 * 3))
            buffer = io.BytesIO()
            PILImage.frombytes("RGB", (100, 100), noise).save(buffer, format="PNG")
            await upload(key, buffer.getvalue())
        await read_until([f"/api/key/{key}" for key in keys], lambda: controller.size >= 2)
        assert controller.size >= 2, "the pool did not grow on a miss-heavy load"
        grown = controller.size
        # Every read hits: one image, read again and again, in an emptied pool
        # (a shrink must leave room for the bytes in use).
        await system.api("delete_all")
        await upload("hot", image_bytes("PNG"))
        await read_until(["/api/key/hot"], lambda: controller.size < grown)
        assert controller.size < grown, "the pool did not shrink on an all-hit load"
        for _ in range(50):  # the shrink is recorded once the leaving node has stopped
            history = await system.manager.app[RECORDS].list_activity()
            causes = [entry.cause for entry in history]
            if any("shrink" in cause for cause in causes):
                break
            await asyncio.sleep(0.1)
        assert any("grow" in cause for cause in causes)
        assert any("shrink" in cause for cause in causes)
        assert all(entry.miss_rate is not None for entry in history if "autoscaler" in entry.cause)
        decisions = system.manager.app[AUTOSCALER].decisions
        assert any(not decision.resizes for _, decision in decisions)  # settling, recorded too
