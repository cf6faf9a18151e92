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
(default 1000, the per-request limit of PutMetricData since 2023; it was 20).
A batch goes out as soon as the buffer holds one, and a background task sends
whatever is buffered every ``flush_seconds`` (default 60), so no sample waits
longer. The collector's sample every 5 s is 108 datums a minute: one request
a minute. A full batch with a pool name of the longest allowed (255
characters) encodes to about 0.4 MB, under the request's 1 MB.

``minutes`` reads all the metrics of a span with one GetMetricData request
(paginated by NextToken when CloudWatch splits the answer) and keeps the
answer for the rest of the wall-clock minute, by span: every dashboard tab
refreshing its charts, and every request arriving while the read is under
way, share that one request (billed per metric requested), so reads cost at
most one request a minute per span. CloudWatch only adds data per minute; the
one thing this delays is the current, partial minute, which may be up to a
minute stale (besides the minute or two CloudWatch itself takes to show data).
A read that fails is not kept: the next call tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from imagecache.config import AwsConfig
from manager.metrics import MinuteStats, PoolSample

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "imagecache"
DEFAULT_POOL = "default"
MAX_BATCH_SIZE = 1000  # datums per PutMetricData request, AWS's current limit
DEFAULT_BATCH_SIZE = MAX_BATCH_SIZE
# The limit of a dimension's value used to be 255 (now 1024); kept, so that a full
# batch stays well under PutMetricData's 1 MB (see the module docstring).
MAX_POOL_NAME = 255
_MINUTE = timedelta(minutes=1)

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


@dataclass(frozen=True, slots=True)
class _Answer:
    """The read of one span made in the wall-clock minute ``minute``, done or under way."""

    minute: datetime
    read: asyncio.Task[list[MinuteStats]]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class CloudWatchMetrics:
    """A MetricsStore on CloudWatch: the pool named ``pool`` in ``namespace``.

    ``client`` is an aiobotocore CloudWatch client owned by the caller
    (open_cloudwatch_metrics). ``pool`` tells deployments sharing a namespace
    apart. ``clock`` gives the time that decides when a kept answer of
    ``minutes`` is a minute old. Raises ValueError for a batch size outside
    1..1000, a flush interval that is not positive, or an empty pool name or
    one longer than 255 characters.
    """

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        pool: str = DEFAULT_POOL,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_seconds: float = 60.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not 1 <= len(pool) <= MAX_POOL_NAME:
            raise ValueError(f"the pool name must have 1..{MAX_POOL_NAME} characters")
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
        self._clock = clock
        # The answers of ``minutes`` in the current minute, by (first minute, stop).
        self._answers: dict[tuple[datetime, datetime], _Answer] = {}

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

        Gauges are per-minute maxima (see the module docstring). An answer is
        kept for the rest of the wall-clock minute and shared by every call
        for the same span, those that come while it is read included (see the
        module docstring). Raises ValueError for naive datetimes, MetricsError
        when CloudWatch fails.
        """
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("start and end must be timezone-aware")
        first, stop = _ceil_minute(start), _ceil_minute(end)
        if stop <= first:
            return []
        span, now = (first, stop), _minute(self._clock())
        answer = self._answers.get(span)
        if answer is None or answer.minute != now:
            # Answers of past minutes are never asked for again.
            self._answers = {key: kept for key, kept in self._answers.items() if kept.minute == now}
            answer = _Answer(now, asyncio.create_task(self._read_minutes(first, stop)))
            answer.read.add_done_callback(functools.partial(self._settled, span, answer))
            self._answers[span] = answer
        # Shielded: a caller that gives up (a tab closed mid-refresh) does not
        # cancel the read that the other callers wait for.
        return list(await asyncio.shield(answer.read))

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

    def _settled(
        self, span: tuple[datetime, datetime], answer: _Answer, read: asyncio.Task[Any]
    ) -> None:
        """Forget ``answer`` when its read failed, so the next call reads again."""
        failed = read.cancelled() or read.exception() is not None
        if failed and self._answers.get(span) is answer:
            del self._answers[span]

    async def _read_minutes(self, first: datetime, stop: datetime) -> list[MinuteStats]:
        """The MinuteStats of [first, stop), both minute starts, from one GetMetricData read."""
        series = await self._metric_data(first, stop)
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

    async def _metric_data(self, first: datetime, stop: datetime) -> list[dict[datetime, float]]:
        """Each metric's statistic per minute in [first, stop), by minute start, in
        the order of _METRICS: one GetMetricData request, more only to follow NextToken."""
        queries = [
            {
                "Id": f"m{index}",  # ids must start with a lower-case letter
                "MetricStat": {
                    "Metric": {
                        "Namespace": self.namespace,
                        "MetricName": name,
                        "Dimensions": self._dimensions,
                    },
                    "Period": 60,
                    "Stat": statistic,
                },
                "ReturnData": True,
            }
            for index, (name, _, _, statistic) in enumerate(_METRICS)
        ]
        series: list[dict[datetime, float]] = [{} for _ in _METRICS]
        pages: dict[str, Any] = {}
        while True:
            try:
                response = await self._client.get_metric_data(
                    MetricDataQueries=queries, StartTime=first, EndTime=stop, **pages
                )
            except (ClientError, BotoCoreError) as error:
                log.warning(
                    "cannot read the metrics of pool %s from CloudWatch: %s", self.pool, error
                )
                raise MetricsError(
                    f"cannot read metrics from CloudWatch namespace {self.namespace!r}: {error}"
                ) from error
            for result in response.get("MetricDataResults", ()):
                if result.get("StatusCode", "Complete") not in ("Complete", "PartialData"):
                    # "Forbidden" or "InternalError": the answer is not the data.
                    log.warning(
                        "CloudWatch read no %s of pool %s: %s",
                        result.get("Label"),
                        self.pool,
                        result.get("StatusCode"),
                    )
                    raise MetricsError(
                        f"cannot read metrics from CloudWatch namespace {self.namespace!r}: "
                        f"{result.get('Label')} answered {result.get('StatusCode')}"
                    )
                values = series[int(result["Id"][1:])]
                for moment, value in zip(result["Timestamps"], result["Values"], strict=True):
                    values[_minute(moment)] = float(value)
            if not response.get("NextToken"):
                return series
            pages = {"NextToken": response["NextToken"]}


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
