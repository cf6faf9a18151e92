"""The system's parts as real processes for tests: a manager and gateways on free ports.

Every part runs as ``python -m launcher <part>`` in one data directory (they
share its SQLite file and blob folder), configured only through its
``IMAGECACHE_*`` environment, with stdout and stderr appended to its own log
file. Each process carries a tag in its environment that the cache nodes the
manager starts inherit, so ``Processes.kill_all`` finds and SIGKILLs every one
of them, nodes orphaned by a killed manager included, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from cachenode.client import NodeClient
from cachenode.errors import NodeError
from cachenode.routing import parse_address
from imagecache.appbase import every
from imagecache.blobs import FolderBlobStore
from imagecache.cachepool import CachePool
from imagecache.catalog import ImageCatalog
from imagecache.database import Database
from imagecache.invalidation import Invalidator
from imagecache.membership import RENEW_SECONDS, MembershipFollower
from imagecache.poolmembers import MembershipStore
from imagecache.service import ImageService

# The ports of a system someone may run by hand on this machine: never used by tests.
RESERVED_PORTS = frozenset({5000, 5001, 11311})
# Ports the manager's local pool may use from its first port up: 8 nodes, plus ports
# held by nodes that a killed manager left behind.
NODE_PORTS = 64
TAG_VARIABLE = "TESTS_PROCESS_TAG"  # not IMAGECACHE_*: no setting of the system
START_SECONDS = 45.0


class HarnessError(RuntimeError):
    """A process of the system could not be started or probed: the test setup failed."""


def _can_bind(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def quiet_port_range() -> range:
    """Ports the kernel never picks as the local port of an outgoing connection.

    A part restarted on its port must be able to bind it again. On a busy machine
    thousands of closed client connections sit in TIME_WAIT on ports of the
    ephemeral range, and a port there that was free a moment ago may be held by
    one; outside that range no client connection ever takes it.
    """
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(part) for part in text.split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return max(range(10000, low), range(high + 1, 65536), key=len)


def free_ports(count: int, *, node_ports: int = NODE_PORTS) -> tuple[list[int], int]:
    """``count`` free loopback ports and the base of ``node_ports`` free ones after them.

    One block of consecutive ports at a random place of ``quiet_port_range``, none
    of them reserved (best effort: nothing holds them meanwhile).
    """
    span, chooser = quiet_port_range(), random.SystemRandom()
    size = count + node_ports
    for _ in range(200):
        start = chooser.randrange(span.start, span.stop - size)
        block = range(start, start + size)
        if not RESERVED_PORTS & set(block) and all(_can_bind(port) for port in block):
            return list(block[:count]), start + count
    raise HarnessError(f"found no {size} free ports in a row on 127.0.0.1")


@dataclass(frozen=True, slots=True)
class SystemLayout:
    """Where one system lives: its folder, ports and shared secrets."""

    root: Path
    manager_port: int
    gateway_ports: tuple[int, ...]
    first_node_port: int
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    password: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def on_free_ports(cls, root: Path, gateways: int) -> SystemLayout:
        ports, first_node_port = free_ports(1 + gateways)
        return cls(root, ports[0], tuple(ports[1:]), first_node_port)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def database(self) -> Path:
        return self.data_dir / "imagecache.db"

    @property
    def manager_url(self) -> str:
        return f"http://127.0.0.1:{self.manager_port}"

    def environment(self, **extra: str) -> dict[str, str]:
        """The environment of every part: this system's settings and nothing inherited."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("IMAGECACHE_")}
        environment.update(
            PYTHONUNBUFFERED="1",
            IMAGECACHE_DATA_DIR=str(self.data_dir),
            IMAGECACHE_MANAGER_URL=self.manager_url,
            IMAGECACHE_MANAGER_HOST="127.0.0.1",
            IMAGECACHE_MANAGER_PORT=str(self.manager_port),
            IMAGECACHE_MANAGER_TOKEN=self.token,
            IMAGECACHE_MANAGER_PASSWORD=self.password,
            IMAGECACHE_SECRET_KEY=self.token,
            IMAGECACHE_FIRST_NODE_PORT=str(self.first_node_port),
            # Only until the manager has published its membership.
            IMAGECACHE_NODES=f"127.0.0.1:{self.first_node_port}",
            IMAGECACHE_GATEWAY_HOST="127.0.0.1",
        )
        environment.update(extra)
        return environment


Probe = Callable[[aiohttp.ClientSession], Awaitable[bool]]


