"""``imagecache up`` as a real process, checked the way the third party's grader checks it.

The command runs as ``python -m launcher up`` in a temporary working
directory (so ``./imagecache-data`` lands there), on free ports given through
its environment variables. The test then makes the seven calls of the HTTP API
contract (the README's API) against the gateway's port, stops the process with
SIGINT (to it alone, and to its whole process group as a terminal's Ctrl-C
does), and checks that it exited 0 and left no cache node running.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, FormData, web

from cachenode.client import NodeClient
from imagecache.config import MIB
from launcher.up import serving
from tests import processes
from tests.conftest import NodeProcess, image_bytes

START_SECONDS = 60.0
STOP_SECONDS = 20.0
BANNER = "imagecache is up"
# Node ports the local pool may use: from the base up, at most 8 nodes (plus slack for
# ports it found taken).
NODE_PORTS = 20


@dataclass
class Up:
    """The running ``imagecache up`` process, its ports and everything it printed."""

    process: asyncio.subprocess.Process
    gateway_port: int
    manager_port: int
    first_node_port: int
    workdir: Path
    output: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None  # reads ``output`` until the end

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def printed(self) -> str:
        return "".join(self.output)


def free_ports() -> tuple[int, int, int]:
    """The gateway's and manager's ports and the base of NODE_PORTS free ones, in a row
    outside the ephemeral range (``tests.processes.free_ports``)."""
    (gateway_port, manager_port), first_node_port = processes.free_ports(2, node_ports=NODE_PORTS)
    return gateway_port, manager_port, first_node_port


def _can_bind(port: int) -> bool:
    with socket.socket() as probe:
        # As the servers bind: a port that only closed connections hold is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def _read_output(up: Up) -> None:
    assert up.process.stdout is not None
    while line := await up.process.stdout.readline():
        up.output.append(line.decode(errors="replace"))


async def _wait_for_banner(up: Up) -> None:
    while BANNER not in up.printed():
        if up.process.returncode is not None:
            pytest.fail(f"imagecache up exited ({up.process.returncode}):\n{up.printed()}")
        await asyncio.sleep(0.1)


def node_pids(parent: int) -> dict[int, str]:
    """The ``imagecache node`` processes whose parent is ``parent``: pid → command line."""
    return children_of(parent, " node ")


def children_of(parent: int, marker: str) -> dict[int, str]:
    """The processes whose parent is ``parent`` and whose command line holds ``marker``."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = command_of(int(entry.name))
        except OSError:  # gone meanwhile
            continue
        # The parent pid is the second field after the command name (which may hold spaces).
        if int(stat.rpartition(")")[2].split()[1]) == parent and marker in command:
            found[int(entry.name)] = command
    return found


def command_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def still_running(pid: int, command: str) -> bool:
    """Whether ``pid`` still runs ``command`` (a zombie or a reused pid does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        now = command_of(pid)
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z" and now == command


@contextlib.asynccontextmanager
async def running_up(
    workdir: Path,
    ports: tuple[int, int, int] | None = None,
    settings: dict[str, str] | None = None,
) -> AsyncIterator[Up]:
    """``imagecache up`` started in ``workdir`` on ``ports`` (gateway, manager, first
    node; free ones by default), with ``settings`` (IMAGECACHE_* variables), and
    answering; killed with its nodes if still up."""
    gateway_port, manager_port, first_node_port = ports or free_ports()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IMAGECACHE_")}
    environment.update(
        PYTHONUNBUFFERED="1",
        IMAGECACHE_GATEWAY_PORT=str(gateway_port),
        IMAGECACHE_MANAGER_PORT=str(manager_port),
        IMAGECACHE_FIRST_NODE_PORT=str(first_node_port),
        IMAGECACHE_MANAGER_URL=f"http://127.0.0.1:{manager_port}",
        **(settings or {}),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "launcher",
        "up",
        cwd=workdir,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group, to clean up after a failure
    )
    up = Up(process, gateway_port, manager_port, first_node_port, workdir)
    reader = up.reader = asyncio.create_task(_read_output(up))
    try:
        try:
            await asyncio.wait_for(_wait_for_banner(up), START_SECONDS)
        except TimeoutError:
            pytest.fail(f"no {BANNER!r} within {START_SECONDS:g} s:\n{up.printed()}")
        yield up
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # any node left behind
        await reader


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[Up]:
    async with running_up(tmp_path) as started:
        yield started


async def call(http: ClientSession, up: Up, path: str, **kwargs: Any) -> dict[str, Any]:
    """POST /api/<path> to the gateway; the answer's JSON, after checking it is a 200."""
    async with http.post(f"{up.gateway}/api/{path}", **kwargs) as reply:
        text = await reply.text()
        assert reply.status == 200, f"{path}: {reply.status} {text}"
        assert reply.content_type == "application/json", f"{path}: {reply.content_type}"
        body: dict[str, Any] = await reply.json()
        return body


