"""Fencing across processes: where one process's knowledge used to stay its own (issue 9).

Each test runs the system's parts as processes sharing one data folder, on
free loopback ports, and makes one of them miss something at a chosen moment
(SIGSTOP, SIGKILL, a cut link), then checks what the others may serve:

- membership by timing: a gateway paused during a shrink holds the shrink up
  until its view's lease has run out, and once resumed serves nothing older
  than an upload acknowledged meanwhile (the manager used to sleep 1.2 s and
  go on, and the paused gateway kept reading a node no other gateway told);
  where the leaving node keeps running, the resumed gateway renews its view
  before it reads from the cache;
- dirty nodes known to one process: a node that missed an upload's
  invalidation serves that key through no gateway, though the uploader died
  (another gateway heals it from the outbox); healing it delivers what it
  missed and keeps its other keys (it used to be wiped by the one gateway
  that knew, or by nobody);
- the dashboard's delete-all during a grow leaves no image on any node,
  joining ones included; a node that failed to leave is cleared before it
  is adopted again at the manager's start.

Two tests run the manager in this process over a stub backend whose nodes
outlive a manager and may fail to stop (as cloud instances do): the local pool
stops a leaving node at once and never adopts one again, so it cannot show
those paths; gateways and nodes are processes there too.

Why a link and not only SIGSTOP for a lost invalidation: a paused node's
kernel still takes what is sent to it, and the node acts on it when it
resumes (a DELETE that timed out is applied a moment later), so a paused
node never misses anything. A ``Link`` between the gateways and the node
stands for the network: while cut it loses what either side sends, and
mending it resets the connections that lost bytes, as TCP would give up on
them.

    .venv/bin/pytest -q tests/test_fencing.py
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image as PILImage
from PIL import PngImagePlugin, UnidentifiedImageError

from cachenode.client import CachedItem, NodeClient
from cachenode.routing import parse_address
from imagecache.config import load_config
from manager.app import backend_ctx
from manager.app import create_app as create_manager
from manager.appkeys import BACKEND
from manager.backends.base import NodeHandle, PoolError
from tests.conftest import NodeProcess, start_node_process
from tests.processes import HarnessError, PartProcess, Processes, SystemLayout

# The gateway's view lease and how often it renews it (imagecache.membership; not
# imported, so that this module also runs against the code before issue 9).
VIEW_LEASE_SECONDS = 3.0
RENEW_SECONDS = 0.25
TEXT_CHUNK = "imagecache-fencing"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)  # a resize answers once it is done


# -- images that say which upload they are ------------------------------------------------


def image_of(key: str, number: int) -> bytes:
    """A small PNG whose text chunk says it is upload ``number`` of ``key``."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK, f"{key}#{number}")
    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4), (number * 40 % 256, len(key) * 9 % 256, 99)).save(
        buffer, format="PNG", pnginfo=info
    )
    return buffer.getvalue()


def label_of(data: bytes) -> str:
    """``key#number`` of an ``image_of`` image; a short description of anything else."""
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            label = image.info.get(TEXT_CHUNK)
    except (UnidentifiedImageError, OSError, ValueError):
        label = None
    return label if isinstance(label, str) else f"not a test image: {data[:40]!r}"


# -- the shared SQLite file, read as any process would ------------------------------------


