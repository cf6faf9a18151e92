"""Invariant 1 across several gateway processes: real processes, seeded faults, a checker.

One manager (local pool: it starts the cache nodes as processes and restarts a
dead one at the same address) and three gateways run as processes in one data
directory (one SQLite file, one blob folder), each on its own free port.
Concurrent clients upload and read a few keys through all three gateways at
random, while a seeded schedule resizes the pool (1..8 nodes, through any
gateway), SIGKILLs cache nodes, SIGKILLs a gateway and restarts it on its port,
and SIGKILLs and restarts the manager.

The checker: uploads of one key never overlap (a lock per key), and every
upload stores a distinct PNG whose text chunk names its key and sequence
number. A read (``POST /api/key/<key>`` or ``GET /image/<key>``, the fast
path's route) must answer 200 with an image of that key whose number is at
least that of the newest upload acknowledged before the read began. An older
one is a stale read; anything else (an error status, no answer from a gateway
that was not killed, another key's image) is a failed read. Either ends the
test at once with the seed, the step, the key, what was expected and what was
seen, the recent faults and the tail of every process's log.

    .venv/bin/pytest -q -s tests/test_scaleout.py
    IMAGECACHE_CHAOS_SEED=1234 IMAGECACHE_CHAOS_STEPS=300 .venv/bin/pytest -q -s \\
        tests/test_scaleout.py -k three   # replay one seed (timing still varies)

The seed is always printed (``-s`` shows it on success too). The one-gateway
case (no resizes, no gateway kills) is the control: the invariant holds there
on the design's own terms, so a failure of the three-gateway case is not the
harness's doing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
import random
import signal
import time
import traceback
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image as PILImage
from PIL import PngImagePlugin, UnidentifiedImageError

from tests.processes import HarnessError, PartProcess, Processes, SystemLayout, pool_addresses

SEED_VARIABLE = "IMAGECACHE_CHAOS_SEED"
STEPS_VARIABLE = "IMAGECACHE_CHAOS_STEPS"
SEED = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(1 << 32))

KEYS = tuple(f"key-{number}" for number in range(8))
CLIENTS = 6
UPLOAD_SHARE = 0.3  # of the clients' operations; the rest are reads, half through each route
TEXT_CHUNK = "imagecache-test"
READ_TIMEOUT = aiohttp.ClientTimeout(total=10)
UPLOAD_TIMEOUT = aiohttp.ClientTimeout(total=30)
ADMIN_TIMEOUT = aiohttp.ClientTimeout(total=120)  # a resize answers once its keys moved


@dataclass(frozen=True, slots=True)
class Scenario:
    """How many gateways, and the chance per step of each fault."""

    name: str
    gateways: int
    default_steps: int
    resize: float
    node_kill: float
    gateway_kill: float
    manager_kill: float


SCENARIOS = (
    Scenario(
        "three-gateways",
        gateways=3,
        default_steps=300,
        resize=0.08,
        node_kill=0.05,
        gateway_kill=0.03,
        manager_kill=0.015,
    ),
    # The control: one gateway, where the design's argument covers everything done here.
    Scenario(
        "one-gateway",
        gateways=1,
        default_steps=100,
        resize=0.0,
        node_kill=0.05,
        gateway_kill=0.0,
        manager_kill=0.015,
    ),
)


def image_of(key: str, sequence: int) -> bytes:
    """A 2x2 PNG that says, in a text chunk, which upload of which key it is."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK, f"{key}#{sequence}")
    color = (KEYS.index(key) * 31 % 256, sequence % 256, sequence // 256 % 256)
    buffer = io.BytesIO()
    PILImage.new("RGB", (2, 2), color).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def upload_of(data: bytes) -> tuple[str, int] | None:
    """The key and sequence number ``image_of`` wrote into ``data``; None for anything else."""
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            label = image.info.get(TEXT_CHUNK) if image.format == "PNG" else None
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    if not isinstance(label, str):
        return None
    key, _, number = label.rpartition("#")
    return (key, int(number)) if key and number.isdigit() else None


@dataclass
class Gateway:
    part: PartProcess
    session: aiohttp.ClientSession | None = None
    up: bool = False
    incarnation: int = 0  # counts kills: a request that saw another one was cut by a kill

    @property
    def name(self) -> str:
        return f"{self.part.name} (port {self.part.port})"


class ScaleOutRun:
    """The load, the checker and the fault schedule of one run."""

    def __init__(self, scenario: Scenario, steps: int, processes: Processes) -> None:
        self.scenario = scenario
        self.steps = steps
        self.processes = processes
        self.gateways = [Gateway(part) for part in processes.gateways]
        self.rng = random.Random(f"{SEED}/{scenario.name}/faults")
        self.locks = {key: asyncio.Lock() for key in KEYS}
        self.attempted = dict.fromkeys(KEYS, 0)  # the last sequence number sent, per key
        self.acked: dict[str, int] = {}  # the newest acknowledged sequence number, per key
        self.retired: set[str] = set()  # keys with an upload that may still be running
        self.step = -1  # -1: setting up
        self.began = time.monotonic()
        # The last uploads of each key: what a failure message shows beside the read.
        self.history = {key: deque[str](maxlen=5) for key in KEYS}
        self.events: deque[str] = deque(maxlen=30)
        self.counts: Counter[str] = Counter()
        self.failure: str | None = None
        self.stop = asyncio.Event()
        self.sessions: list[aiohttp.ClientSession] = []
        self.background: set[asyncio.Task[None]] = set()
        self.manager_cycling = False
        self.resizes_in_flight = 0

    # -- bookkeeping ----------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def note(self, event: str) -> None:
        self.events.append(f"{self.elapsed():6.2f} s, step {self.step}: {event}")

    def fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            self.note(f"FAILURE: {message.splitlines()[0]}")
        self.stop.set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` beside the schedule; an error in it ends the run as a failure."""

        async def guarded() -> None:
            try:
                await coroutine
            except HarnessError as error:
                self.fail(f"harness: {error}")
            except Exception:
                self.fail(f"harness: a background task crashed:\n{traceback.format_exc()}")

        task = asyncio.create_task(guarded())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def open_session(self, gateway: Gateway) -> None:
        # A fresh session per start: no pooled connection to the killed process is reused.
        gateway.session = aiohttp.ClientSession(
            base_url=gateway.part.url, connector=aiohttp.TCPConnector(limit=32)
        )
        self.sessions.append(gateway.session)

    async def close(self) -> None:
        self.stop.set()
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        for session in self.sessions:
            await session.close()

    def read_failure(
        self,
        kind: str,
        step: int,
        began: float,
        gateway: Gateway,
        route: str,
        key: str,
        expected: int | None,
    ) -> str:
        uploads = "\n".join(f"    {upload}" for upload in self.history[key])
        return (
            f"{kind}: seed {SEED}, step {step} of {self.steps} of the {self.scenario.name} run\n"
            f"  read: {route} of key {key!r} on {gateway.name}, "
            f"sent at {began:.2f} s, answered at {self.elapsed():.2f} s\n"
            f"  last uploads of {key!r}:\n{uploads}\n"
            f"  expected: 200 with image #{expected} of {key!r} or a newer one "
            f"(#{expected} was acknowledged before the read began)\n"
        )

    # -- the load and the checker ---------------------------------------------------

    async def upload(self, gateway: Gateway, key: str) -> None:
        assert gateway.session is not None
        assert gateway.part.process is not None
        session, process, incarnation = gateway.session, gateway.part.process, gateway.incarnation
        async with self.locks[key]:
            self.attempted[key] += 1
            sequence = self.attempted[key]
            sent = self.elapsed()
            form = aiohttp.FormData()
            form.add_field("key", key)
            form.add_field(
                "file", image_of(key, sequence), filename=f"{key}.png", content_type="image/png"
            )
            try:
                async with session.post("/api/upload", data=form, timeout=UPLOAD_TIMEOUT) as reply:
                    status, text = reply.status, await reply.text()
            except (aiohttp.ClientError, TimeoutError) as error:
                if gateway.incarnation != incarnation:
                    # Cut by a kill: once the process is gone it does nothing more, so
                    # the next upload of the key cannot overlap this one.
                    await process.wait()
                    self.counts["uploads cut by a gateway kill"] += 1
                    self.history[key].append(
                        f"#{sequence} via {gateway.name}: sent at {sent:.2f} s, cut by its kill"
                    )
                    return
                # The gateway may still be working on it: this key is not uploaded again.
                self.retired.add(key)
                self.counts["uploads without an answer"] += 1
                self.history[key].append(
                    f"#{sequence} via {gateway.name}: sent at {sent:.2f} s, no answer: {error!r}"
                )
                self.note(f"upload #{sequence} of {key} on {gateway.name}: {error!r}; key retired")
                return
            # Still under the lock, so the history is in the order of the uploads.
            answered = f"#{sequence} via {gateway.name}: sent at {sent:.2f} s, "
            answered += f"answered {status} at {self.elapsed():.2f} s"
            self.history[key].append(answered)
        if status == 200 and _json(text) == {"success": "true", "key": key}:
            self.acked[key] = max(self.acked.get(key, 0), sequence)
            self.counts["uploads acknowledged"] += 1
        else:
            # Not acknowledged, so not a promise; it may still have committed.
            self.counts["uploads refused"] += 1
            self.note(f"upload #{sequence} of {key} on {gateway.name}: {status} {text[:150]}")

    async def read(self, gateway: Gateway, key: str, route: str) -> None:
        assert gateway.session is not None
        session, incarnation = gateway.session, gateway.incarnation
        expected, step, began = self.acked.get(key), self.step, self.elapsed()
        try:
            if route == "POST /api/key":
                request = session.post(f"/api/key/{key}", timeout=READ_TIMEOUT)
            else:
                request = session.get(f"/image/{key}", timeout=READ_TIMEOUT)
            async with request as reply:
                status, body = reply.status, await reply.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            if gateway.incarnation != incarnation:
                self.counts["reads cut by a gateway kill"] += 1
            elif not self.stop.is_set():
                self.fail(
                    self.read_failure("FAILED READ", step, began, gateway, route, key, expected)
                    + f"  seen: no answer: {error!r}"
                )
            return
        self.counts[f"reads ({route})"] += 1
        image = _image_in_answer(route, key, status, body)
        if expected is None and (status == 404 or image is not None):
            return  # nothing acknowledged yet: no image, or one being uploaded, are both right
        if image is None or image[0] != key or image[1] > self.attempted[key]:
            what = f"image {image}" if image is not None else f"{status} {body[:200]!r}"
            self.fail(
                self.read_failure("FAILED READ", step, began, gateway, route, key, expected)
                + f"  seen: {what}"
            )
        elif expected is not None and image[1] < expected:
            self.fail(
                self.read_failure("STALE READ", step, began, gateway, route, key, expected)
                + f"  seen: image #{image[1]} of {key!r} ({expected - image[1]} version(s) older)"
            )

    async def client(self, number: int) -> None:
        rng = random.Random(f"{SEED}/{self.scenario.name}/client/{number}")
        while not self.stop.is_set():
            live = [gateway for gateway in self.gateways if gateway.up]
            roll, key = rng.random(), rng.choice(KEYS)
            if not live:
                await asyncio.sleep(0.02)
                continue
            gateway = rng.choice(live)
            if roll < UPLOAD_SHARE and not self.locks[key].locked() and key not in self.retired:
                await self.upload(gateway, key)
            else:
                route = "POST /api/key" if roll < (1 + UPLOAD_SHARE) / 2 else "GET /image"
                await self.read(gateway, key, route)
            await asyncio.sleep(rng.uniform(0, 0.01))

    async def guarded_client(self, number: int) -> None:
        try:
            await self.client(number)
        except Exception:
            self.fail(f"harness: client {number} crashed:\n{traceback.format_exc()}")

    # -- the faults -----------------------------------------------------------------

    async def resize(self, gateway: Gateway, nodes: int) -> None:
        assert gateway.session is not None
        self.resizes_in_flight += 1
        self.note(f"resize to {nodes} nodes through {gateway.name}")
        try:
            async with gateway.session.post(
                "/api/configure_cache",
                params={"mode": "manual", "numNodes": str(nodes)},
                timeout=ADMIN_TIMEOUT,
            ) as reply:
                answer = f"{reply.status} {(await reply.text())[:150]}"
        except (aiohttp.ClientError, TimeoutError) as error:
            answer = repr(error)  # the gateway or the manager was killed meanwhile
        finally:
            self.resizes_in_flight -= 1
        self.counts["resizes"] += 1
        self.note(f"resize to {nodes} nodes through {gateway.name}: {answer}")

    async def kill_node(self, choice: float) -> None:
        self.counts["node kills scheduled"] += 1
        addresses = await asyncio.to_thread(pool_addresses, self.processes.layout.database)
        if not addresses:  # the membership cannot be read: any node of this system
            ports = sorted(self.processes.node_processes())
            addresses = [f"127.0.0.1:{port}" for port in ports]
        if not addresses:
            return
        address = addresses[int(choice * len(addresses))]
        pid = await self.processes.node_pid(address)
        if pid is None:
            # Killed before and not started again yet (the manager, which
            # does, may be down too): the fault is there already.
            self.counts["nodes found down"] += 1
            self.note(f"node {address} to kill is not running")
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            self.counts["nodes found down"] += 1
            return
        self.counts["node kills"] += 1
        self.note(f"SIGKILL node {address} (pid {pid}) of {len(addresses)}")

    async def cycle_gateway(self, gateway: Gateway, pause: float) -> None:
        gateway.up = False  # no request is sent to it from now on
        gateway.incarnation += 1
        await gateway.part.kill()
        self.counts["gateway kills"] += 1
        self.note(f"SIGKILL {gateway.name}; restart in {pause:.2f} s")
        await asyncio.sleep(pause)
        await gateway.part.start()
        self.open_session(gateway)
        gateway.up = True
        self.note(f"{gateway.name} restarted")

    async def cycle_manager(self, pause: float) -> None:
        self.manager_cycling = True
        await self.processes.manager.kill()
        self.counts["manager kills"] += 1
        self.note(f"SIGKILL manager; restart in {pause:.2f} s")
        await asyncio.sleep(pause)
        await self.processes.manager.start()
        self.manager_cycling = False
        self.note("manager restarted")

    def check_processes(self) -> None:
        """A part that exited without being killed crashed: that fails requests too."""
        parts = [(g.part, g.up) for g in self.gateways]
        parts.append((self.processes.manager, not self.manager_cycling))
        for part, expected_up in parts:
            if expected_up and not part.running:
                code = part.process.returncode if part.process is not None else None
                self.fail(f"{part.name} exited on its own (code {code}) at step {self.step}")

    async def faults(self) -> None:
        scenario = self.scenario
        for step in range(self.steps):
            if self.stop.is_set():
                return
            self.step = step
            self.check_processes()
            # The same draws every step, whatever is skipped: the schedule follows the seed.
            roll, first, second = self.rng.random(), self.rng.random(), self.rng.random()
            pause = self.rng.uniform(0.05, 0.3)
            live = [gateway for gateway in self.gateways if gateway.up]
            if roll < scenario.resize:
                if live and self.resizes_in_flight < 2:
                    gateway = live[int(second * len(live))]
                    self.spawn(self.resize(gateway, 1 + int(first * 8)))
            elif (roll := roll - scenario.resize) < scenario.node_kill:
                await self.kill_node(first)
            elif (roll := roll - scenario.node_kill) < scenario.gateway_kill:
                if len(live) >= 2:  # one gateway at least stays up
                    self.spawn(self.cycle_gateway(live[int(first * len(live))], 0.3 + second))
            elif roll - scenario.gateway_kill < scenario.manager_kill and not self.manager_cycling:
                self.spawn(self.cycle_manager(0.3 + second))
            await asyncio.sleep(pause)
        self.step = self.steps

    # -- the whole run --------------------------------------------------------------

    async def run(self) -> None:
        await self.processes.start()
        for gateway in self.gateways:
            self.open_session(gateway)
            gateway.up = True
        self.note("all processes answer")
        for key in KEYS:  # every key has an acknowledged image before the load starts
            await self.upload(random.Random(f"{SEED}/{key}").choice(self.gateways), key)
            if key not in self.acked:
                raise HarnessError(f"the first upload of {key} failed:\n{list(self.events)}")
        self.note(f"every key has an image; load and faults for {self.steps} steps")
        clients = [asyncio.create_task(self.guarded_client(n)) for n in range(CLIENTS)]
        faults = asyncio.create_task(self.faults())
        stopped = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait({faults, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.stop.set()
            for task in (*clients, faults, stopped):
                task.cancel()
            await asyncio.gather(*clients, stopped, return_exceptions=True)
        if not faults.cancelled():
            await faults  # raises what the schedule raised


def _json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _image_in_answer(route: str, key: str, status: int, body: bytes) -> tuple[str, int] | None:
    """The test image a read answered with (its key and number), or None if it did not."""
    if status != 200:
        return None
    if route == "GET /image":
        return upload_of(body)
    answer = _json(body)
    if not isinstance(answer, dict) or answer.get("success") != "true" or answer.get("key") != key:
        return None
    try:
        return upload_of(base64.b64decode(answer["content"], validate=True))
    except (KeyError, TypeError, binascii.Error):
        return None


def steps_of(scenario: Scenario) -> int:
    return int(os.environ.get(STEPS_VARIABLE) or scenario.default_steps)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_no_read_older_than_an_acknowledged_upload(
    tmp_path: Path, scenario: Scenario
) -> None:
    steps = steps_of(scenario)
    print(f"\n{scenario.name}: {SEED_VARIABLE}={SEED} {STEPS_VARIABLE}={steps}, logs in {tmp_path}")
    processes = Processes(SystemLayout.on_free_ports(tmp_path, scenario.gateways))
    run = ScaleOutRun(scenario, steps, processes)
    budget = 0.3 * steps + 240  # the schedule's longest pauses, start-up and slack
    try:
        async with asyncio.timeout(budget):
            await run.run()
    except TimeoutError:
        run.fail(f"harness: the run did not end within {budget:g} s (seed {SEED})")
    except HarnessError as error:
        run.fail(f"harness: {error}")
    finally:
        await run.close()
        left = await processes.kill_all()
    summary = ", ".join(f"{count} {what}" for what, count in sorted(run.counts.items()))
    if run.failure is not None:
        events = "\n".join(run.events)
        pytest.fail(
            f"{run.failure}\n"
            f"replay: {SEED_VARIABLE}={SEED} {STEPS_VARIABLE}={steps}\n"
            f"so far: {summary}\n"
            f"recent events:\n{events}\n{processes.log_tails()}"
            + (f"\nstill running after the teardown: {left}" if left else ""),
            pytrace=False,
        )
    assert not left, f"processes still running after the test: {left}"
    print(f"{scenario.name}: seed {SEED} passed in {run.elapsed():.1f} s: {summary}")
    reads = sum(count for what, count in run.counts.items() if what.startswith("reads ("))
    assert reads >= 3 * steps, f"too little load to judge: {summary}"
    assert run.counts["uploads acknowledged"] >= steps // 2, f"too few uploads: {summary}"
    scheduled = run.counts["node kills scheduled"]
    # A kill that found its node down already (neither /proc nor the address
    # knows it: killed before, and the manager that starts it again may be
    # down too) still counts as that fault; some seeds kill the manager just
    # before every node kill.
    killed, found_down = run.counts["node kills"], run.counts["nodes found down"]
    assert killed + found_down >= scheduled // 2, f"nodes not found to kill: {summary}"
