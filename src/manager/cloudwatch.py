"""Pool statistics as CloudWatch custom metrics (the AWS MetricsStore).

Each PoolSample becomes nine datums in ``namespace`` with the dimension
``Pool=<pool>``, timestamped ``sample.at``, at standard (60 s) resolution:

| metric             | from               | unit  | read back per minute as |
| ------------------ | ------------------ | ----- | ----------------------- |
| Lookups            | sample.lookups     | Count | Sum                     |
| Hits               | sample.hits        | Count | Sum                     |
| Misses             | sample.misses      | Count | Sum                     |
| Requests           | sample.requests    | Count | Sum                     |
| MissingLookups     | sample.missing     | Count | Sum                     |
| UncacheableLookups | sample.uncacheable | Count | Sum                     |
| Workers            | sample.workers     | Count | Maximum                 |
| Items              | sample.items       | Count | Maximum                 |
| ItemsBytes         | sample.bytes       | Bytes | Maximum                 |

MissingLookups and UncacheableLookups are the reads no pool size can fix
(keys with no image, images too large to cache), which Lookups and Misses do
not count. Data sent by a version without them reads back as 0.

The counters are per-interval deltas, so their per-minute Sum is exact. The
gauges differ from ``minute_of``, which takes the last sample of the minute:
CloudWatch keeps no "last" statistic, and Maximum is a value the pool really
had in that minute (an Average would be a fraction of a node), so after a
shrink or an eviction burst the minute shows the higher, earlier figure.

Datums are buffered and sent with PutMetricData in batches of ``batch_size``
(default 20: the per-request limit CloudWatch had until 2023 and still the
safe choice for compatible services; AWS now accepts up to 1000). A batch goes
out as soon as the buffer holds one, and a background task sends whatever is
buffered every ``flush_seconds`` (default 60), so no sample waits longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from imagecache.config import AwsConfig
from manager.metrics import MinuteStats, PoolSample

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "imagecache"
DEFAULT_POOL = "default"
DEFAULT_BATCH_SIZE = 20
MAX_BATCH_SIZE = 1000  # datums per PutMetricData request, AWS's current limit
_MINUTE = timedelta(minutes=1)
# GetMetricStatistics returns at most 1440 datapoints per call: a day of minutes.
_WINDOW = timedelta(minutes=1440)

# (metric name, PoolSample field, unit, statistic read back)
_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("Workers", "workers", "Count", "Maximum"),
    ("Lookups", "lookups", "Count", "Sum"),
    ("Hits", "hits", "Count", "Sum"),
    ("Misses", "misses", "Count", "Sum"),
    ("Requests", "requests", "Count", "Sum"),
    ("MissingLookups", "missing", "Count", "Sum"),
    ("UncacheableLookups", "uncacheable", "Count", "Sum"),
    ("Items", "items", "Count", "Maximum"),
    ("ItemsBytes", "bytes", "Bytes", "Maximum"),
)


class MetricsError(Exception):
    """CloudWatch refused a call or could not be reached; the message says which and why."""


class CloudWatchMetrics:
    """A MetricsStore on CloudWatch: the pool named ``pool`` in ``namespace``.

    ``client`` is an aiobotocore CloudWatch client owned by the caller
    (open_cloudwatch_metrics). ``pool`` tells deployments sharing a namespace
    apart. Raises ValueError for a batch size outside 1..1000 or a flush
    interval that is not positive.
    """

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        pool: str = DEFAULT_POOL,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_seconds: float = 60.0,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}, not {batch_size}")
        if flush_seconds <= 0:
            raise ValueError("flush_seconds must be positive")
        self._client = client
        self.pool = pool
        self.namespace = namespace
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self._dimensions = [{"Name": "Pool", "Value": pool}]
        self._buffer: list[dict[str, Any]] = []
        # Held while sending, so batches leave in order and close() can stop the
        # periodic flush between two batches rather than in the middle of one.
        self._sending = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def buffered(self) -> int:
        """How many datums wait to be sent."""
        return len(self._buffer)

    async def put(self, sample: PoolSample) -> None:
        """Buffer the sample's datums and send every full batch now.

        Raises ValueError for a naive ``sample.at``, MetricsError when the
        store is closed or a batch cannot be sent (that batch is dropped, see
        send_batch).
        """
        if self._closed:
            raise MetricsError("the CloudWatch metrics store is closed")
        if sample.at.tzinfo is None:
            raise ValueError("sample.at must be timezone-aware")
        self._buffer.extend(self._datums(sample))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_periodically())
        if len(self._buffer) >= self.batch_size:
            async with self._sending:
                await self._send(whole_batches_only=True)

    async def flush(self) -> None:
        """Send everything buffered. Raises MetricsError as put does."""
        async with self._sending:
            await self._send(whole_batches_only=False)

    async def send_batch(self, batch: list[dict[str, Any]]) -> None:
        """Send one batch of MetricData with PutMetricData.

        Raises MetricsError when CloudWatch refuses it or cannot be reached; the
        batch is then dropped, not retried. botocore has already retried
        throttling and lost connections by then, and a request that timed out
        may have been stored: sending it again could count those lookups twice,
        a worse error for the autoscaler than a gap.
        """
        try:
            await self._client.put_metric_data(Namespace=self.namespace, MetricData=batch)
        except (ClientError, BotoCoreError) as error:
            log.warning("dropped %d CloudWatch datums of pool %s: %s", len(batch), self.pool, error)
            raise MetricsError(
                f"cannot send {len(batch)} datums to CloudWatch namespace {self.namespace!r}: "
                f"{error}"
            ) from error

    async def minutes(self, start: datetime, end: datetime) -> list[MinuteStats]:
        """One MinuteStats per minute that starts in [start, end) and has data,
        oldest first, each over its whole minute (as the SQLite store does).

        Gauges are per-minute maxima (see the module docstring). Raises
        ValueError for naive datetimes, MetricsError when CloudWatch fails.
        """
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("start and end must be timezone-aware")
        first, stop = _ceil_minute(start), _ceil_minute(end)
        if stop <= first:
            return []
        series = await asyncio.gather(
            *(self._statistics(name, statistic, first, stop) for name, _, _, statistic in _METRICS)
        )
        by_name = {name: values for (name, _, _, _), values in zip(_METRICS, series, strict=True)}
        minutes = sorted({minute for values in series for minute in values})

        def value(name: str, minute: datetime) -> int:
            return round(by_name[name].get(minute, 0.0))

        return [
            MinuteStats(
                minute=minute,
                workers=value("Workers", minute),
                lookups=value("Lookups", minute),
                hits=value("Hits", minute),
                misses=value("Misses", minute),
                requests=value("Requests", minute),
                items=value("Items", minute),
                bytes=value("ItemsBytes", minute),
                missing=value("MissingLookups", minute),
                uncacheable=value("UncacheableLookups", minute),
            )
            for minute in minutes
            if first <= minute < stop
        ]

    async def close(self) -> None:
        """Stop the periodic flush and send what is buffered.

        Raises MetricsError when that last send fails; the store is closed anyway.
        Closing twice does nothing.
        """
        if self._closed:
            return
        self._closed = True
        async with self._sending:
            if self._flusher is not None:
                self._flusher.cancel()
                # asyncio.wait, unlike awaiting the task, does not raise the
                # task's CancelledError, so our own cancellation still comes through.
                await asyncio.wait([self._flusher])
                self._flusher = None
            await self._send(whole_batches_only=False)

    # -- plumbing -----------------------------------------------------------

    def _datums(self, sample: PoolSample) -> list[dict[str, Any]]:
        return [
            {
                "MetricName": name,
                "Dimensions": self._dimensions,
                "Timestamp": sample.at,
                "Value": float(getattr(sample, field)),
                "Unit": unit,
                "StorageResolution": 60,
            }
            for name, field, unit, _ in _METRICS
        ]

    async def _send(self, *, whole_batches_only: bool) -> None:
        """Send buffered batches; the caller holds ``_sending``."""
        while len(self._buffer) >= self.batch_size or (self._buffer and not whole_batches_only):
            batch = self._buffer[: self.batch_size]
            # Taken out before sending: a failed batch is dropped (see send_batch).
            del self._buffer[: self.batch_size]
            await self.send_batch(batch)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            try:
                await self.flush()
            except MetricsError:
                pass  # logged by send_batch; the next round sends newer samples
            except Exception:
                log.exception("periodic CloudWatch flush of pool %s failed", self.pool)

    async def _statistics(
        self, metric: str, statistic: str, start: datetime, end: datetime
    ) -> dict[datetime, float]:
        """``statistic`` of ``metric`` per minute in [start, end), by minute start."""
        values: dict[datetime, float] = {}
        window_start = start
        while window_start < end:
            window_end = min(end, window_start + _WINDOW)
            try:
                response = await self._client.get_metric_statistics(
                    Namespace=self.namespace,
                    MetricName=metric,
                    Dimensions=self._dimensions,
                    StartTime=window_start,
                    EndTime=window_end,
                    Period=60,
                    Statistics=[statistic],
                )
            except (ClientError, BotoCoreError) as error:
                log.warning(
                    "cannot read %s of pool %s from CloudWatch: %s", metric, self.pool, error
                )
                raise MetricsError(
                    f"cannot read metric {metric!r} from CloudWatch namespace "
                    f"{self.namespace!r}: {error}"
                ) from error
            for point in response.get("Datapoints", ()):
                values[_minute(point["Timestamp"])] = float(point[statistic])
            window_start = window_end
        return values


@asynccontextmanager
async def open_cloudwatch_metrics(
    namespace: str,
    aws: AwsConfig,
    *,
    pool: str = DEFAULT_POOL,
    batch_size: int = DEFAULT_BATCH_SIZE,
    flush_seconds: float = 60.0,
) -> AsyncIterator[CloudWatchMetrics]:
    """Yield a CloudWatchMetrics for ``pool`` in ``namespace`` with its own client;
    on exit close it.

    The client uses the standard AWS credential chain and ``aws``'s region and
    endpoint. Samples that cannot be sent at exit are logged and dropped, so a
    CloudWatch outage never blocks shutdown with an error.
    """
    session = get_session()
    async with session.create_client(
        "cloudwatch", region_name=aws.region, endpoint_url=aws.endpoint_url
    ) as client:
        metrics = CloudWatchMetrics(
            client,
            namespace=namespace,
            pool=pool,
            batch_size=batch_size,
            flush_seconds=flush_seconds,
        )
        try:
            yield metrics
        finally:
            with contextlib.suppress(MetricsError):  # already logged by send_batch
                await metrics.close()


def _minute(moment: datetime) -> datetime:
    """The start of the minute holding ``moment``, in UTC."""
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


def _ceil_minute(moment: datetime) -> datetime:
    """The first minute start at or after ``moment``, in UTC."""
    floor = _minute(moment)
    return floor if floor == moment else floor + _MINUTE