def _rows(database: Path, query: str) -> list[tuple[Any, ...]] | None:
    """The rows of a read-only query; None when its table does not exist (an older schema)."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
        ) as connection:
            return connection.execute(query).fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return None
        raise


async def members(database: Path) -> list[tuple[str, str, str]]:
    """The published membership: (node id, address, state) in order."""
    rows = await asyncio.to_thread(
        _rows, database, "SELECT node_id, address, state FROM nodes ORDER BY position"
    )
    return [(str(n), str(a), str(s)) for n, a, s in rows or []]


async def dirty_nodes(database: Path) -> list[str] | None:
    """Ids of the nodes marked dirty; None when the schema has no dirty marks."""
    rows = await asyncio.to_thread(_rows, database, "SELECT node_id FROM dirty_nodes")
    return None if rows is None else sorted(str(node_id) for (node_id,) in rows)


async def gateway_leases(database: Path) -> dict[str, int] | None:
    """Each registered gateway's lease end (microseconds since the epoch); None
    when the schema has no gateway registry."""
    rows = await asyncio.to_thread(_rows, database, "SELECT gateway_id, expires_us FROM gateways")
    return None if rows is None else {str(g): int(e) for g, e in rows}


def _write_lock_free(database: Path) -> bool:
    with contextlib.closing(sqlite3.connect(database, timeout=0.3, isolation_level=None)) as db:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        db.execute("ROLLBACK")
        return True


# -- processes --------------------------------------------------------------------------


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"
    except (OSError, IndexError):
        return False


async def pause(pid: int, database: Path | None = None) -> None:
    """SIGSTOP ``pid``; with ``database``, at a moment it holds no write lock on it
    (a process paused inside a write would hold up every other writer)."""
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        for _ in range(1000):  # a signal takes effect a moment later
            if _stopped(pid):
                break
            await asyncio.sleep(0.001)
        if database is None or await asyncio.to_thread(_write_lock_free, database):
            return
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(random.uniform(0.005, 0.03))
    raise HarnessError(f"process {pid} never paused outside a database write")


def resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def pid_of(part: PartProcess) -> int:
    process = part.process
    if process is None or process.returncode is not None:
        raise HarnessError(f"{part.name} is not running")
    return process.pid


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float, what: str, every: float = 0.02
) -> None:
    """Return once ``check`` holds; AssertionError saying ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not so within {within:g} s: {what}")
        await asyncio.sleep(every)


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[Processes]:
    """A manager and two gateways over one data folder, not started yet; every
    process of it is killed afterwards (their logs are printed: a failure shows them)."""
    processes = Processes(SystemLayout.on_free_ports(tmp_path, gateways=2))
    try:
        yield processes
    finally:
        left = await processes.kill_all()
        for part in processes.parts:  # pytest shows this output when the test failed
            if part.starts:
                print(f"---- last 60 lines of {part.log_path} ----\n{part.log_tail(60)}")
        assert not left, f"processes still running after the test: {left}"


@pytest.fixture
def node_processes() -> Iterator[Callable[[], Awaitable[NodeProcess]]]:
    """Starts cache node processes for a test (``await start()``); kills them after."""
    started: list[NodeProcess] = []

    async def start() -> NodeProcess:
        node = await asyncio.to_thread(start_node_process, "--capacity-mb", "64")
        started.append(node)
        return node

    yield start
    for node in started:
        node.process.kill()
        node.stop()


# -- a link that the test can cut ----------------------------------------------------------


@dataclass(eq=False)
class _Passage:
    """One client connection through the link and its connection to the node."""

    transports: list[asyncio.WriteTransport] = field(default_factory=list)
    lost_bytes: bool = False

    def reset(self) -> None:
        for transport in self.transports:
            transport.abort()


