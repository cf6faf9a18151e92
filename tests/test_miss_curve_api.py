"""The miss curve end to end: gateways sample their lookups, the manager predicts
the miss rate of every pool size (issue 11), ``/api/miss_curve`` answers it."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image as PILImage

from imagecache.app import create_app as create_gateway
from imagecache.app import gateway_site
from imagecache.appkeys import FAST_PATH_COUNTERS, KEY_SAMPLER
from imagecache.keptcopies import KeptCopies
from imagecache.keysamples import REPORT_SECONDS, KeySampler, SampleReporter
from imagecache.manager_link import ManagerLink
from imagecache.sampling import INITIAL_RATE, is_sampled, sampling_threshold
from manager.curves import MissCurves
from manager.settings import CacheSettings
from tests.conftest import DEAD_URL
from tests.managers import sampling_manager
from tests.test_manager import TOKEN

IMAGES = 60
READS = 300
# Per node: a third of the 60 noise images (about 12 KB each) fits in one.
NODE_CAPACITY_MB = 0.25


@dataclass
class Running:
    manager: TestServer
    gateway: web.Application
    gateway_url: str
    http: aiohttp.ClientSession
    # A connection for each plain image GET: one aiohttp has served once (an
    # API call, a 404, a copy its node evicted) stays aiohttp's.
    fast_http: aiohttp.ClientSession

    async def api(self, call: str, expect: int = 200, **params: str) -> dict[str, Any]:
        async with self.http.post(f"{self.gateway_url}/api/{call}", params=params) as reply:
            body: dict[str, Any] = await reply.json()
            assert reply.status == expect, body
            return body

    async def internal(self, call: str, payload: object) -> tuple[int, dict[str, Any]]:
        async with self.http.post(
            self.manager.make_url(f"/internal/{call}"),
            json=payload,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as reply:
            return reply.status, await reply.json()


@asynccontextmanager
async def running(tmp_path: Path, gateway_rate: float = 1.0) -> AsyncIterator[Running]:
    """A manager with a local pool of node processes that samples every key, and
    a gateway (with its fast path) that posts to it, starting at ``gateway_rate``;
    early enough in a minute that the curve's first window lasts the test."""
    config, manager = await sampling_manager(tmp_path)
    async with manager:
        manager_url = str(manager.make_url("")).rstrip("/")
        config = replace(config, gateway=replace(config.gateway, manager_url=manager_url))
        gateway = create_gateway(config, key_sample_rate=gateway_rate)
        runner = web.AppRunner(gateway, access_log=None)
        await runner.setup()
        site = gateway_site(runner, "127.0.0.1", 0)
        await site.start()
        try:
            async with (
                aiohttp.ClientSession() as http,
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True)
                ) as fast_http,
            ):
                url = f"http://127.0.0.1:{site.port}"
                yield Running(manager, gateway, url, http, fast_http)
        finally:
            await runner.cleanup()


