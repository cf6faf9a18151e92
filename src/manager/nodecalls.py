"""The pool controller's calls to its cache nodes: configure, clear, ping.

Each call opens a client of its own for one node, with a short timeout, and
reports whether it succeeded; a failure is logged here, once, and the caller
decides whether it stops the step (a joining node that cannot be cleared) or
not (a down node misses settings it gets when it restarts).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from cachenode.client import NodeAccess, NodeClient
from cachenode.errors import NodeError
from manager.backends.base import NodeHandle
from manager.settings import CacheSettings

log = logging.getLogger(__name__)

# What the controller does on one node, with a client of it.
NodeCall = Callable[[NodeClient], Awaitable[object]]
# A node call has this long, connecting included.
NODE_CALL_TIMEOUT = 5.0


async def on_node(node: NodeHandle, call: NodeCall, access: NodeAccess) -> bool:
    """Run ``call`` on ``node``; False (logged) when the node fails it."""
    try:
        async with NodeClient.at(
            node.address, pool_size=1, timeout=NODE_CALL_TIMEOUT, access=access
        ) as client:
            await call(client)
    except NodeError as error:
        log.warning("cache node %s failed a call: %s", node.address, error)
        return False
    return True


async def succeeding(
    nodes: Sequence[NodeHandle], call: NodeCall, access: NodeAccess
) -> list[NodeHandle]:
    """Run ``call`` on every one of ``nodes`` at once; those that succeeded, in order."""
    results = await asyncio.gather(*(on_node(node, call, access) for node in nodes))
    return [node for node, ok in zip(nodes, results, strict=True) if ok]


def configuring(settings: CacheSettings) -> NodeCall:
    """The call that gives a node the capacity and policy of ``settings``."""

    async def configure(client: NodeClient) -> None:
        await client.config(capacity_mb=settings.capacity_mb, policy=settings.policy)

    return configure


def clearing(version: int) -> NodeCall:
    """The call that empties a node, refusing writes older than ``version`` (0: none)."""

    async def clear(client: NodeClient) -> None:
        await client.clear(version=version)

    return clear


async def pinging(client: NodeClient) -> None:
    """The call that checks a node answers."""
    await client.ping()