class Link:
    """A TCP link on a free loopback port to one node.

    While cut, what either side sends is lost, and new connections lead
    nowhere; mending it resets every connection that lost bytes (TCP would have
    given up on it) and lets the others go on.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._passages: set[_Passage] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.is_cut = False

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    def cut(self) -> None:
        self.is_cut = True

    def mend(self) -> None:
        self.is_cut = False
        for passage in list(self._passages):
            if passage.lost_bytes:
                passage.reset()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for passage in list(self._passages):
            passage.reset()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        passage = _Passage([writer.transport])
        self._passages.add(passage)
        try:
            if self.is_cut:  # nowhere to go: what it sends is lost
                passage.lost_bytes = True
                while await reader.read(1 << 16):
                    pass
                return
            node_reader, node_writer = await asyncio.open_connection(*self._target)
            passage.transports.append(node_writer.transport)
            await asyncio.gather(
                self._pump(reader, node_writer, passage), self._pump(node_reader, writer, passage)
            )
        except OSError:
            pass
        finally:
            passage.reset()
            self._passages.discard(passage)
            self._tasks.discard(task)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, passage: _Passage
    ) -> None:
        try:
            while data := await source.read(1 << 16):
                if self.is_cut or passage.lost_bytes:
                    passage.lost_bytes = True  # this stream has a hole now
                    continue
                sink.write(data)
                await sink.drain()
            if not passage.lost_bytes and sink.can_write_eof():
                sink.write_eof()
        except OSError:
            passage.reset()


# -- the HTTP API, the dashboard and the nodes as clients use them -------------------------


def session() -> aiohttp.ClientSession:
    # unsafe: the dashboard's session cookie comes from 127.0.0.1, an IP address.
    return aiohttp.ClientSession(timeout=HTTP_TIMEOUT, cookie_jar=aiohttp.CookieJar(unsafe=True))


async def upload(http: aiohttp.ClientSession, gateway: PartProcess, key: str, number: int) -> str:
    """Upload ``image_of(key, number)`` through ``gateway``: its status and answer."""
    form = aiohttp.FormData()
    form.add_field("key", key)
    form.add_field("file", image_of(key, number), filename=f"{key}.png", content_type="image/png")
    async with http.post(f"{gateway.url}/api/upload", data=form) as reply:
        return f"{reply.status} {(await reply.text())[:300]}"


async def upload_acknowledged(
    http: aiohttp.ClientSession, gateway: PartProcess, key: str, number: int
) -> None:
    answer = await upload(http, gateway, key, number)
    assert answer.startswith("200 "), f"upload #{number} of {key} on {gateway.name}: {answer}"


async def read(http: aiohttp.ClientSession, gateway: PartProcess, key: str) -> str:
    """``GET /image/<key>`` (the route with the fast path): the image's label, or the status."""
    async with http.get(f"{gateway.url}/image/{key}") as reply:
        body = await reply.read()
        return label_of(body) if reply.status == 200 else f"status {reply.status}"


async def resize(http: aiohttp.ClientSession, gateway: PartProcess, nodes: int) -> str:
    """``configure_cache`` to ``nodes`` nodes through ``gateway``: status and answer."""
    async with http.post(
        f"{gateway.url}/api/configure_cache", params={"mode": "manual", "numNodes": str(nodes)}
    ) as reply:
        return f"{reply.status} {(await reply.text())[:300]}"


async def routed_nodes(http: aiohttp.ClientSession, gateway: PartProcess) -> int:
    """How many nodes ``gateway`` routes reads to now (its Prometheus gauge)."""
    async with http.get(f"{gateway.url}/metrics") as reply:
        text = await reply.text()
    for line in text.splitlines():
        if line.startswith("imagecache_gateway_cache_nodes "):
            return int(float(line.split()[1]))
    raise HarnessError(f"{gateway.name} reports no imagecache_gateway_cache_nodes")


async def log_in(http: aiohttp.ClientSession, layout: SystemLayout) -> str:
    """Log in to the manager's dashboard; the form token of the session."""
    async with http.post(
        f"{layout.manager_url}/login", data={"password": layout.password, "next": "/config"}
    ) as reply:
        page = await reply.text()
        assert reply.status == 200, f"login: {reply.status} {page[:300]}"
    return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def node_client(address: str) -> NodeClient:
    host, port = parse_address(address)
    return NodeClient(host, port, pool_size=1, timeout=3)


async def node_item(address: str, key: str) -> CachedItem | None:
    async with node_client(address) as client:
        return await client.get_item(key.encode())


async def node_stats(address: str) -> dict[str, Any]:
    async with node_client(address) as client:
        return await client.stats()