def noise_png(seed: int) -> bytes:
    """A PNG that does not compress: about 12 KB."""
    pixels = random.Random(seed).randbytes(64 * 64 * 3)
    buffer = io.BytesIO()
    PILImage.frombytes("RGB", (64, 64), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def upload(system: Running, key: str, data: bytes) -> None:
    form = aiohttp.FormData()
    form.add_field("key", key)
    form.add_field("file", data, filename=f"{key}.png")
    async with system.http.post(f"{system.gateway_url}/api/upload", data=form) as reply:
        assert reply.status == 200, await reply.text()


async def curve_once_posted(system: Running, lookups: int) -> dict[str, Any]:
    """The miss curve once the gateway has posted ``lookups`` sampled reads."""
    answer: dict[str, Any] = {}
    for _ in range(int(4 * REPORT_SECONDS / 0.2)):
        answer = await system.api("miss_curve")
        if answer["sampled_lookups"] >= lookups:
            break
        await asyncio.sleep(0.2)
    return answer


async def test_the_manager_predicts_every_pool_size_from_the_gateways_reads(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as system:
        before = await system.api("miss_curve")
        assert before["predicted_miss"] == [None] * 8
        assert before["sampled_lookups"] == 0
        await system.api("configure_cache", cacheSize=str(NODE_CAPACITY_MB))
        keys = [f"img{n}" for n in range(IMAGES)]
        for n, key in enumerate(keys):
            await upload(system, key, noise_png(n))
        # A missing image is no lookup of an image: neither path counts it.
        for query in ("", "?via=handler"):
            async with system.http.get(f"{system.gateway_url}/image/absent{query}") as reply:
                assert reply.status == 404
        await system.api("key/absent", expect=404)

        # Skewed (Zipf-like), through the fast path, aiohttp's image handler (a
        # query string is not the fast path's) and the API in turn.
        draw = random.Random(11)
        reads = draw.choices(keys, weights=[1 / (n + 1) for n in range(IMAGES)], k=READS)
        for n, key in enumerate(reads):
            if n % 3 == 2:
                await system.api(f"key/{key}")
                continue
            http, query = (system.http, "?via=handler") if n % 3 else (system.fast_http, "")
            async with http.get(f"{system.gateway_url}/image/{key}{query}") as reply:
                assert reply.status == 200
                await reply.read()
        counters = system.gateway[FAST_PATH_COUNTERS]
        # Most of a third of the reads; a copy whose node evicted it goes to aiohttp.
        assert counters.served + counters.loaded > READS // 6

        curve = await curve_once_posted(system, READS)
        assert curve["nodes"] == list(range(1, 9))
        assert curve["sampled_lookups"] == READS
        assert curve["capacity_mb"] == NODE_CAPACITY_MB
        assert curve["window_complete"] == "false"  # the first minute is not over
        assert 0 < curve["window_seconds"] < 60
        predicted = curve["predicted_miss"]
        assert all(isinstance(ratio, float) for ratio in predicted)
        # Eight nodes hold every image: only the first read of each misses.
        assert predicted[7] == pytest.approx(len(set(reads)) / READS)
        # One node holds a third of them: it misses more; never less than more nodes.
        assert predicted[0] > predicted[7] + 0.05
        assert all(a >= b - 0.02 for a, b in itertools.pairwise(predicted))

        # Nothing is counted twice: the next posts bring nothing more.
        await asyncio.sleep(REPORT_SECONDS + 0.5)
        assert (await system.api("miss_curve"))["sampled_lookups"] == READS

        async with system.http.get(system.manager.make_url("/metrics")) as reply:
            metrics = await reply.text()
        assert f'imagecache_predicted_miss_ratio{{nodes="8"}} {predicted[7]}' in metrics
        assert 'imagecache_predicted_miss_ratio{nodes="1"}' in metrics


async def test_the_gateway_samples_at_the_rate_the_manager_names(tmp_path: Path) -> None:
    async with running(tmp_path, gateway_rate=INITIAL_RATE) as system:
        threshold = sampling_threshold(INITIAL_RATE)
        key = next(
            k for k in (f"img{n}" for n in range(1000)) if not is_sampled(k.encode(), threshold)
        )
        await upload(system, key, noise_png(1))
        image_url = f"{system.gateway_url}/image/{key}"

        async def read() -> None:
            async with system.fast_http.get(image_url) as reply:
                assert reply.status == 200
                await reply.read()

        await read()  # the fast path keeps a copy, outside the gateway's first sample
        sampler = system.gateway[KEY_SAMPLER]
        # Its post at the first rate is left out by the manager, whose answer
        # names its own rate, every key: the gateway takes it.
        for _ in range(int(3 * REPORT_SECONDS / 0.1)):
            if sampler.rate == 1.0:
                break
            await asyncio.sleep(0.1)
        assert sampler.rate == 1.0
        served = system.gateway[FAST_PATH_COUNTERS].served
        for _ in range(5):
            await read()
        # Hits on the copy kept before the change are sampled at the new rate.
        assert system.gateway[FAST_PATH_COUNTERS].served == served + 5
        curve = await curve_once_posted(system, 5)
        assert curve["sampled_lookups"] == 5
        assert curve["sampling_rate"] == 1.0


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2],
        {"lookups": -1, "samples": []},
        {"lookups": "3", "samples": []},
        {"lookups": 2, "samples": [["k", "big"]]},
        {"lookups": 2, "samples": [["k", 10, 3]]},
        {"lookups": 1, "samples": [["a", 10], ["b", 10]]},
        {"lookups": 2, "samples": [["k", 10]] * 2, "rate": 2},
        {"lookups": 10_001, "samples": [["k", 10]] * 10_001},
    ],
)
async def test_samples_out_of_shape_are_refused_and_change_nothing(
    tmp_path: Path, payload: object, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path) as system:
        status, answer = await system.internal("key_samples", {"lookups": 1, "samples": []})
        assert status == 200, answer
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="manager"):
            status, answer = await system.internal("key_samples", payload)
        assert status == 400, answer
        assert answer["success"] == "false"
        assert "key samples" in answer["error"]["message"]
        refusals = [r for r in caplog.records if r.name.startswith("manager")]
        assert len(refusals) == 1
        assert refusals[0].exc_info is None
        assert (await system.api("miss_curve"))["sampled_lookups"] == 0


