"""The CloudWatch metrics store against a moto server on loopback: samples go
out in batches and come back as per-minute figures."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from imagecache.config import AwsConfig
from manager.cloudwatch import CloudWatchMetrics, MetricsError, open_cloudwatch_metrics
from manager.metrics import PoolSample
from tests.aws import REGION, aws_environment, moto_server  # noqa: F401


class CountingMetrics(CloudWatchMetrics):
    """Records the size of every batch it sends, then sends it for real."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []
        self.names: list[list[str]] = []  # the metric names of each batch
        self.sent = asyncio.Event()

    async def send_batch(self, batch: list[dict[str, Any]]) -> None:
        self.batches.append(len(batch))
        self.names.append([datum["MetricName"] for datum in batch])
        await super().send_batch(batch)
        self.sent.set()


class Requests:
    """The requests a client sends, counted and sized as they leave (botocore's
    before-send event): what CloudWatch would bill, with nothing stubbed."""

    def __init__(self, client: Any) -> None:
        self.sizes: dict[str, list[int]] = {"GetMetricData": [], "PutMetricData": []}
        for operation in self.sizes:
            client.meta.events.register(
                f"before-send.cloudwatch.{operation}", functools.partial(self._sent, operation)
            )

    def _sent(self, operation: str, request: Any, **_: Any) -> None:
        self.sizes[operation].append(len(request.body or b""))

    @property
    def reads(self) -> int:
        return len(self.sizes["GetMetricData"])


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def cloudwatch(moto_server: str, aws_environment: None) -> AsyncIterator[Any]:  # noqa: F811
    """An aiobotocore CloudWatch client for the moto server, in an isolated environment."""
    async with get_session().create_client(
        "cloudwatch", region_name=REGION, endpoint_url=moto_server
    ) as client:
        yield client


def pool_name() -> str:
    # The moto server lives for the whole session: every test gets its own pool.
    return f"pool-{uuid4().hex}"


def namespace() -> str:
    return f"imagecache-{uuid4().hex}"


def recent_minute(minutes_ago: int) -> datetime:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    return now - timedelta(minutes=minutes_ago)


def sample(at: datetime, **figures: int) -> PoolSample:
    values = {
        "workers": 1,
        "lookups": 0,
        "hits": 0,
        "misses": 0,
        "requests": 0,
        "items": 0,
        "bytes": 0,
        "missing": 0,
        "uncacheable": 0,
    }
    values.update(figures)
    return PoolSample(at=at, **values)


async def test_minutes_sum_counters_and_take_the_maximum_of_gauges(
    moto_server: str,  # noqa: F811
    aws_environment: None,  # noqa: F811
) -> None:
    base = recent_minute(10)
    samples = [
        # Minute 0: two nodes, then three; 12 lookups, 3 misses.
        sample(base, workers=2, lookups=5, hits=4, misses=1, requests=6, items=10, bytes=1000),
        sample(base + timedelta(seconds=5), workers=3, lookups=7, hits=5, misses=2, requests=9,
               items=14, bytes=1400),
        sample(base + timedelta(seconds=55), workers=3, lookups=0, hits=0, misses=0, requests=1,
               items=12, bytes=1200),
        # Minute 1: requests but no lookups at all.
        sample(base + timedelta(minutes=1, seconds=10), workers=3, requests=4, items=12,
               bytes=1200),
        # Minute 2 has no samples. Minute 3: one node left.
        sample(base + timedelta(minutes=3), workers=1, lookups=4, hits=1, misses=3, requests=4,
               items=2, bytes=300),
        sample(base + timedelta(minutes=3, seconds=30), workers=1, lookups=4, hits=4, misses=0,
               requests=5, items=3, bytes=400),
    ]  # fmt: skip

    async with open_cloudwatch_metrics(
        namespace(), AwsConfig(REGION, moto_server), pool="cache"
    ) as metrics:
        for item in samples:
            await metrics.put(item)
        await metrics.flush()
        assert metrics.buffered == 0
        minutes = await metrics.minutes(base, base + timedelta(minutes=5))

    assert [m.minute for m in minutes] == [
        base,
        base + timedelta(minutes=1),
        base + timedelta(minutes=3),
    ]
    first, second, fourth = minutes
    assert (first.lookups, first.hits, first.misses, first.requests) == (12, 9, 3, 16)
    assert (first.workers, first.items, first.bytes) == (3, 14, 1400)
    assert first.miss_rate == pytest.approx(0.25)
    assert first.hit_rate == pytest.approx(0.75)
    assert (second.lookups, second.requests, second.workers) == (0, 4, 3)
    assert second.miss_rate is None
    assert second.hit_rate is None
    assert (fourth.lookups, fourth.hits, fourth.misses, fourth.requests) == (8, 5, 3, 9)
    assert (fourth.workers, fourth.items, fourth.bytes) == (1, 3, 400)
    assert fourth.miss_rate == pytest.approx(3 / 8)