async def images_on(address: str, keys: Sequence[str]) -> dict[str, str]:
    """The label of every item of ``keys`` the node holds."""
    found: dict[str, str] = {}
    async with node_client(address) as client:
        for key in keys:
            item = await client.get_item(key.encode())
            if item is not None:
                found[key] = label_of(item.value)
    return found


async def first_key_on(address: str, keys: Sequence[str]) -> str:
    for key in keys:
        if await node_item(address, key) is not None:
            return key
    raise HarnessError(f"none of {len(keys)} keys is cached on {address}")


# -- 1. membership by timing --------------------------------------------------------------


async def test_a_paused_gateway_holds_up_a_shrink_and_serves_nothing_older_after_it(
    system: Processes,
) -> None:
    """A shrink through one gateway while the other is paused (SIGSTOP, so it
    acknowledges nothing) must wait for the paused gateway's view lease to run
    out before the leaving node stops being told of uploads; an upload
    acknowledged meanwhile must win over anything that gateway held or could
    reach once it resumes: it renews its view before it serves from the cache."""
    database = system.layout.database
    first, paused = system.gateways
    await system.start()
    keys = [f"shrink-{number}" for number in range(12)]
    async with session() as http:
        assert (answer := await resize(http, first, 2)).startswith("200 "), answer
        leaving = (await members(database))[-1]  # a shrink stops the newest node
        for key in keys:
            await upload_acknowledged(http, first, key, 1)
        for key in keys:
            for _ in range(2):  # the second read is the fast path's, from a kept copy
                assert (seen := await read(http, paused, key)) == f"{key}#1", seen
        key = await first_key_on(leaving[1], keys)

        await pause(pid_of(paused), database)
        paused_at = time.time()
        lease_end = await _stalled_lease_end(database)
        shrink_done: list[float] = []

        async def shrink() -> str:
            answer = await resize(http, first, 1)
            shrink_done.append(time.time())
            return answer

        shrinking = asyncio.create_task(shrink())
        try:

            async def node_gone() -> bool:
                return leaving[0] not in {n for n, _, _ in await members(database)}

            await eventually(node_gone, 20, f"{leaving[0]} left the published membership")

            async def first_follows() -> bool:
                return await routed_nodes(http, first) == 1

            await eventually(first_follows, 5, f"{first.name} routes over one node")
            await upload_acknowledged(http, first, key, 2)
            # The read is sent before the gateway resumes: it is the first thing it sees.
            reading = asyncio.create_task(read(http, paused, key))
            await asyncio.sleep(0.2)
        finally:
            resume(pid_of(paused))
        seen = await reading
        answer = await shrinking
    assert answer.startswith("200 "), f"the shrink failed: {answer}"
    problems = []
    if seen != f"{key}#2":
        problems.append(
            f"STALE READ: {paused.name}, paused during the shrink, answered {seen} for {key} "
            f"after {key}#2 was acknowledged through {first.name}"
        )
    earliest = lease_end if lease_end is not None else paused_at + VIEW_LEASE_SECONDS - 0.5
    if shrink_done[0] < earliest:
        problems.append(
            f"EARLY: the shrink completed {earliest - shrink_done[0]:.2f} s before the paused "
            f"gateway's view lease ran out ({shrink_done[0] - paused_at:.2f} s after the pause"
            + ("; the schema has no gateway registry" if lease_end is None else "")
            + ")"
        )
    assert not problems, "\n".join(problems)


async def _stalled_lease_end(database: Path, within: float = 3.0) -> float | None:
    """The lease end (Unix time) of the one registered gateway that stopped renewing
    while the others renew; None when the schema has no gateway registry."""
    first = await gateway_leases(database)
    if first is None:
        return None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        await asyncio.sleep(RENEW_SECONDS)
        now = await gateway_leases(database) or {}
        stalled = [g for g, expires in now.items() if first.get(g) == expires]
        if len(stalled) == 1 and len(now) > 1:
            return now[stalled[0]] / 1_000_000
    raise HarnessError(f"no single stalled gateway lease in {first} within {within:g} s")


