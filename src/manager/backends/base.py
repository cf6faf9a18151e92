"""The pool backend port: what the manager needs from whatever runs the nodes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class NodeHandle:
    """A running cache node: a stable id (process name or EC2 instance id) and its address."""

    node_id: str
    address: str  # host:port of the node's TCP port


class PoolBackend(Protocol):
    """Starts and stops cache nodes. The manager decides which and how many."""

    async def nodes(self) -> list[NodeHandle]:
        """The nodes running now (for AWS: InService instances), oldest first.

        The controller adopts these at start, and lets a member that is not
        listed leave before every resize and (AWS) every reconcile pass: a
        node missing here counts as gone.
        """
        ...

    async def grow(self, count: int) -> list[NodeHandle]:
        """Start ``count`` more nodes and return them once they accept connections.

        Raises PoolError when they cannot be started (then none of them is kept).
        """
        ...

    async def shrink(self, node_ids: Sequence[str]) -> None:
        """Stop exactly these nodes (for AWS: terminate them, decrementing desired capacity)."""
        ...

    async def close(self) -> None:
        """Release the backend (local: stop every node process)."""
        ...


class PoolError(Exception):
    """The backend could not start or stop nodes; the message says why."""