async def test_reads_no_pool_size_can_fix_go_out_with_the_sample_and_come_back(
    cloudwatch: Any,
) -> None:
    base = recent_minute(15)
    metrics = CountingMetrics(cloudwatch, pool=pool_name())
    try:
        await metrics.put(sample(base, lookups=4, misses=2, missing=3, uncacheable=1))
        await metrics.put(sample(base + timedelta(seconds=5), lookups=2, missing=2))
        await metrics.put(sample(base + timedelta(minutes=1), lookups=1, uncacheable=4))
        await metrics.flush()
        minutes = await metrics.minutes(base, base + timedelta(minutes=2))
    finally:
        await metrics.close()

    # Two more metrics of each sample, in the same PutMetricData call as the rest.
    assert metrics.batches == [27]
    assert metrics.names[0][:9] == [
        "Workers",
        "Lookups",
        "Hits",
        "Misses",
        "Requests",
        "MissingLookups",
        "UncacheableLookups",
        "Items",
        "ItemsBytes",
    ]
    # Summed per minute, apart from the lookups and misses.
    assert [(m.missing, m.uncacheable) for m in minutes] == [(5, 1), (0, 4)]
    assert [(m.lookups, m.misses) for m in minutes] == [(6, 2), (1, 0)]


async def test_minutes_window_is_half_open_and_per_pool(cloudwatch: Any) -> None:
    base = recent_minute(20)
    ours = CloudWatchMetrics(cloudwatch, pool=pool_name())
    theirs = CloudWatchMetrics(cloudwatch, pool=pool_name())
    for minute in range(3):
        await ours.put(sample(base + timedelta(minutes=minute, seconds=40), lookups=10 + minute))
    await theirs.put(sample(base + timedelta(seconds=20), lookups=1000))
    await ours.close()
    await theirs.close()

    middle = await ours.minutes(base + timedelta(minutes=1), base + timedelta(minutes=2))
    # Minutes that start in the window, each whole: not the one holding ``start``,
    # but the one holding ``end``.
    within = await ours.minutes(
        base + timedelta(seconds=30), base + timedelta(minutes=2, seconds=1)
    )

    assert [(m.minute, m.lookups) for m in middle] == [(base + timedelta(minutes=1), 11)]
    assert [m.lookups for m in within] == [11, 12]
    assert await ours.minutes(base, base) == []
    assert [m.lookups for m in await theirs.minutes(base, base + timedelta(minutes=3))] == [1000]


async def test_full_batches_go_out_at_once_and_the_rest_on_flush(cloudwatch: Any) -> None:
    base = recent_minute(30)
    metrics = CountingMetrics(cloudwatch, pool=pool_name(), batch_size=20)
    try:
        # 25 samples of 9 datums: 225 datums, 11 full batches and 5 left over.
        for i in range(25):
            await metrics.put(sample(base + timedelta(seconds=5 * i), lookups=2, misses=1))
        assert metrics.batches == [20] * 11
        assert metrics.buffered == 5

        await metrics.flush()

        assert metrics.batches == [20] * 11 + [5]
        assert metrics.buffered == 0
        minutes = await metrics.minutes(base, base + timedelta(minutes=3))
    finally:
        await metrics.close()

    # Samples every 5 s: 12 in each of the first two minutes, 1 in the third.
    assert [m.lookups for m in minutes] == [24, 24, 2]
    assert [m.misses for m in minutes] == [12, 12, 1]