# -- 2. dirty nodes known to one process ---------------------------------------------------


@dataclass
class LinkedNode:
    """A node process behind a link, and two gateways (no manager) routed over the link."""

    node: NodeProcess
    link: Link
    uploader: PartProcess
    reader: PartProcess

    @property
    def address(self) -> str:
        return f"{self.node.host}:{self.node.port}"

    def lose_everything(self) -> None:
        """The node hangs, and what is sent to it meanwhile is lost."""
        os.kill(self.node.process.pid, signal.SIGSTOP)
        self.link.cut()

    def come_back(self) -> None:
        self.link.mend()
        os.kill(self.node.process.pid, signal.SIGCONT)


@pytest.fixture
async def linked_node(
    system: Processes, node_processes: Callable[[], Awaitable[NodeProcess]]
) -> AsyncIterator[LinkedNode]:
    node = await node_processes()
    link = Link(node.host, node.port)
    await link.open()
    try:
        for gateway in system.gateways:  # the membership they publish is this one node
            gateway.environment["IMAGECACHE_NODES"] = link.address
        uploader, reader = system.gateways
        await asyncio.gather(uploader.start(), reader.start())
        yield LinkedNode(node, link, uploader, reader)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.process.pid, signal.SIGCONT)
        await link.close()


async def _cache_two_keys(http: aiohttp.ClientSession, setup: LinkedNode, keys: list[str]) -> None:
    """Upload #1 of ``keys`` and read them through the reader: the node holds them."""
    for key in keys:
        await upload_acknowledged(http, setup.reader, key, 1)
        assert (seen := await read(http, setup.reader, key)) == f"{key}#1", seen

    async def cached() -> bool:
        return len(await images_on(setup.address, keys)) == len(keys)

    await eventually(cached, 5, f"the node holds {keys}")


async def test_a_node_that_missed_an_invalidation_serves_it_nowhere_though_its_uploader_died(
    system: Processes, linked_node: LinkedNode
) -> None:
    """The node hangs and loses the uploader's invalidation; the upload is
    acknowledged; the uploader is SIGKILLed (what it knew dies with it); the
    node comes back. The other gateway must never serve the replaced image,
    and must heal the node by itself."""
    setup, database = linked_node, system.layout.database
    key, other = "fenced", "bystander"
    async with session() as http:
        await _cache_two_keys(http, setup, [key, other])
        setup.lose_everything()
        try:
            await upload_acknowledged(http, setup.uploader, key, 2)
            marks = await dirty_nodes(database)  # None: the old schema, which has none
            assert marks is None or marks == [setup.link.address], f"dirty marks: {marks}"
            await setup.uploader.kill()
        finally:
            setup.come_back()
        seen = []
        reading_until = time.monotonic() + 1.5
        while time.monotonic() < reading_until:
            seen.append(await read(http, setup.reader, key))
            await asyncio.sleep(0.02)
        stale = [label for label in seen if label != f"{key}#2"]
        assert not stale, (
            f"STALE READ: {len(stale)} of {len(seen)} reads of {key} through {setup.reader.name}"
            f" after {key}#2 was acknowledged and its uploader killed: {stale[:5]}"
        )

        async def healed() -> bool:
            return await dirty_nodes(database) == []

        await eventually(healed, 10, "the surviving gateway healed the node (no dirty mark)")
        assert (seen_after := await read(http, setup.reader, key)) == f"{key}#2", seen_after


