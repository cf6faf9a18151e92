"""Gateway workers as real processes: ``imagecache gateway --workers 2`` and ``up --workers 2``.

Which worker answered a connection is read from the kernel, not from the
gateway: the worker process whose file descriptors hold the server's end of
that TCP connection (``/proc/<pid>/fd`` and ``/proc/net/tcp``). Every process
runs in a session of its own, so a failed test still kills all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagecache.config import ConfigError, load_config
from imagecache.workers import (
    FIRST_RESTART_DELAY,
    MAX_DEFAULT_WORKERS,
    MAX_RESTART_DELAY,
    STABLE_SECONDS,
    default_workers,
    restart_delay,
)
from tests.test_up import free_ports, still_running

START_SECONDS = 60.0
EXIT_SECONDS = 5.0  # "within a few seconds"
CONNECTIONS = 32  # all on one of two workers: 2 in 2^32


@dataclass
class Command:
    """A running ``python -m launcher ...`` process and everything it printed."""

    process: asyncio.subprocess.Process
    port: int  # the gateway's
    output: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def printed(self) -> str:
        return "".join(self.output)

    def workers(self) -> dict[int, str]:
        """Its gateway worker processes: pid → command line."""
        return children(self.process.pid, "gateway-worker")

    async def wait_printed(self, text: str, seconds: float = START_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while text not in self.printed():
            if self.process.returncode is not None:
                pytest.fail(
                    f"exited ({self.process.returncode}) before {text!r}:\n{self.printed()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} within {seconds:g} s:\n{self.printed()}")
            await asyncio.sleep(0.05)

    async def exit_code(self, seconds: float = EXIT_SECONDS) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), seconds)
        except TimeoutError:
            pytest.fail(f"still running {seconds:g} s later:\n{self.printed()}")
        if self.reader is not None:  # the last lines it printed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.reader), 5)
        return code


@contextlib.asynccontextmanager
async def started(
    workdir: Path, args: Sequence[str], environment: dict[str, str], port: int
) -> AsyncIterator[Command]:
    """``python -m launcher ARGS`` in ``workdir``; SIGKILLed with all its processes at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGECACHE_")}
    env.update(environment, PYTHONUNBUFFERED="1")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "launcher",
        *args,
        cwd=workdir,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its session: every process it starts, to clean up
    )
    command = Command(process, port)
    command.reader = asyncio.create_task(_read_output(command))
    try:
        yield command
    finally:
        for pid in in_session(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()
        await command.reader


async def _read_output(command: Command) -> None:
    assert command.process.stdout is not None
    while line := await command.process.stdout.readline():
        command.output.append(line.decode(errors="replace"))


def two_free_ports() -> tuple[int, int]:
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", 0))
        second.bind(("127.0.0.1", 0))
        return first.getsockname()[1], second.getsockname()[1]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Command]:
    """``imagecache gateway --workers 2`` listening, with its two workers."""
    port, dead_node = two_free_ports()
    environment = {
        "IMAGECACHE_DATA_DIR": str(tmp_path / "data"),
        "IMAGECACHE_GATEWAY_PORT": str(port),
        "IMAGECACHE_NODES": f"127.0.0.1:{dead_node}",  # nothing listens: reads go around it
        "IMAGECACHE_MANAGER_URL": "http://127.0.0.1:9",
    }
    args = ["gateway", "--workers", "2"]
    async with started(tmp_path, args, environment, port) as command:
        await command.wait_printed(f"gateway on http://127.0.0.1:{port} (2 workers)")
        assert len(command.workers()) == 2, command.printed()
        yield command


# -- the kernel's view of processes and connections ---------------------------------------


