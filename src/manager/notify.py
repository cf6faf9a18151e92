"""Announcements of the pool's resizes: SNS and a webhook, delivered in the background.

Every resize the controller records (manual or automatic, taken or failed) is
handed to ``Notifier.announce``, which only queues it: a resize never waits
for, nor fails because of, an announcement. A background task records a
pending delivery per channel (``manager.announcements``, shown on the
Activity page) and delivers each on its own, retrying with backoff
(``retry_seconds``, then twice as long each time, up to ``tries`` tries);
then it gives up with one log line.

The document sent is JSON, the same on both channels::

    {"text": "<one line a person reads>", "event": "resize", "from": 1, "to": 2,
     "cause": "...", "miss_rate": 0.62, "time": "<ISO 8601>"}

``event`` is ``resize_failed`` for a resize that failed: then ``to`` is the
size it aimed at, ``cause`` the recorded one ("failed: ..."), and ``text``
says the size the pool kept. ``text`` makes the webhook Slack-compatible. On
SNS, e-mail subscribers get ``text`` (with the document below it) and other
protocols the document itself (MessageStructure json).

When the manager stops, deliveries under way are interrupted and stay
pending in the database; the next manager to start takes them up where they
were (a try interrupted in flight may have arrived: delivery is at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import aiohttp

from imagecache.config import Config
from imagecache.errors import StorageError
from manager.announcements import Announcements, Delivery
from manager.records import FAILED_CAUSE

log = logging.getLogger(__name__)

# How long one webhook POST may take before it counts as a failed try.
WEBHOOK_TIMEOUT_SECONDS = 10.0
# The longest wait between two tries, however many there are.
MAX_RETRY_DELAY_SECONDS = 600.0
# SNS's limit on a Subject (ASCII, one line), which e-mail subscribers see.
_SNS_SUBJECT_CHARS = 100


@dataclass(frozen=True, slots=True)
class ResizeNotice:
    """A resize the controller recorded, as the notifier announces it."""

    activity_id: int | None  # its row in the activity history; None: not recorded
    size_before: int
    target: int  # the size it made, or aimed at when it failed
    size_kept: int  # the size after it (the size before, when it failed)
    cause: str  # as recorded: a failed one's begins with FAILED_CAUSE
    miss_rate: float | None
    failed: bool
    at: datetime  # timezone-aware UTC

    def document(self) -> dict[str, Any]:
        """The JSON document announcing it (the module's docstring gives its shape)."""
        return {
            "text": self.text(),
            "event": "resize_failed" if self.failed else "resize",
            "from": self.size_before,
            "to": self.target,
            "cause": self.cause,
            "miss_rate": self.miss_rate,
            "time": self.at.isoformat(),
        }

    def text(self) -> str:
        rate = "" if self.miss_rate is None else f" (miss rate {self.miss_rate:.1%})"
        if self.failed:
            why = self.cause.removeprefix(FAILED_CAUSE).strip()
            return (
                f"imagecache: resizing the cache pool from {self.size_before} to"
                f" {self.target} {_nodes(self.target)} failed; it keeps {self.size_kept}"
                f" {_nodes(self.size_kept)}: {why}{rate}"
            )
        change = "grew" if self.target > self.size_before else "shrank"
        return (
            f"imagecache: the cache pool {change} from {self.size_before} to"
            f" {self.target} {_nodes(self.target)}: {self.cause}{rate}"
        )


def _nodes(count: int) -> str:
    return "node" if count == 1 else "nodes"


class DeliveryError(Exception):
    """One try of a delivery failed; the message says why, in a line."""


class Channel(Protocol):
    """Where announcements go."""

    name: str  # as the delivery records and the Activity page name it

    async def send(self, document: dict[str, Any]) -> None:
        """Deliver ``document`` once; raises DeliveryError when it was not."""


class WebhookChannel:
    """POSTs the document as JSON to a URL; any 2xx answer is a delivery."""

    name = "webhook"

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self._url = url
        self._session = session

    async def send(self, document: dict[str, Any]) -> None:
        try:
            async with self._session.post(self._url, json=document) as reply:
                if not 200 <= reply.status < 300:
                    raise DeliveryError(f"HTTP {reply.status} {reply.reason or ''}".rstrip())
        except TimeoutError:
            raise DeliveryError(f"no answer within {WEBHOOK_TIMEOUT_SECONDS:g} s") from None
        except aiohttp.ClientError as error:
            # The URL is not named: a webhook's path often holds its secret.
            raise DeliveryError(f"{type(error).__name__}: {error}") from None


class SnsChannel:
    """Publishes the document to an SNS topic."""

    name = "sns"

    def __init__(self, topic_arn: str, client: Any) -> None:
        self._topic_arn = topic_arn
        self._client = client  # an aiobotocore SNS client

    async def send(self, document: dict[str, Any]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        body = json.dumps(document)
        text = document["text"]
        # Per protocol: e-mail is read by a person, the rest by programs.
        messages = {
            "default": text,
            "email": f"{text}\n\n{json.dumps(document, indent=2)}",
            "sqs": body,
            "lambda": body,
            "http": body,
            "https": body,
        }
        subject = " ".join(text.encode("ascii", "replace").decode().split())
        try:
            await self._client.publish(
                TopicArn=self._topic_arn,
                Subject=subject[:_SNS_SUBJECT_CHARS],
                Message=json.dumps(messages),
                MessageStructure="json",
            )
        except (BotoCoreError, ClientError) as error:
            raise DeliveryError(f"SNS publish: {error}") from None


class Notifier:
    """Announces resizes on its channels in the background (the module's docstring)."""

    def __init__(
        self,
        channels: Sequence[Channel],
        store: Announcements,
        tries: int = 8,
        retry_seconds: float = 1.0,
    ) -> None:
        self._channels = {channel.name: channel for channel in channels}
        self._store = store
        self._tries = tries
        self._retry_seconds = retry_seconds
        self._queue: asyncio.Queue[ResizeNotice] = asyncio.Queue()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None

    @property
    def channels(self) -> list[str]:
        return list(self._channels)

    def announce(self, notice: ResizeNotice) -> None:
        """Queue ``notice`` for every channel; returns at once, and never raises."""
        if self._channels:
            self._queue.put_nowait(notice)

    def start(self) -> None:
        """Take up the deliveries a stopped manager left pending, then follow the queue."""
        self._worker = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop delivering. What is not delivered stays pending for the next start."""
        tasks = [*self._deliveries, *([self._worker] if self._worker else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not self._queue.empty():  # announced, not yet recorded
            with contextlib.suppress(StorageError):
                await self._record(self._queue.get_nowait())

    async def _run(self) -> None:
        try:
            pending = await self._store.pending()
        except StorageError as error:
            log.warning("pending announcements were not taken up: %s", error)
            pending = []
        for delivery in pending:
            try:
                self._resume(delivery)
            except ValueError as error:  # a document that is not JSON: not ours
                await self._give_up(delivery, f"unreadable document: {error}")
        while True:
            notice = await self._queue.get()
            document = notice.document()
            try:
                ids: Sequence[int | None] = await self._record(notice)
            except StorageError as error:
                log.warning("an announcement's delivery is not recorded: %s", error)
                ids = [None] * len(self._channels)
            for channel, delivery_id in zip(self._channels.values(), ids, strict=True):
                self._spawn(self._deliver(channel, document, delivery_id, tries_before=0))

    async def _record(self, notice: ResizeNotice) -> list[int]:
        document = json.dumps(notice.document())
        return await self._store.add(notice.activity_id, list(self._channels), document)

    def _resume(self, delivery: Delivery) -> None:
        channel = self._channels.get(delivery.channel)
        if channel is None:
            self._spawn(self._give_up(delivery, "the channel is no longer configured"))
            return
        document = json.loads(delivery.document)
        self._spawn(self._deliver(channel, document, delivery.id, delivery.tries))

    async def _give_up(self, delivery: Delivery, reason: str) -> None:
        with contextlib.suppress(StorageError):
            await self._store.failed(delivery.id, delivery.tries, reason)

    def _spawn(self, work: Any) -> None:
        """Run ``work`` (a delivery, a giving up) in a task of its own, which ``close`` cancels."""
        task = asyncio.create_task(work)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(
        self,
        channel: Channel,
        document: dict[str, Any],
        delivery_id: int | None,
        tries_before: int,
    ) -> None:
        """Try until delivered or out of tries (one more, for a delivery taken up again)."""
        last_try = max(self._tries, tries_before + 1)
        for attempt in range(tries_before + 1, last_try + 1):
            try:
                try:
                    await channel.send(document)
                except DeliveryError:
                    raise
                except Exception as unexpected:
                    # A library's surprise (a malformed answer, say) is a failed
                    # try like any other, not the end of the delivery's task.
                    raise DeliveryError(f"{type(unexpected).__name__}: {unexpected}") from None
            except DeliveryError as error:
                if attempt == last_try:
                    log.warning(
                        "the %s announcement %r was given up after %d tries: %s",
                        channel.name,
                        document["text"],
                        attempt,
                        error,
                    )
                    await self._note(delivery_id, "failed", attempt, str(error))
                    return
                log.debug("the %s announcement, try %d: %s", channel.name, attempt, error)
                await self._note(delivery_id, "tried", attempt, str(error))
                delay = self._retry_seconds * 2 ** (attempt - tries_before - 1)
                await asyncio.sleep(min(delay, MAX_RETRY_DELAY_SECONDS))
                continue
            await self._note(delivery_id, "delivered", attempt)
            return

    async def _note(
        self, delivery_id: int | None, outcome: str, tries: int, error: str = ""
    ) -> None:
        """Record how a try went; a database that fails costs a log line, not the delivery."""
        if delivery_id is None:
            return
        try:
            if outcome == "delivered":
                await self._store.delivered(delivery_id, tries)
            elif outcome == "failed":
                await self._store.failed(delivery_id, tries, error)
            else:
                await self._store.tried(delivery_id, tries, error)
        except StorageError as failure:
            log.warning("an announcement's delivery was not recorded: %s", failure)


@asynccontextmanager
async def open_notifier(config: Config, store: Announcements) -> AsyncIterator[Notifier]:
    """The notifier of ``config``'s channels (none configured: one that announces nothing),
    started; on exit it stops, leaving what is undelivered pending."""
    manager = config.manager
    async with AsyncExitStack() as stack:
        channels: list[Channel] = []
        if manager.sns_topic_arn:
            from aiobotocore.session import get_session

            # The topic's own region: arn:aws:sns:<region>:<account>:<name>.
            region = manager.sns_topic_arn.split(":")[3]
            client = await stack.enter_async_context(
                get_session().create_client(
                    "sns", region_name=region, endpoint_url=config.aws.endpoint_url
                )
            )
            channels.append(SnsChannel(manager.sns_topic_arn, client))
        if manager.notify_webhook:
            session = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_SECONDS))
            )
            channels.append(WebhookChannel(manager.notify_webhook, session))
        notifier = Notifier(
            channels, store, tries=manager.notify_tries, retry_seconds=manager.notify_retry_seconds
        )
        notifier.start()
        try:
            yield notifier
        finally:
            await notifier.close()