async def test_healing_a_node_delivers_what_it_missed_and_keeps_its_other_keys(
    system: Processes, linked_node: LinkedNode
) -> None:
    """One invalidation the node missed (it hung and the link lost it) must not
    cost it every other key when it heals: the missed change is delivered, the
    dirty mark is lifted, and the node serves again."""
    setup, database = linked_node, system.layout.database
    key, other = "missed", "kept"
    async with session() as http:
        await _cache_two_keys(http, setup, [key, other])
        kept = await node_item(setup.address, other)
        assert kept is not None
        setup.lose_everything()
        try:
            await upload_acknowledged(http, setup.uploader, key, 2)
            marks = await dirty_nodes(database)
            assert marks is None or marks == [setup.link.address], f"dirty marks: {marks}"
        finally:
            setup.come_back()

        async def healed_or_emptied() -> bool:
            return await dirty_nodes(database) == [] or not await node_item(setup.address, other)

        await eventually(
            healed_or_emptied, 10, "the node's dirty mark lifted (or the node emptied)"
        )
        now = await node_item(setup.address, other)
        assert now == kept, (
            f"the heal emptied the node: {other} was {label_of(kept.value)} "
            f"(version {kept.version}) on it before, and is "
            + ("gone" if now is None else f"{label_of(now.value)} (version {now.version})")
        )
        missed = await node_item(setup.address, key)
        assert missed is None or label_of(missed.value) == f"{key}#2", label_of(missed.value)
        assert await dirty_nodes(database) == [], "the dirty mark is still there"
        for gateway in (setup.uploader, setup.reader):
            assert (seen := await read(http, gateway, key)) == f"{key}#2", (gateway.name, seen)
        hits_before = (await node_stats(setup.address))["hits"]

        async def served_by_the_node() -> bool:
            assert (seen := await read(http, setup.reader, other)) == f"{other}#1", seen
            return bool((await node_stats(setup.address))["hits"] > hits_before)

        await eventually(served_by_the_node, 5, f"reads of {other} hit the node again", 0.1)


# -- 3. the dashboard's delete-all, and a node that failed to leave -------------------------


async def test_dashboard_delete_all_during_a_grow_leaves_no_image_anywhere(
    system: Processes,
) -> None:
    """The dashboard's delete-all, sent while a grow copies keys to a joining
    node (the copies held up by pausing that node): afterwards no node holds
    any of the images, and every gateway answers 404 for every key."""
    database = system.layout.database
    await system.start()
    keys = [f"gone-{number}" for number in range(240)]
    async with session() as http:
        csrf = await log_in(http, system.layout)
        semaphore = asyncio.Semaphore(8)

        async def put(key: str) -> None:
            async with semaphore:
                await upload_acknowledged(http, system.gateways[0], key, 1)

        await asyncio.gather(*(put(key) for key in keys))
        (source,) = [address for _, address, _ in await members(database)]
        missing = set(keys) - set(await images_on(source, keys))  # a write-through may fail
        for key in sorted(missing):
            assert (seen := await read(http, system.gateways[1], key)) == f"{key}#1", seen

        async def all_cached() -> bool:
            return len(await images_on(source, keys)) == len(keys)

        await eventually(all_cached, 10, f"{source} holds every image")
        # The mover reads with LEASE, which is no lookup: lease_hits counts its reads.
        mover_reads = (await node_stats(source))["lease_hits"]

        growing = asyncio.create_task(resize(http, system.gateways[0], 2))
        joining: list[str] = []
        deleting: asyncio.Task[str] | None = None
        paused_pid: int | None = None
        try:

            async def published() -> bool:
                joining[:] = [a for _, a, _ in await members(database) if a != source]
                return bool(joining)

            await eventually(published, 20, "the new node published")
            paused_pid = await system.node_pid(joining[0])
            assert paused_pid is not None, f"no process for {joining[0]}"
            async with node_client(source) as client:
                # The copies begin with reads from the old node: pause the new one at once,
                # then let the copier go as far as it can without it.
                deadline = time.monotonic() + 20
                while (await client.stats())["lease_hits"] == mover_reads:
                    if time.monotonic() > deadline or growing.done():
                        raise HarnessError("the grow copied nothing from the old node")
                await pause(paused_pid)
                for _ in range(50):  # until the copier reads no more from the old node
                    before, mover_reads = mover_reads, (await client.stats())["lease_hits"]
                    if mover_reads == before:
                        break
                    await asyncio.sleep(0.2)

            async def delete_all() -> str:
                async with http.post(
                    f"{system.layout.manager_url}/config/delete_all",
                    data={"confirm": "delete", "csrf": csrf},
                ) as reply:
                    return f"{reply.status} {await reply.text()}"

            deleting = asyncio.create_task(delete_all())
            await asyncio.wait({deleting}, timeout=1.0)
        finally:
            if paused_pid is not None:
                resume(paused_pid)
        grown = await growing
        deleted = await deleting
        assert grown.startswith("200 "), f"the grow failed: {grown}"
        assert "Deleted all application data" in deleted, f"delete-all: {deleted[:500]}"

        nodes = await members(database)
        left = {address: await images_on(address, keys) for _, address, _ in nodes}
        held = {address: found for address, found in left.items() if found}
        assert not held, "images left on nodes after delete-all: " + "; ".join(
            f"{address} ({state}) holds {len(held[address])}: {sorted(held[address])[:4]}"
            for _, address, state in nodes
            if address in held
        )
        for gateway in system.gateways:
            answers = {key: await read(http, gateway, key) for key in keys}
            served = {key: seen for key, seen in answers.items() if seen != "status 404"}
            assert not served, f"{gateway.name} after delete-all: {list(served.items())[:4]}"