def test_the_sampler_counts_every_lookup_and_bounds_its_batch() -> None:
    sampler = KeySampler(rate=1.0, max_samples=3)
    for n in range(5):
        sampler.looked_up(f"k{n}", 100 + n)
    batch = sampler.take()
    assert batch.lookups == 5
    assert batch.samples == [("k0", 100), ("k1", 101), ("k2", 102)]
    assert batch.dropped == 2
    assert batch.as_json() == {"lookups": 5, "samples": [["k0", 100], ["k1", 101], ["k2", 102]]}
    assert sampler.take().lookups == 0  # a new batch starts empty

    # At 1 %, about one key in a hundred is sampled, and always the same ones.
    sparse = KeySampler(rate=0.01)
    keys = [f"key-{n}" for n in range(5000)]
    for key in keys:
        sparse.looked_up(key, 10)
    batch = sparse.take()
    assert batch.lookups == 5000
    assert 20 <= len(batch.samples) <= 80
    assert [key for key, _ in batch.samples] == [k for k in keys if sparse.is_sampled(k)]


def test_kept_copies_carry_the_sampling_decision() -> None:
    sampler = KeySampler(rate=0.01)
    copies = KeptCopies(1 << 20, sample_bucket=sampler.bucket)
    keys = [f"key-{n}" for n in range(500)]
    marked = {
        key: copies.keep(key, 1, "image/png", b"x", from_node=True).sample_bucket
        < sampler.threshold
        for key in keys
    }
    assert any(marked.values())
    assert not all(marked.values())
    assert marked == {key: sampler.is_sampled(key) for key in keys}


async def test_a_failed_post_drops_its_batch_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sampler = KeySampler(rate=1.0)
    link = ManagerLink(DEAD_URL, TOKEN, timeout=2)
    reporter = SampleReporter(sampler, link)
    try:
        with caplog.at_level(logging.INFO, logger="imagecache.keysamples"):
            for _ in range(3):
                sampler.looked_up("k", 10)
                await reporter.report()
                assert sampler.batch.lookups == 0
                assert sampler.batch.samples == []
    finally:
        await link.close()
    warnings = [r for r in caplog.records if r.name == "imagecache.keysamples"]
    assert len(warnings) == 1
    assert warnings[0].exc_info is None


def test_windows_close_every_minute_and_follow_the_settings() -> None:
    now = [0.0]
    curves = MissCurves(clock=lambda: now[0], kept=2, rate=1.0)
    curves.follow(CacheSettings(capacity_mb=1.0))
    curves.feed(4, [("a", 1000), ("b", 1000), ("a", 1000), ("a", 1000)])
    open_window = curves.latest()
    assert not open_window.complete
    assert open_window.sampled_lookups == 4
    assert open_window.predicted_miss == [0.5] * 8
    now[0] = 60.0
    closed = curves.close_window()
    assert closed.complete
    assert closed.seconds == 60.0
    # The last complete window answers; the caches stay warm into the next.
    curves.feed(1, [("a", 1000)])
    assert curves.latest() is closed
    assert curves.close_window().predicted_miss == [0.0] * 8
    curves.close_window()
    assert len(curves.windows) == 2  # only the last ``kept``
    # A new policy starts the miniature caches over: "a" misses again.
    curves.follow(CacheSettings(capacity_mb=1.0, policy="random"))
    curves.feed(1, [("a", 1000)])
    assert curves.close_window().predicted_miss == [1.0] * 8
    # A new capacity is followed without starting over.
    curves.follow(CacheSettings(capacity_mb=2.0, policy="random"))
    curves.feed(1, [("a", 1000)])
    window = curves.close_window()
    assert window.capacity_mb == 2.0
    # Misses count against every lookup the gateways made, not only the
    # sampled ones (SHARDS' adjustment): 2 misses of 16 lookups at 1 in 2.
    half = MissCurves(clock=lambda: now[0], rate=0.5)
    half.follow(CacheSettings(capacity_mb=2.0, policy="random"))
    half.feed(16, [("a", 1000), ("b", 1000), ("a", 1000), ("a", 1000)])
    assert half.close_window().predicted_miss == [0.25] * 8
    assert window.predicted_miss == [0.0] * 8