def upload_form(key: str, filename: str, content_type: str, data: bytes) -> FormData:
    form = FormData()
    form.add_field("key", key)
    form.add_field("file", data, filename=filename, content_type=content_type)
    return form


@pytest.mark.parametrize("interrupt", ["process", "process group"])
async def test_the_graders_sequence_against_imagecache_up(up: Up, interrupt: str) -> None:
    jpeg = image_bytes("JPEG", (40, 30), (30, 120, 200))
    png = image_bytes("PNG", (20, 10), (200, 30, 120))

    async with ClientSession(timeout=ClientTimeout(total=30)) as http:
        assert await call(http, up, "delete_all") == {"success": "true"}
        assert await call(http, up, "list_keys") == {"success": "true", "keys": []}

        for key, name, kind, data in (
            ("test_1", "1.jpeg", "image/jpeg", jpeg),
            ("test_2", "2.png", "image/png", png),
        ):
            answer = await call(http, up, "upload", data=upload_form(key, name, kind, data))
            assert answer == {"success": "true", "key": key}
        listed = await call(http, up, "list_keys")
        assert listed["success"] == "true"
        assert sorted(listed["keys"]) == ["test_1", "test_2"]

        expected_1 = {
            "success": "true",
            "key": "test_1",
            "content": base64.b64encode(jpeg).decode(),
        }
        assert await call(http, up, "key/test_1") == expected_1
        # Twice: the second read comes from the cache, the same bytes.
        assert await call(http, up, "key/test_1") == expected_1

        configured = await call(
            http,
            up,
            "configure_cache",
            params={"mode": "manual", "numNodes": "2", "cacheSize": "3", "policy": "RR"},
        )
        assert configured == {
            "success": "true",
            "mode": "manual",
            "numNodes": 2,
            "cacheSize": 3,
            "policy": "RR",
        }
        assert await call(http, up, "getNumNodes") == {"success": "true", "numNodes": 2}
        # Two node processes really run, children of `imagecache up`.
        nodes = node_pids(up.process.pid)
        assert len(nodes) == 2, nodes
        # Both run with the settings now in force, the one started by the resize too.
        for command in nodes.values():
            port = int(command.split(" --port ", 1)[1].split()[0])
            async with NodeClient("127.0.0.1", port) as client:
                settings = await client.config()
            assert settings["capacity_mb"] == 3, (command, settings)
            assert settings["policy"] == "random", (command, settings)

        # The data survives the resize.
        assert await call(http, up, "key/test_1") == expected_1
        expected_2 = {"success": "true", "key": "test_2", "content": base64.b64encode(png).decode()}
        assert await call(http, up, "key/test_2") == expected_2

        for rate in ("miss", "hit"):
            answer = await call(http, up, "getRate", params={"rate": rate})
            assert set(answer) == {"success", "rate", "value"}, answer
            assert answer["success"] == "true"
            assert answer["rate"] == rate
            value = answer["value"]
            assert isinstance(value, int | float), answer
            assert not isinstance(value, bool), answer
            assert 0 <= value <= 1, answer

    # The data went to ./imagecache-data of the working directory.
    folder = up.workdir / "imagecache-data"
    assert folder.is_dir(), sorted(p.name for p in up.workdir.iterdir())
    files = [p for p in folder.rglob("*") if p.is_file()]
    stored = {p.read_bytes() for p in files if p.stat().st_size < MIB}
    assert {jpeg, png} <= stored, sorted(str(p) for p in files)

    # SIGINT: the process stops, exits 0 and stops its nodes. A terminal's Ctrl-C sends it
    # to the whole foreground process group: the nodes get it too, at the same moment.
    if interrupt == "process":
        up.process.send_signal(signal.SIGINT)
    else:
        os.killpg(up.process.pid, signal.SIGINT)  # its own group: start_new_session
    try:
        code = await asyncio.wait_for(up.process.wait(), STOP_SECONDS)
    except TimeoutError:
        pytest.fail(f"imagecache up did not stop within {STOP_SECONDS:g} s:\n{up.printed()}")
    if up.reader is not None:
        with contextlib.suppress(TimeoutError):  # the last lines it printed
            await asyncio.wait_for(asyncio.shield(up.reader), 5)
    assert code == 0, up.printed()
    left = {pid: command for pid, command in nodes.items() if still_running(pid, command)}
    assert left == {}, f"cache nodes still running after exit:\n{up.printed()}"
    ports = range(up.first_node_port, up.first_node_port + NODE_PORTS)
    listening = [port for port in ports if _accepts(port)]
    assert listening == [], f"node ports still accepting connections:\n{up.printed()}"
    assert not _accepts(up.gateway_port)
    assert not _accepts(up.manager_port)