class StubbornPool:
    """A pool backend over node processes the test started. Like a cloud's, its
    nodes outlive a manager, so a restarted manager adopts them again; the
    nodes in ``stuck`` fail to stop."""

    def __init__(self, nodes: Sequence[NodeProcess]) -> None:
        self.running = [NodeHandle(f"node-{n.port}", f"{n.host}:{n.port}") for n in nodes]
        self.stuck: set[str] = set()

    async def nodes(self) -> list[NodeHandle]:
        return list(self.running)

    async def grow(self, count: int) -> list[NodeHandle]:
        raise PoolError("this pool does not grow")

    async def shrink(self, node_ids: Sequence[str]) -> None:
        if stuck := self.stuck.intersection(node_ids):
            raise PoolError(f"could not stop {', '.join(sorted(stuck))}")
        self.running = [n for n in self.running if n.node_id not in node_ids]

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def manager_over(layout: SystemLayout, pool: StubbornPool) -> AsyncIterator[None]:
    """The manager application, in this process on the layout's manager port,
    over ``pool`` instead of its own local pool."""
    app = create_manager(load_config(environ=layout.environment()))

    async def stubborn_backend(app: web.Application) -> AsyncIterator[None]:
        app[BACKEND] = pool
        yield

    app.cleanup_ctx[app.cleanup_ctx.index(backend_ctx)] = stubborn_backend
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", layout.manager_port).start()
        yield
    finally:
        await runner.cleanup()


