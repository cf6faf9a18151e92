"""Shared fixtures: cache nodes in this process (asyncio) and as real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from cachenode.server import NodeConfig, NodeServer


@pytest.fixture
async def node_server() -> AsyncIterator[NodeServer]:
    """A node listening on a free loopback port in the test's own event loop."""
    async with NodeServer(NodeConfig(port=0, capacity_mb=64)) as server:
        yield server


@dataclass
class NodeProcess:
    process: subprocess.Popen[str]
    host: str
    port: int

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM the node and return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


def start_node_process(*extra_args: str) -> NodeProcess:
    """Run ``imagecache node`` on a free port and wait for its listening line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "imagecache", "node", "--port", "0", *extra_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"listening on ([\d.]+):(\d+)", line)
    if match is None:
        process.kill()
        raise RuntimeError(f"node did not start: {line!r}")
    return NodeProcess(process, match.group(1), int(match.group(2)))


@pytest.fixture
def node_process() -> Iterator[NodeProcess]:
    """A node running as its own process, as the manager runs them."""
    node = start_node_process("--capacity-mb", "64")
    yield node
    node.process.kill()
    node.stop()
