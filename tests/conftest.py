"""Shared fixtures: cache nodes (in this process and as processes) and the gateway."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import settings
from PIL import Image as PILImage

from cachenode.server import NodeConfig, NodeServer
from imagecache.app import create_app
from imagecache.config import Config, with_data_dir

# The fuzz tests draw the same examples on every run (a failing CI run can be
# replayed); HYPOTHESIS_PROFILE=explore draws new ones, to look for more.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


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


def start_node_process(*extra_args: str, settings: dict[str, str] | None = None) -> NodeProcess:
    """Run ``imagecache node`` on a free port (with ``settings``: IMAGECACHE_*
    variables, as the local pool passes them) and wait for its listening line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher", "node", "--port", "0", *extra_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(settings or {})},
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


# -- the gateway ----------------------------------------------------------------


IN_LOOP_NODE_TIMEOUT_SECONDS = 5.0


@pytest.fixture
def gateway_config(tmp_path: Path, node_server: NodeServer) -> Config:
    """The embedded default in a temporary folder, routing to the in-process node."""
    host, port = node_server.address
    base = with_data_dir(Config(), tmp_path / "data")
    # The node answers from the test's own event loop, which also runs the
    # gateway: a loop held up on a busy machine must not make it look failed.
    return replace(
        base,
        gateway=replace(
            base.gateway,
            nodes=(f"{host}:{port}",),
            manager_url=DEAD_URL,
            node_timeout=IN_LOOP_NODE_TIMEOUT_SECONDS,
        ),
    )


@pytest.fixture
async def gateway(
    aiohttp_client: Callable[
        [web.Application], Awaitable[TestClient[web.Request, web.Application]]
    ],
    gateway_config: Config,
) -> TestClient[web.Request, web.Application]:
    """A test client of the gateway app, started with all its resources."""
    return await aiohttp_client(create_app(gateway_config))


def image_bytes(
    kind: str = "PNG", size: tuple[int, int] = (32, 24), color: str | tuple[int, int, int] = "red"
) -> bytes:
    """A small, valid image file of the given Pillow format."""
    buffer = io.BytesIO()
    PILImage.new("RGB", size, color).save(buffer, format=kind)
    return buffer.getvalue()


# No manager listens here: admin calls must answer 503 in the error shape.
DEAD_URL = "http://127.0.0.1:9"