async def test_a_paused_gateway_renews_its_view_before_it_reads_a_node_that_left_but_runs(
    system: Processes, node_processes: Callable[[], Awaitable[NodeProcess]]
) -> None:
    """As the shrink above, but the leaving node does not stop (as an instance
    whose termination hangs): the paused gateway's view still routes to it, and
    it still holds the image an upload replaced meanwhile, since no other
    gateway tells it anything once it has left. Resumed, the paused gateway must
    renew its view (its lease ran out) before it reads from the cache.

    The manager runs in this process over a stub backend: the local pool stops a
    leaving node right after the last publish, so a stale view only finds a
    dead node there."""
    database, layout = system.layout.database, system.layout
    pool = StubbornPool([await node_processes(), await node_processes()])
    stays, stuck = pool.running
    first, paused = system.gateways
    keys = [f"left-{number}" for number in range(12)]
    async with session() as http, manager_over(layout, pool):
        await asyncio.gather(first.start(), paused.start())
        for key in keys:
            await upload_acknowledged(http, first, key, 1)
        for key in keys:
            for _ in range(2):  # the second read is the fast path's, from a kept copy
                assert (seen := await read(http, paused, key)) == f"{key}#1", seen
        key = await first_key_on(stuck.address, keys)
        pool.stuck.add(stuck.node_id)
        await pause(pid_of(paused), database)
        try:
            # It answers once every live gateway follows the pool without the node.
            answer = await resize(http, first, 1)
            assert "could not stop" in answer, f"the shrink should have failed: {answer}"
            assert [n for n, _, _ in await members(database)] == [stays.node_id]

            async def first_follows() -> bool:  # the old code's gateways only poll
                return await routed_nodes(http, first) == 1

            await eventually(first_follows, 5, f"{first.name} routes over one node")
            await upload_acknowledged(http, first, key, 2)
            still = await node_item(stuck.address, key)
            assert still is not None, f"{stuck.address} should still hold {key}#1"
            assert label_of(still.value) == f"{key}#1", label_of(still.value)
            reading = asyncio.create_task(read(http, paused, key))
            await asyncio.sleep(0.2)  # sent before the gateway resumes: the first thing it sees
        finally:
            resume(pid_of(paused))
        seen = await reading
    assert seen == f"{key}#2", (
        f"STALE READ: {paused.name}, paused during the shrink, answered {seen} for {key} "
        f"after {key}#2 was acknowledged through {first.name}"
    )


async def test_a_node_that_failed_to_leave_is_cleared_before_a_restarted_manager_adopts_it(
    system: Processes, node_processes: Callable[[], Awaitable[NodeProcess]]
) -> None:
    """A shrink whose node does not stop leaves it running outside the pool,
    where it misses the next upload of a key it holds. A manager started
    afterwards finds it among the backend's nodes: it must clear it before any
    gateway reads from it.

    The manager runs in this process over a stub backend: the local pool never
    adopts a node again (a restarted manager starts new ones), and the AWS pool
    reaches its nodes at their instances' private addresses."""
    database, layout = system.layout.database, system.layout
    pool = StubbornPool([await node_processes(), await node_processes()])
    stays, stuck = pool.running
    gateway = system.gateways[0]
    keys = [f"stuck-{number}" for number in range(12)]
    async with session() as http:
        async with manager_over(layout, pool):
            await gateway.start()
            for key in keys:
                await upload_acknowledged(http, gateway, key, 1)
                assert (seen := await read(http, gateway, key)) == f"{key}#1", seen
            key = await first_key_on(stuck.address, keys)
            pool.stuck.add(stuck.node_id)
            answer = await resize(http, gateway, 1)
            assert "could not stop" in answer, f"the shrink should have failed: {answer}"
            assert [n for n, _, _ in await members(database)] == [stays.node_id]

            async def follows() -> bool:
                return await routed_nodes(http, gateway) == 1

            await eventually(follows, 5, f"{gateway.name} routes over one node")
            await upload_acknowledged(http, gateway, key, 2)
            before = await node_item(stuck.address, key)
            assert before is not None, f"{stuck.address} should still hold {key}#1"
            assert label_of(before.value) == f"{key}#1", label_of(before.value)
        async with manager_over(layout, pool):
            after = await node_item(stuck.address, key)
            assert after is None or label_of(after.value) == f"{key}#2", (
                f"{stuck.node_id}, adopted again at the manager's start, still holds "
                f"{label_of(after.value)} though {key}#2 was acknowledged"
            )

            async def both() -> bool:
                return await routed_nodes(http, gateway) == 2

            await eventually(both, 5, f"{gateway.name} routes over both nodes")
            assert (seen := await read(http, gateway, key)) == f"{key}#2", (
                f"STALE READ: {gateway.name} answered {seen} for {key} after {key}#2"
            )
