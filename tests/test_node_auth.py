"""Node tokens (docs/protocol.md, AUTH): only clients that know the token reach a node.

What was seen: anyone who reached a node's port could plant an image with
``set img0005 1 0 31`` over the text protocol, which the gateway then served.
These tests run real node processes started with a token, and a real gateway
that knows it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from cachenode.client import NodeAccess, NodeClient
from cachenode.errors import NodeReplyError, NodeUnavailable
from cachenode.protocol import MAGIC_REQUEST, Opcode, encode_request
from cachenode.status import Status
from imagecache.config import Config, ConfigError, load_config, with_data_dir
from tests.conftest import DEAD_URL, NodeProcess, image_bytes, start_node_process
from tests.test_fastpath import exchange, get, running
from tests.test_up import call, running_up, upload_form

TOKEN = "a-token-for-the-tests-0123456789"


def start_node_with_token(*extra_args: str) -> NodeProcess:
    return start_node_process(
        "--capacity-mb", "16", *extra_args, settings={"IMAGECACHE_NODE_TOKEN": TOKEN}
    )


@pytest.fixture
def node() -> Iterator[NodeProcess]:
    started = start_node_with_token()
    yield started
    started.stop()


def talk(node: NodeProcess, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the node closes it (or 3 s pass)."""
    with socket.create_connection((node.host, node.port), timeout=3) as connection:
        connection.sendall(data)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except TimeoutError:
            return received + b"<still open>"
    return received


async def test_a_client_without_the_token_gets_nothing_and_is_cut_off(node: NodeProcess) -> None:
    async with NodeClient(node.host, node.port) as stranger:
        with pytest.raises(NodeReplyError) as refused:
            await stranger.set(b"img0005", b"planted")
        assert refused.value.status == Status.UNAUTHORIZED
    # Pipelined after a refused request, nothing is applied: the connection closes.
    planted = encode_request(Opcode.SET, 1, b"img0005", b"planted")
    reply = talk(node, planted + encode_request(Opcode.SET, 2, b"img0006", b"planted"))
    assert reply[2:4] == Status.UNAUTHORIZED.to_bytes(2, "big")
    assert not reply.endswith(b"<still open>")
    async with NodeClient(node.host, node.port, access=NodeAccess(TOKEN)) as owner:
        assert await owner.get(b"img0005") is None
        assert await owner.get(b"img0006") is None


async def test_a_wrong_token_is_refused(node: NodeProcess) -> None:
    async with NodeClient(node.host, node.port, access=NodeAccess("not-" + TOKEN)) as guesser:
        with pytest.raises(NodeUnavailable, match="refused"):
            await guesser.ping()


async def test_the_right_token_opens_every_operation(node: NodeProcess) -> None:
    async with NodeClient(node.host, node.port, access=NodeAccess(TOKEN), pool_size=3) as owner:
        await asyncio.gather(*(owner.set(b"k%d" % n, b"v%d" % n) for n in range(20)))
        values = await asyncio.gather(*(owner.get(b"k%d" % n) for n in range(20)))
        assert values == [b"v%d" % n for n in range(20)]
        assert (await owner.stats())["items"] == 20


def test_the_text_protocol_is_off_with_a_token(node: NodeProcess) -> None:
    reply = talk(node, b"set img0005 1 0 7\r\nplanted\r\nget img0005\r\n")
    assert reply == b"SERVER_ERROR the text protocol is off on this node\r\n"


async def test_the_text_protocol_can_be_kept_on_with_a_token() -> None:
    node = start_node_with_token("--text-protocol")
    try:
        assert talk(node, b"set k 0 0 1\r\nv\r\nget k\r\nquit\r\n") == (
            b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
        )
        async with NodeClient(node.host, node.port) as stranger:  # binary still needs it
            with pytest.raises(NodeReplyError):
                await stranger.ping()
    finally:
        node.stop()


async def test_a_gateway_with_the_token_serves_and_nothing_planted_reaches_it(
    node: NodeProcess, tmp_path: Path
) -> None:
    base = with_data_dir(Config(), tmp_path / "data")
    config = replace(
        base,
        node_token=TOKEN,
        gateway=replace(base.gateway, nodes=(f"{node.host}:{node.port}",), manager_url=DEAD_URL),
    )
    png = image_bytes("PNG", color="green")
    async with running(config) as gateway:
        await gateway.upload("img0005", png)
        (first,) = await exchange(gateway.port, get("/image/img0005"))
        assert first.body == png
        # In threads: the gateway runs on this loop meanwhile.
        await asyncio.to_thread(talk, node, b"set img0005 1 0 7\r\nplanted\r\n")
        await asyncio.to_thread(talk, node, bytes([MAGIC_REQUEST]) + b"x" * 40)
        async with NodeClient(node.host, node.port, access=NodeAccess(TOKEN)) as owner:
            item = await owner.get_item(b"img0005")
        assert item is not None
        assert item.value == png  # written through by the gateway, with its version
        (again,) = await exchange(gateway.port, get("/image/img0005"))
        assert again.body == png
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{gateway.port}/image/img0005") as reply,
        ):
            assert await reply.read() == png


def test_aws_mode_requires_a_node_token(tmp_path: Path) -> None:
    environment = {"IMAGECACHE_POOL": "aws", "IMAGECACHE_ASG_NAME": "cache-nodes"}
    with pytest.raises(ConfigError, match="IMAGECACHE_NODE_TOKEN"):
        load_config(environ=environment)
    config = load_config(environ={**environment, "IMAGECACHE_NODE_TOKEN": TOKEN})
    assert config.node_token == TOKEN


def test_the_node_command_takes_the_token_from_the_environment_not_only_the_flag() -> None:
    """A flag shows in ``ps`` to every user of the machine; the variable does not."""
    help_text = subprocess.run(
        [sys.executable, "-m", "launcher", "node", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IMAGECACHE_NODE_TOKEN" in help_text


async def test_up_with_a_node_token_starts_resizes_and_serves(tmp_path: Path) -> None:
    """The local pool starts its nodes with the token; the manager (configuration,
    key migration, statistics) and the gateway send it."""
    png = image_bytes("PNG", color="navy")
    async with (
        running_up(tmp_path, settings={"IMAGECACHE_NODE_TOKEN": TOKEN}) as up,
        aiohttp.ClientSession() as http,
    ):
        assert await call(http, up, "upload", data=upload_form("k", "k.png", "image/png", png))
        configured = await call(
            http, up, "configure_cache", params={"mode": "manual", "numNodes": "2"}
        )
        assert configured["numNodes"] == 2
        assert await call(http, up, "getNumNodes") == {"success": "true", "numNodes": 2}
        async with http.get(f"{up.gateway}/image/k") as reply:
            assert (reply.status, await reply.read()) == (200, png)
        for port in (up.first_node_port, up.first_node_port + 1):
            async with NodeClient("127.0.0.1", port) as stranger:
                with pytest.raises(NodeReplyError):
                    await stranger.ping()
            async with NodeClient("127.0.0.1", port, access=NodeAccess(TOKEN)) as owner:
                assert (await owner.stats())["capacity_mb"] > 0
        assert "refused" not in up.printed()