def _stat_fields(pid: int) -> list[str]:
    # The fields after the command name (which may hold spaces): state, ppid, pgrp, session...
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _processes() -> Iterable[tuple[int, list[str], str]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z":
            yield int(entry.name), fields, command


def children(parent: int, marker: str) -> dict[int, str]:
    """The live processes whose parent is ``parent`` and whose command has ``marker``."""
    return {
        pid: command
        for pid, fields, command in _processes()
        if int(fields[1]) == parent and marker in command
    }


def in_session(session: int) -> list[int]:
    """The live processes of a session (the test starts each command in its own)."""
    return [pid for pid, fields, _ in _processes() if int(fields[3]) == session]


def connection_owners(port: int, pids: Iterable[int]) -> dict[int, int]:
    """Client port → the pid among ``pids`` holding the server's end of its connection to port."""
    owner_of_inode: dict[int, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner_of_inode[int(target[8:-1])] = pid
    owners: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            local, remote, state, inode = columns[1], columns[2], columns[3], int(columns[9])
            established = state == "01"
            if (
                established
                and int(local.rpartition(":")[2], 16) == port
                and inode in owner_of_inode
            ):
                owners[int(remote.rpartition(":")[2], 16)] = owner_of_inode[inode]
    return owners


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def wait_until_gone(pids: dict[int, str], seconds: float = EXIT_SECONDS) -> dict[int, str]:
    """The processes of ``pids`` still running after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = {pid: command for pid, command in pids.items() if still_running(pid, command)}
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


# -- HTTP on raw connections, so that each request's connection is known ------------------


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a kept-alive connection: the answer's status and body."""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def close(writer: asyncio.StreamWriter) -> None:
    """Close a client connection with a reset: many requests leave no TIME_WAIT behind.

    (A client's TIME_WAIT holds its port, which tests looking for free ports must skip.)
    """
    with contextlib.suppress(OSError):
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    writer.close()


async def request(port: int, method: str = "GET", path: str = "/metrics") -> int:
    """The status of one request on a new connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        status, _ = await exchange(reader, writer, method, path)
        return status
    finally:
        close(writer)


# What a client sees of a connection its server died on.
RESET = (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)


async def request_retrying_once(port: int) -> int:
    """As a client that retries once when the connection is reset (or closed unanswered)."""
    try:
        return await request(port)
    except RESET:
        return await request(port)


# -- the tests ----------------------------------------------------------------------------


async def test_connections_are_answered_by_both_workers(gateway: Command) -> None:
    workers = gateway.workers()
    connections = [
        await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(CONNECTIONS)
    ]
    try:
        answers = [await exchange(r, w, "POST", "/api/list_keys") for r, w in connections]
        assert answers == [(200, b'{"success": "true", "keys": []}')] * CONNECTIONS
        # Each connection is still open (kept alive): find which process holds its other end.
        owners = connection_owners(gateway.port, [*workers, gateway.process.pid])
        client_ports = [w.get_extra_info("sockname")[1] for _, w in connections]
        served_by = [owners.get(port) for port in client_ports]
    finally:
        for _, writer in connections:
            close(writer)
    assert None not in served_by, (served_by, owners)
    # Every connection is on a worker (the parent never accepts one), and on each worker some.
    assert set(served_by) == set(workers), (served_by, workers)


async def test_a_killed_worker_is_restarted_while_the_port_keeps_answering(
    gateway: Command,
) -> None:
    workers = gateway.workers()
    victim = min(workers)
    statuses: list[int] = []
    failures: list[BaseException] = []
    stopping = asyncio.Event()

    async def client() -> None:
        while not stopping.is_set():
            try:
                statuses.append(await request_retrying_once(gateway.port))
            except (OSError, asyncio.IncompleteReadError) as error:
                failures.append(error)
            await asyncio.sleep(0.01)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        await asyncio.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while len(now := gateway.workers()) != 2 or victim in now:
            assert time.monotonic() < deadline, f"no new worker:\n{gateway.printed()}"
            await asyncio.sleep(0.05)
        (replacement,) = set(now) - set(workers)
        await gateway.wait_printed(f"listening (pid {replacement})", 10)
        await asyncio.sleep(0.3)  # requests on the new worker too
    finally:
        stopping.set()
        await asyncio.gather(*clients)
    assert failures == []
    assert len(statuses) > 50
    assert set(statuses) == {200}, statuses
    assert gateway.process.returncode is None
    assert f"(pid {victim}) was killed by SIGKILL" in gateway.printed()
    assert "starting it again in 0.5 s" in gateway.printed()
    # The new worker answers too.
    connections = [
        await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(CONNECTIONS)
    ]
    try:
        for reader, writer in connections:
            assert (await exchange(reader, writer, "GET", "/metrics"))[0] == 200
        owners = connection_owners(gateway.port, now)
    finally:
        for _, writer in connections:
            close(writer)
    assert set(owners.values()) == set(now)


async def test_sigterm_to_the_parent_stops_every_worker(gateway: Command) -> None:
    workers = gateway.workers()
    gateway.process.send_signal(signal.SIGTERM)
    assert await gateway.exit_code() == 0, gateway.printed()
    assert await wait_until_gone(workers, 0) == {}
    assert not accepts(gateway.port)
    assert "starting it again" not in gateway.printed()


async def test_workers_exit_when_the_parent_is_killed(gateway: Command) -> None:
    workers = gateway.workers()
    gateway.process.kill()
    await gateway.process.wait()
    assert await wait_until_gone(workers) == {}, gateway.printed()
    assert not accepts(gateway.port)


async def test_up_with_two_workers(tmp_path: Path) -> None:
    gateway_port, manager_port, first_node_port = free_ports()
    environment = {
        "IMAGECACHE_GATEWAY_PORT": str(gateway_port),
        "IMAGECACHE_MANAGER_PORT": str(manager_port),
        "IMAGECACHE_FIRST_NODE_PORT": str(first_node_port),
        "IMAGECACHE_MANAGER_URL": f"http://127.0.0.1:{manager_port}",
    }
    async with started(tmp_path, ["up", "--workers", "2"], environment, gateway_port) as up:
        await up.wait_printed("Ctrl-C stops everything.")
        assert f"images:    http://127.0.0.1:{gateway_port}  (2 gateway workers)" in up.printed()
        assert up.printed().count("imagecache is up") == 1
        workers = up.workers()
        assert len(workers) == 2, up.printed()
        # Both workers forward admin calls with the token the parent made up.
        connections = [
            await asyncio.open_connection("127.0.0.1", gateway_port) for _ in range(CONNECTIONS)
        ]
        try:
            for reader, writer in connections:
                answer = await exchange(reader, writer, "POST", "/api/getNumNodes")
                assert answer == (200, b'{"success": "true", "numNodes": 1}'), answer
            owners = connection_owners(gateway_port, workers)
        finally:
            for _, writer in connections:
                close(writer)
        assert set(owners.values()) == set(workers)

        up.process.send_signal(signal.SIGINT)
        assert await up.exit_code(20) == 0, up.printed()
        assert await wait_until_gone(workers, 0) == {}
        assert in_session(up.process.pid) == []  # no node or worker left
        assert not accepts(gateway_port)


async def test_a_taken_port_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = ["gateway", "--workers", "2"]
        environment = {"IMAGECACHE_GATEWAY_PORT": str(port)}
        async with started(tmp_path, args, environment, port) as command:
            assert await command.exit_code() == 2
            assert f"cannot listen on 127.0.0.1:{port}" in command.printed()
            assert "gateway worker" not in command.printed()


async def test_a_worker_that_cannot_start_stops_the_command(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    port, _ = two_free_ports()
    environment = {
        "IMAGECACHE_GATEWAY_PORT": str(port),
        # A database inside a file: every worker fails to open it.
        "IMAGECACHE_METADATA_URL": f"sqlite+aiosqlite:///{tmp_path}/file/imagecache.db",
    }
    args = ["gateway", "--workers", "2"]
    async with started(tmp_path, args, environment, port) as command:
        assert await command.exit_code(START_SECONDS) == 1, command.printed()
        assert "did not start" in command.printed()
        assert in_session(command.process.pid) == []


def test_workers_setting_from_the_file_and_the_environment(tmp_path: Path) -> None:
    assert load_config(environ={}).gateway.workers == 0  # the command's default
    settings = tmp_path / "imagecache.toml"
    settings.write_text("[gateway]\nworkers = 3\n")
    assert load_config(settings, environ={}).gateway.workers == 3
    environ = {"IMAGECACHE_GATEWAY_WORKERS": "2"}
    assert load_config(settings, environ=environ).gateway.workers == 2
    for bad in ("-1", "many", "1000"):
        with pytest.raises(ConfigError, match=r"gateway\.workers"):
            load_config(environ={"IMAGECACHE_GATEWAY_WORKERS": bad})


def test_up_uses_the_cores_but_not_too_many() -> None:
    assert default_workers() == max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))
    assert 1 <= default_workers() <= MAX_DEFAULT_WORKERS


def test_a_crash_loop_backs_off() -> None:
    delays: list[float] = []
    delay: float | None = None
    for _ in range(10):  # dies at once, again and again
        delay = restart_delay(delay, 0.1)
        delays.append(delay)
    assert delays[:3] == [FIRST_RESTART_DELAY, FIRST_RESTART_DELAY * 2, FIRST_RESTART_DELAY * 4]
    assert delays == sorted(delays)
    assert delays[-1] == MAX_RESTART_DELAY
    # A worker that ran for a while is started again at once.
    assert restart_delay(MAX_RESTART_DELAY, STABLE_SECONDS) == FIRST_RESTART_DELAY
