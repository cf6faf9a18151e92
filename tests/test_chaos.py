"""A seeded random walk of uploads, reads, grows, shrinks and node kills: never a stale read.

Set CHAOS_SEED to replay a failing walk; the failure message names the seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from pathlib import Path

import aiohttp

from manager.appkeys import BACKEND, CONTROLLER
from manager.backends.local import LocalPool
from tests.conftest import image_bytes
from tests.test_manager import running_system

SEED = int(os.environ.get("CHAOS_SEED", "20261127"))
STEPS = 200
KEYS = [f"k{i}" for i in range(6)]


def version_image(key_index: int, version: int) -> bytes:
    return image_bytes("PNG", (6, 6), (key_index * 40 % 256, version % 256, version // 256))


async def test_no_stale_read_through_uploads_resizes_and_kills(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    async with running_system(tmp_path, collect_seconds=5) as system:
        acked: dict[str, list[tuple[float, int]]] = {key: [] for key in KEYS}
        versions = {key: 0 for key in KEYS}
        index_of: dict[bytes, tuple[str, int]] = {}
        stale: list[str] = []
        reads = 0
        stop = asyncio.Event()

        async def upload(key: str) -> None:
            versions[key] += 1
            data = version_image(KEYS.index(key), versions[key])
            index_of[data] = (key, versions[key])
            form = aiohttp.FormData()
            form.add_field("key", key)
            form.add_field("file", data, filename="x.png")
            async with system.http.post(system.gateway.make_url("/api/upload"), data=form) as r:
                assert r.status == 200, await r.text()
            acked[key].append((time.monotonic(), versions[key]))

        async def reader(reader_rng: random.Random) -> None:
            nonlocal reads
            while not stop.is_set():
                key = reader_rng.choice(KEYS)
                started = time.monotonic()
                # A 404 is right only if no upload of the key was acknowledged
                # before the read started (one acknowledged during it may or
                # may not be seen).
                absent_at_start = not acked[key]
                async with system.http.get(system.gateway.make_url(f"/image/{key}")) as reply:
                    if reply.status == 404 and absent_at_start:
                        continue
                    assert reply.status == 200, f"seed {SEED}: read of {key} got {reply.status}"
                    seen_key, seen = index_of[await reply.read()]
                reads += 1
                newest = max((v for at, v in acked[key] if at <= started), default=0)
                if seen_key != key or seen < newest:
                    stale.append(f"seed {SEED}: {key} read v{seen} after v{newest} was acked")
                    stop.set()

        async def walk() -> None:
            for key in KEYS:
                await upload(key)
            for step in range(STEPS):
                if stop.is_set():
                    return
                roll = rng.random()
                size = system.manager.app[CONTROLLER].size
                if roll < 0.05 and size < 4:
                    await system.api("configure_cache", numNodes=str(size + 1))
                elif roll < 0.10 and size > 1:
                    await system.api("configure_cache", numNodes=str(size - 1))
                elif roll < 0.13:
                    backend = system.manager.app[BACKEND]
                    assert isinstance(backend, LocalPool)
                    pids = backend.process_ids()
                    # The node may still be down from an earlier kill: then it stays down.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pids[rng.choice(sorted(pids))], signal.SIGKILL)
                else:
                    await upload(rng.choice(KEYS))
                if step % 10 == 0:
                    await asyncio.sleep(0.05)  # let the readers interleave with everything
            stop.set()

        readers = [reader(random.Random(SEED + n)) for n in range(6)]
        await asyncio.gather(walk(), *readers)
        assert not stale, stale[0]
        assert reads > 500
        assert sum(len(v) for v in acked.values()) > 130