async def test_buffered_samples_are_sent_by_the_periodic_flush(cloudwatch: Any) -> None:
    metrics = CountingMetrics(cloudwatch, pool=pool_name(), flush_seconds=0.05)
    try:
        await metrics.put(sample(recent_minute(5), lookups=3))
        assert metrics.batches == []

        async with asyncio.timeout(5):
            await metrics.sent.wait()

        assert metrics.batches == [9]
        assert metrics.buffered == 0
    finally:
        await metrics.close()


async def test_close_sends_the_rest_and_refuses_more(cloudwatch: Any) -> None:
    base = recent_minute(40)
    metrics = CountingMetrics(cloudwatch, pool=pool_name())
    await metrics.put(sample(base, lookups=6, hits=6))

    await metrics.close()
    await metrics.close()

    assert metrics.batches == [9]
    with pytest.raises(MetricsError, match="closed"):
        await metrics.put(sample(base, lookups=1))
    [minute] = await metrics.minutes(base, base + timedelta(minutes=1))
    assert (minute.lookups, minute.hits) == (6, 6)


async def test_unreachable_cloudwatch_raises_metrics_error_and_drops_the_batch(
    aws_environment: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A loopback port that nothing listens on; one attempt, so no retry backoff.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    base = recent_minute(5)

    async with get_session().create_client(
        "cloudwatch", region_name=REGION, endpoint_url=f"http://127.0.0.1:{port}"
    ) as client:
        metrics = CountingMetrics(client, pool=pool_name())
        await metrics.put(sample(base, lookups=1))
        with pytest.raises(MetricsError, match="cannot send 9 datums"):
            await metrics.flush()
        assert metrics.buffered == 0
        requests = Requests(client)
        with pytest.raises(MetricsError, match="cannot read metric"):
            await metrics.minutes(base, base + timedelta(minutes=1))
        # A failed read is not kept: the next call reads again.
        with pytest.raises(MetricsError, match="cannot read metric"):
            await metrics.minutes(base, base + timedelta(minutes=1))
        await metrics.close()  # nothing left to send

    assert metrics.batches == [9]
    assert requests.reads == 2


async def test_naive_datetimes_are_refused(cloudwatch: Any) -> None:
    metrics = CloudWatchMetrics(cloudwatch, pool=pool_name())
    naive = datetime(2024, 1, 1, 12, 0)

    with pytest.raises(ValueError, match="timezone-aware"):
        await metrics.put(sample(naive))
    with pytest.raises(ValueError, match="timezone-aware"):
        await metrics.minutes(naive, naive + timedelta(minutes=1))
    await metrics.close()


@pytest.mark.parametrize("batch_size", [0, 1001])
def test_batch_size_must_fit_one_request(batch_size: int) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        CloudWatchMetrics(object(), batch_size=batch_size)


@pytest.mark.parametrize("pool", ["", "p" * 256])
def test_pool_names_must_fit_a_full_batch_in_one_request(pool: str) -> None:
    with pytest.raises(ValueError, match="pool name"):
        CloudWatchMetrics(object(), pool=pool)


async def test_concurrent_and_repeated_reads_in_a_minute_make_one_request(
    cloudwatch: Any,
) -> None:
    base = recent_minute(12)
    clock = Clock(datetime.now(UTC))
    metrics = CloudWatchMetrics(cloudwatch, pool=pool_name(), clock=clock)
    requests = Requests(cloudwatch)
    span = (base, base + timedelta(minutes=3))
    try:
        await metrics.put(sample(base, lookups=4, misses=1))
        await metrics.flush()

        # Ten tabs refreshing at once, then again and again within the minute.
        answers = await asyncio.gather(*(metrics.minutes(*span) for _ in range(10)))
        for _ in range(3):
            answers.append(await metrics.minutes(*span))

        assert requests.reads == 1
        assert all([(m.lookups, m.misses) for m in answer] == [(4, 1)] for answer in answers)
        # An answer the caller changes is its own copy.
        answers[0].clear()
        assert len(await metrics.minutes(*span)) == 1

        # New data within the minute waits for the next one (the documented staleness).
        await metrics.put(sample(base + timedelta(minutes=1), lookups=6))
        await metrics.flush()
        assert [m.lookups for m in await metrics.minutes(*span)] == [4]
        assert requests.reads == 1

        clock.now += timedelta(minutes=1)
        assert [m.lookups for m in await metrics.minutes(*span)] == [4, 6]
        assert [m.lookups for m in await metrics.minutes(*span)] == [4, 6]
        assert requests.reads == 2
        # Another span is another answer.
        assert [m.lookups for m in await metrics.minutes(base, base + timedelta(minutes=1))] == [4]
        assert requests.reads == 3
    finally:
        await metrics.close()


async def test_a_caller_giving_up_does_not_cancel_the_read_the_others_wait_for(
    cloudwatch: Any,
) -> None:
    base = recent_minute(14)
    metrics = CloudWatchMetrics(cloudwatch, pool=pool_name())
    requests = Requests(cloudwatch)
    try:
        await metrics.put(sample(base, lookups=3))
        await metrics.flush()
        span = (base, base + timedelta(minutes=1))
        leaving = asyncio.create_task(metrics.minutes(*span))
        staying = asyncio.create_task(metrics.minutes(*span))
        await asyncio.sleep(0)  # both wait for the read now
        leaving.cancel()

        assert [m.lookups for m in await staying] == [3]
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert requests.reads == 1
    finally:
        await metrics.close()


async def test_samples_go_out_in_requests_of_a_thousand_datums_under_a_megabyte(
    moto_server: str,  # noqa: F811
    aws_environment: None,  # noqa: F811
) -> None:
    base = recent_minute(50)
    # botocore gzips large PutMetricData bodies; measured unzipped, the worst case.
    async with get_session().create_client(
        "cloudwatch",
        region_name=REGION,
        endpoint_url=moto_server,
        config=AioConfig(disable_request_compression=True),
    ) as client:
        # The longest pool name allowed: the largest datums there are.
        metrics = CountingMetrics(client, pool=pool_name().ljust(255, "p"))
        requests = Requests(client)
        try:
            # A minute of samples (12, 108 datums) waits for the periodic flush: no request.
            for i in range(12):
                await metrics.put(sample(base + timedelta(seconds=5 * i), lookups=1))
            assert requests.sizes["PutMetricData"] == []
            # 120 samples in all, 1080 datums: one full request as soon as it is full.
            for i in range(12, 120):
                await metrics.put(sample(base + timedelta(seconds=5 * i), lookups=1))
            assert metrics.batches == [1000]
            await metrics.flush()

            assert metrics.batches == [1000, 80]
            assert len(requests.sizes["PutMetricData"]) == 2
            assert max(requests.sizes["PutMetricData"]) < 1_000_000, requests.sizes
            minutes = await metrics.minutes(base, base + timedelta(minutes=10))
        finally:
            await metrics.close()

    assert sum(m.lookups for m in minutes) == 120


async def test_an_answer_cloudwatch_splits_is_read_to_its_last_page(cloudwatch: Any) -> None:
    """CloudWatch splits a GetMetricData answer past 100,800 datapoints and gives a
    NextToken; moto never does, so its answer is split here, as it leaves the
    client, into the first two minutes and the rest."""
    base = recent_minute(25)
    metrics = CloudWatchMetrics(cloudwatch, pool=pool_name())
    tokens_sent: list[str | None] = []

    def record_token(params: dict[str, Any], **_: Any) -> None:
        tokens_sent.append(params.get("NextToken"))

    def split(parsed: dict[str, Any], **_: Any) -> None:
        first_page = tokens_sent[-1] is None
        for result in parsed["MetricDataResults"]:
            pairs = [
                (moment, value)
                for moment, value in zip(result["Timestamps"], result["Values"], strict=True)
                if (moment < base + timedelta(minutes=2)) == first_page
            ]
            result["Timestamps"] = [moment for moment, _ in pairs]
            result["Values"] = [value for _, value in pairs]
        if first_page:
            parsed["NextToken"] = "the-rest"

    cloudwatch.meta.events.register("before-parameter-build.cloudwatch.GetMetricData", record_token)
    cloudwatch.meta.events.register("after-call.cloudwatch.GetMetricData", split)
    try:
        for minute in range(4):
            await metrics.put(sample(base + timedelta(minutes=minute), lookups=10 + minute))
        await metrics.flush()

        minutes = await metrics.minutes(base, base + timedelta(minutes=4))
    finally:
        await metrics.close()

    assert tokens_sent == [None, "the-rest"]
    assert [m.lookups for m in minutes] == [10, 11, 12, 13]
