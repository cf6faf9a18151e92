"""The pool controller's calls to its nodes (manager.nodecalls), on a real node process."""

from __future__ import annotations

import logging

import pytest

from cachenode.client import OPEN_ACCESS, NodeClient
from manager.backends.base import NodeHandle
from manager.nodecalls import clearing, configuring, pinging, succeeding
from manager.settings import CacheSettings
from tests.conftest import NodeProcess


def handle_of(node: NodeProcess) -> NodeHandle:
    return NodeHandle("node-a", f"{node.host}:{node.port}")


async def test_configuring_gives_the_node_capacity_and_policy(node_process: NodeProcess) -> None:
    node = handle_of(node_process)
    settings = CacheSettings(capacity_mb=12, policy="random")
    assert await succeeding([node], configuring(settings), OPEN_ACCESS) == [node]
    async with NodeClient.at(node.address) as client:
        config = await client.config()
    assert (config["capacity_mb"], config["policy"]) == (12, "random")


async def test_clearing_empties_the_node_and_refuses_older_writes(
    node_process: NodeProcess,
) -> None:
    node = handle_of(node_process)
    async with NodeClient.at(node.address) as client:
        assert await client.set(b"old", b"v", version=3, ticket=await client.ticket())
        assert await succeeding([node], clearing(5), OPEN_ACCESS) == [node]
        assert await client.get(b"old") is None
        # The version floor: a write of something older than what is stored is refused.
        assert not await client.set(b"old", b"v", version=4, ticket=await client.ticket())
        assert await client.set(b"new", b"v", version=5, ticket=await client.ticket())


async def test_a_node_that_does_not_answer_is_left_out_with_one_warning(
    node_process: NodeProcess, caplog: pytest.LogCaptureFixture
) -> None:
    up = handle_of(node_process)
    down = NodeHandle("node-b", f"{node_process.host}:1")
    with caplog.at_level(logging.WARNING, logger="manager.nodecalls"):
        assert await succeeding([down, up], pinging, OPEN_ACCESS) == [up]
    (warning,) = [r for r in caplog.records if r.name == "manager.nodecalls"]
    assert down.address in warning.getMessage()
    assert warning.exc_info is None
