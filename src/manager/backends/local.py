"""Cache nodes as child processes on loopback: the embedded default's pool.

Each node is ``imagecache node`` on the first free port from 11311 up. A node
that exits without being asked to is started again on the same port (and the
manager is told, so it can push the settings in force to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cachenode.client import OPEN_ACCESS, NodeAccess, NodeClient
from cachenode.errors import NodeError
from manager.backends.base import NodeHandle, PoolError

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0
START_ATTEMPTS = 3
# Ports from the first one up where nodes left by a crashed run are looked for.
ORPHAN_SCAN_PORTS = 32
ORPHAN_STOP_SECONDS = 10.0


@dataclass
class _NodeProcess:
    handle: NodeHandle
    port: int
    process: asyncio.subprocess.Process
    watcher: asyncio.Task[None] | None = None
    stopping: bool = False


class LocalPool:
    """Runs nodes as processes of this machine; ``close`` stops them all."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        first_port: int = 11311,
        capacity_mb: float = 64,
        policy: str = "lru",
        on_restart: Callable[[NodeHandle], Awaitable[None]] | None = None,
        node_access: NodeAccess = OPEN_ACCESS,
        node_environment: Mapping[str, str] | None = None,
    ) -> None:
        """``node_environment``: settings of the nodes (``Config.node_environment``)."""
        self._host = host
        self._node_access = node_access
        self._node_environment = dict(node_environment or {})
        self._first_port = first_port
        self.capacity_mb = capacity_mb  # for nodes started from now on
        self.policy = policy
        self._on_restart = on_restart
        self._nodes: dict[str, _NodeProcess] = {}
        self._closing = False

    async def stop_orphans(self) -> list[int]:
        """Stop the cache nodes that a crashed run left on this pool's ports.

        A node started by a local pool dies with it (``--stop-with-stdin``);
        one started otherwise whose parent died says so (STATS ``orphaned``).
        Only such nodes are stopped, never one whose parent still runs, such as
        another system's. Returns their process ids.
        """
        stopped = []
        for port in range(self._first_port, self._first_port + ORPHAN_SCAN_PORTS):
            if _can_bind(self._host, port):
                continue
            pid = await _orphan_node_on(self._host, port, self._node_access)
            if pid is None:
                continue
            log.warning("stopping cache node pid %d on port %d, left by a crashed run", pid, port)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
            for _ in range(round(ORPHAN_STOP_SECONDS / 0.05)):  # until its port is free
                if _can_bind(self._host, port):
                    break
                await asyncio.sleep(0.05)
        return stopped

    async def nodes(self) -> list[NodeHandle]:
        return [node.handle for node in self._nodes.values()]

    def process_ids(self) -> dict[str, int]:
        """The process id of each node, by node id (for operators and failure tests)."""
        return {node_id: node.process.pid for node_id, node in self._nodes.items()}

    async def grow(self, count: int) -> list[NodeHandle]:
        started: list[_NodeProcess] = []
        try:
            for _ in range(count):
                node = await self._start_somewhere()
                self._nodes[node.handle.node_id] = node
                started.append(node)
        except PoolError:
            await self.shrink([node.handle.node_id for node in started])
            raise
        return [node.handle for node in started]

    async def shrink(self, node_ids: Sequence[str]) -> None:
        await asyncio.gather(
            *(self._stop(self._nodes.pop(n)) for n in node_ids if n in self._nodes)
        )

    async def close(self) -> None:
        self._closing = True  # no watcher restarts a node from now on
        await self.shrink(list(self._nodes))

    async def _start_somewhere(self) -> _NodeProcess:
        """A new node on a free port; one that dies while starting (killed, or
        its port taken meanwhile) is tried again on another."""
        for attempt in range(START_ATTEMPTS):
            try:
                return await self._start(self._free_port())
            except PoolError as error:
                if attempt == START_ATTEMPTS - 1:
                    raise
                log.warning("%s; trying again", error)
        raise AssertionError("unreachable")

    async def _start(self, port: int) -> _NodeProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "launcher",
            "--log-level",
            "WARNING",
            "node",
            "--host",
            self._host,
            "--port",
            str(port),
            "--capacity-mb",
            f"{self.capacity_mb:g}",
            "--policy",
            self.policy,
            "--stop-with-stdin",
            # Held open and never written: when this process ends, however,
            # the node reads the end of its input and stops (cachenode.lifeline).
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # The token through the environment, where no other user can read it.
            env={**os.environ, **self._node_environment},
        )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        except asyncio.CancelledError:  # never leave a half-started node behind
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if b"listening" not in line:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise PoolError(f"a cache node on {self._host}:{port} did not start")
        handle = NodeHandle(f"node-{port}", f"{self._host}:{port}")
        node = _NodeProcess(handle, port, process)
        node.watcher = asyncio.create_task(self._watch(node))
        log.info("started cache node %s (pid %d)", handle.address, process.pid)
        return node

    async def _watch(self, node: _NodeProcess) -> None:
        """Start the node again if it exits on its own."""
        code = await node.process.wait()
        if node.stopping or self._closing:
            return
        log.warning("cache node %s exited (code %s); starting it again", node.handle.address, code)
        for attempt in range(5):
            try:
                replacement = await self._start(node.port)
            except PoolError as error:
                log.error("restarting %s failed (%s); retrying", node.handle.address, error)
                await asyncio.sleep(min(2**attempt, 10))
                continue
            if self._nodes.get(node.handle.node_id) is node:
                self._nodes[node.handle.node_id] = replacement
                if self._on_restart is not None:
                    try:
                        await self._on_restart(replacement.handle)
                    except PoolError as error:
                        # Killed again before it took the settings: its own
                        # watcher restarts it and configures it once more.
                        log.error("configuring restarted %s failed: %s", node.handle.address, error)
            else:  # it was removed from the pool meanwhile
                await self._stop(replacement)
            return

    async def _stop(self, node: _NodeProcess) -> None:
        node.stopping = True
        if node.process.returncode is None:
            node.process.terminate()
            try:
                await asyncio.wait_for(node.process.wait(), 10)
            except TimeoutError:
                node.process.kill()
                await node.process.wait()
        if node.watcher is not None and node.watcher is not asyncio.current_task():
            node.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await node.watcher
        log.info("stopped cache node %s", node.handle.address)

    def _free_port(self) -> int:
        taken = {node.port for node in self._nodes.values()}
        for port in range(self._first_port, self._first_port + 1000):
            if port not in taken and _can_bind(self._host, port):
                return port
        raise PoolError(f"no free port from {self._first_port} up")


async def _orphan_node_on(host: str, port: int, node_access: NodeAccess) -> int | None:
    """The process id of the orphaned cache node of this machine listening on
    ``port``, or None (nothing that answers as a node, or a node with a parent)."""
    try:
        async with NodeClient(
            host, port, timeout=1.0, connect_timeout=1.0, access=node_access
        ) as client:
            stats = await client.stats()
    except NodeError:
        return None
    pid = stats.get("pid")
    if stats.get("orphaned") is not True or not isinstance(pid, int):
        return None
    return pid if _runs_a_node(pid) else None


def _runs_a_node(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs ``imagecache ... node`` (the
    script, or ``python -m launcher ... node`` as the pool starts them)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # not a process of this machine (or it is gone)
    ours = b"launcher" in command or any(b"imagecache" in part for part in command)
    return b"node" in command and ours


def _can_bind(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