# -- nothing left behind ---------------------------------------------------------------------


async def wait_until_gone(processes: dict[int, str], seconds: float) -> list[str]:
    """The command lines of ``processes`` still running after up to ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        running = [c for pid, c in processes.items() if still_running(pid, c)]
        if not running:
            return []
        await asyncio.sleep(0.1)
    return [c for pid, c in processes.items() if still_running(pid, c)]


async def test_a_killed_up_takes_its_nodes_and_workers_with_it(up: Up) -> None:
    """SIGKILL gives `up` no chance to stop anything: its children must notice."""
    for _ in range(100):
        if node_pids(up.process.pid):
            break
        await asyncio.sleep(0.1)
    children = {**node_pids(up.process.pid), **children_of(up.process.pid, "gateway-worker")}
    assert any(" node " in command for command in children.values()), up.printed()
    up.process.kill()  # this process only, not its group
    # Not process.wait(): it also waits for the output pipe, which a node left
    # behind would hold open.
    for _ in range(100):
        if up.process.returncode is not None:
            break
        await asyncio.sleep(0.05)
    assert await wait_until_gone(children, 10) == []
    assert _can_bind(up.first_node_port)


async def test_up_stops_a_node_that_a_crashed_run_left_on_its_ports(tmp_path: Path) -> None:
    ports = free_ports()
    first_node_port = ports[2]
    # A node whose parent died: started by a shell that outlives its start, then exits
    # (as `up` before nodes had a lifeline, or a node started by hand, then SIGKILL).
    shell = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        f"{sys.executable} -m launcher node --port {first_node_port} >/dev/null 2>&1 & sleep 3",
        start_new_session=True,
    )
    await shell.wait()
    assert _accepts(first_node_port)
    async with NodeClient("127.0.0.1", first_node_port) as client:
        stats = await client.stats()
    assert stats["orphaned"] is True
    orphan = {stats["pid"]: command_of(stats["pid"])}
    try:
        async with running_up(tmp_path, ports) as up:
            assert await wait_until_gone(orphan, 1) == []
            for _ in range(100):
                if node_pids(up.process.pid):
                    break
                await asyncio.sleep(0.1)
            (command,) = node_pids(up.process.pid).values()
            assert f"--port {first_node_port} " in command  # its own node took the port
            assert "left by a crashed run" in up.printed()
    finally:
        for pid in orphan:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_node_with_a_living_parent_is_not_an_orphan(node_process: NodeProcess) -> None:
    async with NodeClient(node_process.host, node_process.port) as client:
        assert (await client.stats())["orphaned"] is False


async def test_what_start_up_made_is_frozen_out_of_full_collections() -> None:
    """Once an app listens, start-up's objects are no longer scanned by the
    cyclic collector (each full collection over them paused the loop)."""
    gc.unfreeze()
    try:
        async with serving(web.Application(), "127.0.0.1", 0):
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