@dataclass
class PartProcess:
    """One part of the system (``imagecache <command>``), started and killed by the test."""

    name: str
    command: str  # "manager" or "gateway"
    port: int
    environment: dict[str, str]
    workdir: Path
    probe: Probe
    process: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, within: float = START_SECONDS) -> None:
        """Start the process and return once its probe succeeds.

        Raises HarnessError (with the tail of its log) when it exits or does not
        answer within ``within`` seconds; it is killed then.
        """
        if self.running:
            raise HarnessError(f"{self.name} is already running")
        self.starts += 1
        with self.log_path.open("a") as log:
            log.write(f"\n==== test: start #{self.starts} of {self.name} at {time.time():.3f}\n")
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "launcher",
                self.command,
                cwd=self.workdir,
                env=self.environment,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the test run does not reach it
            )
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                if self.process.returncode is not None:
                    raise HarnessError(
                        f"{self.name} exited with code {self.process.returncode} while starting:"
                        f"\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    if await self.probe(http):
                        return
                if time.monotonic() > deadline:
                    await self.kill()
                    raise HarnessError(
                        f"{self.name} did not answer on port {self.port} within {within:g} s:"
                        f"\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        """SIGKILL the process alone (not the nodes it started) and reap it."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()
        with self.log_path.open("a") as log:
            log.write(f"==== test: {self.name} killed at {time.time():.3f}\n")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """The manager and gateways of one system; ``kill_all`` ends them and their nodes."""

    def __init__(self, layout: SystemLayout) -> None:
        self.layout = layout
        self.tag = uuid.uuid4().hex
        layout.data_dir.mkdir(parents=True, exist_ok=True)
        self.manager = PartProcess(
            "manager",
            "manager",
            layout.manager_port,
            layout.environment(**{TAG_VARIABLE: self.tag}),
            layout.root,
            self._manager_answers,
        )
        self.gateways = [
            PartProcess(
                f"gateway-{number}",
                "gateway",
                port,
                layout.environment(
                    **{TAG_VARIABLE: self.tag, "IMAGECACHE_GATEWAY_PORT": str(port)}
                ),
                layout.root,
                _gateway_answers(port),
            )
            for number, port in enumerate(layout.gateway_ports, 1)
        ]

    @property
    def parts(self) -> list[PartProcess]:
        return [self.manager, *self.gateways]

    async def _manager_answers(self, http: aiohttp.ClientSession) -> bool:
        url = f"{self.layout.manager_url}/internal/getNumNodes"
        headers = {"Authorization": f"Bearer {self.layout.token}"}
        async with http.post(url, headers=headers) as reply:
            return reply.status == 200

    async def start(self) -> None:
        """The manager (and so its first node), then the gateways, each answering."""
        await self.manager.start()
        # Every start runs to its end (answering or failed) before one failure is raised.
        outcomes = await asyncio.gather(
            *(gateway.start() for gateway in self.gateways), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def tagged_pids(self) -> list[int]:
        """Every live process carrying this system's tag: parts and cache nodes."""
        marker = f"{TAG_VARIABLE}={self.tag}".encode()
        found: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environment = (entry / "environ").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if marker in environment and state != "Z":
                found.append(int(entry.name))
        return found

    async def kill_all(self, within: float = 10.0) -> list[int]:
        """SIGKILL every part and every node of this system; the pids still alive after.

        Never raises: it runs in teardown, after failures of any kind.
        """
        for part in self.parts:
            if part.process is not None and part.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    part.process.kill()
        deadline = time.monotonic() + within
        while True:
            left = self.tagged_pids()
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        for part in self.parts:
            if part.process is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(part.process.wait(), 5)
        return left

    def node_processes(self) -> dict[int, int]:
        """This system's ``imagecache node`` processes: pid by the port each listens on."""
        found: dict[int, int] = {}
        for pid in self.tagged_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            port = argv[argv.index("--port") + 1] if "--port" in argv[:-1] else ""
            if "node" in argv and port.isdigit():
                found[int(port)] = pid
        return found

    async def node_pid(self, address: str) -> int | None:
        """The pid of the node at ``address``: from /proc, else from its STATS."""
        pid = self.node_processes().get(parse_address(address)[1])
        return pid if pid is not None else await node_pid(address)

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(
            f"---- last {lines} lines of {part.log_path} ----\n{part.log_tail(lines)}"
            for part in self.parts
        )


def _gateway_answers(port: int) -> Probe:
    async def probe(http: aiohttp.ClientSession) -> bool:
        async with http.post(f"http://127.0.0.1:{port}/api/list_keys") as reply:
            return reply.status == 200

    return probe


# -- the pool's nodes ---------------------------------------------------------------


def pool_addresses(database: Path) -> list[str]:
    """The node addresses of the membership published in the SQLite file (any state)."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2)
        ) as connection:
            rows = connection.execute("SELECT address FROM nodes ORDER BY position").fetchall()
    except sqlite3.Error:
        return []
    return [str(address) for (address,) in rows]


async def node_pid(address: str, seconds: float = 1.0) -> int | None:
    """The process id a node reports in STATS, or None when it does not answer."""
    host, port = parse_address(address)
    try:
        async with NodeClient(host, port, pool_size=1, timeout=seconds) as client:
            stats = await client.stats()
    except (NodeError, OSError, TimeoutError):
        return None
    pid = stats.get("pid")
    return pid if isinstance(pid, int) else None


# -- a gateway over fixed nodes, and one in the test's own process -------------------------------


def gateway_on_nodes(root: Path, name: str, nodes: Sequence[str]) -> PartProcess:
    """An ``imagecache gateway`` process over ``root``/data, routed to ``nodes``
    (no manager: until one publishes a membership, the configured nodes are it).

    Start it with ``start``; ``kill`` it when done.
    """
    (port,), _ = free_ports(1, node_ports=0)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IMAGECACHE_")}
    environment.update(
        PYTHONUNBUFFERED="1",
        IMAGECACHE_DATA_DIR=str(data_dir),
        IMAGECACHE_NODES=",".join(nodes),
        IMAGECACHE_GATEWAY_HOST="127.0.0.1",
        IMAGECACHE_GATEWAY_PORT=str(port),
        IMAGECACHE_MANAGER_URL="http://127.0.0.1:9",  # no manager listens there
    )
    return PartProcess(name, "gateway", port, environment, root, _gateway_answers(port))


@dataclass
class EmbeddedGateway:
    """What one gateway process holds, made in the test's process so that a test
    can hold its steps; it shares the data folder and nodes of the real ones."""

    service: ImageService
    catalog: ImageCatalog
    blobs: FolderBlobStore
    pool: CachePool


@asynccontextmanager
async def embedded_gateway(
    data_dir: Path,
    nodes: Sequence[str],
    *,
    catalog_type: type[ImageCatalog] = ImageCatalog,
    blobs: FolderBlobStore | None = None,
    pool: CachePool | None = None,
) -> AsyncIterator[EmbeddedGateway]:
    """A gateway's catalog, blob store, pool (following the membership as the
    app does, registered and renewing its view) and image service over
    ``data_dir``; without its web app and its delivery loop."""
    url = f"sqlite+aiosqlite:///{data_dir / 'imagecache.db'}"
    blobs = FolderBlobStore(data_dir / "blobs") if blobs is None else blobs
    await blobs.prepare()
    pool = CachePool() if pool is None else pool
    async with AsyncExitStack() as stack:
        catalog_db = await stack.enter_async_context(Database.open(url))
        membership_db = await stack.enter_async_context(Database.open(url))
        catalog = await catalog_type.open(catalog_db)
        membership = await MembershipStore.open(membership_db)
        stack.push_async_callback(pool.close)
        view = MembershipFollower(membership, pool, tuple(nodes))
        await view.refresh()
        stack.push_async_callback(view.leave)
        renewing = asyncio.create_task(every(RENEW_SECONDS, view.refresh))
        stack.push_async_callback(_cancelled, renewing)
        service = ImageService(catalog, blobs, pool, Invalidator(catalog, membership, view, pool))
        yield EmbeddedGateway(service, catalog, blobs, pool)


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- the HTTP API as clients use it ----------------------------------------------------------


async def upload_image(http: aiohttp.ClientSession, gateway: str, key: str, data: bytes) -> int:
    """POST ``data`` as the image of ``key`` to the gateway at ``gateway`` (a URL);
    the status it answered (200: acknowledged)."""
    form = aiohttp.FormData()
    form.add_field("key", key)
    form.add_field("file", data, filename=f"{key}.png")
    async with http.post(f"{gateway}/api/upload", data=form) as reply:
        await reply.read()
        return reply.status


async def read_image(http: aiohttp.ClientSession, gateway: str, key: str) -> tuple[int, bytes]:
    """``GET /image/<key>`` (the route with the fast path): its status and body."""
    async with http.get(f"{gateway}/image/{key}") as reply:
        return reply.status, await reply.read()


async def early_in_a_minute(seconds_left: float = 40.0) -> None:
    """Wait, if need be, until the wall clock's minute has ``seconds_left`` to run.

    The manager closes its miss curve's windows on the minute: a test that
    reads what it posted in one window must not straddle two.
    """
    into = time.time() % 60
    if into > 60 - seconds_left:
        await asyncio.sleep(60 - into + 0.2)
