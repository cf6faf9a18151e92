"""Announcements of resizes: a webhook on 127.0.0.1 and SNS in moto, from a real manager.

The manager runs with a local pool of node processes; the webhook's receiver
is an aiohttp server in the test, and the SNS topic delivers to an SQS queue
in a moto server, which the test reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from aiohttp import ClientSession, CookieJar, web
from aiohttp.test_utils import TestServer

from imagecache.config import AwsConfig, Config, ConfigError, load_config, with_data_dir
from imagecache.database import Database
from manager.announcements import PENDING, Announcements
from manager.app import create_app as create_manager
from manager.appkeys import BACKEND, CONTROLLER
from manager.backends.local import LocalPool
from manager.notify import Notifier, ResizeNotice, WebhookChannel
from tests.aws import REGION, aws_environment, moto_server  # noqa: F401
from tests.test_manager import PASSWORD, TOKEN, free_port_range

DOCUMENT_KEYS = {"text", "event", "from", "to", "cause", "miss_rate", "time"}


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST's JSON and when it came.

    It answers ``status``; while ``gate`` is not set, requests wait for it.
    """

    status: int = 200
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    posts: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append((time.monotonic(), await request.json()))
        await self.gate.wait()
        return web.Response(status=self.status)

    async def wait_for_posts(self, count: int, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while len(self.posts) < count:
            assert time.monotonic() < deadline, f"{len(self.posts)} posts, not {count}"
            await asyncio.sleep(0.02)


@asynccontextmanager
async def receiver(status: int = 200, open_gate: bool = True) -> AsyncIterator[Receiver]:
    hook = Receiver(status)
    if open_gate:
        hook.gate.set()
    app = web.Application()
    app.router.add_post("/hooks/secret-path", hook.handle)
    server = TestServer(app, host="127.0.0.1")
    async with server:
        hook.url = str(server.make_url("/hooks/secret-path"))
        try:
            yield hook
        finally:
            hook.gate.set()  # let a blocked handler end, so the server can stop


@dataclass
class Manager:
    server: TestServer
    http: ClientSession

    async def configure(self, expect: int = 200, **params: str) -> dict[str, Any]:
        """POST /internal/configure_cache as a gateway forwards it."""
        async with self.http.post(
            self.server.make_url("/internal/configure_cache"),
            data=params,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as reply:
            body: dict[str, Any] = await reply.json()
            assert reply.status == expect, body
            return body

    async def activity(self) -> str:
        """The Activity page, logged in."""
        async with self.http.post(
            self.server.make_url("/login"), data={"password": PASSWORD, "next": "/activity"}
        ) as reply:
            assert reply.status == 200
            return await reply.text()

    async def deliveries(self) -> list[str]:
        """The Activity page's delivery cells, newest resize first, whitespace squeezed."""
        page = await self.activity()
        cells = re.findall(r'<div class="delivery"[^>]*>(.*?)</div>', page, re.DOTALL)
        return [" ".join(re.sub(r"<[^>]+>", "", cell).split()) for cell in cells]


def manager_config(tmp_path: Path, aws: AwsConfig | None = None, **manager: Any) -> Config:
    base = with_data_dir(Config(), tmp_path / "data")
    return replace(
        base,
        aws=aws or base.aws,
        gateway=replace(base.gateway, manager_token=TOKEN),
        manager=replace(
            base.manager,
            password=PASSWORD,
            first_port=free_port_range(),
            notify_tries=3,
            notify_retry_seconds=0.2,
            **manager,
        ),
    )


@asynccontextmanager
async def running_manager(config: Config) -> AsyncIterator[Manager]:
    server = TestServer(create_manager(config), host="127.0.0.1")
    async with server, ClientSession(cookie_jar=CookieJar(unsafe=True)) as http:
        yield Manager(server, http)


async def until(check: Any, seconds: float = 20) -> None:
    """Wait until the coroutine function ``check`` returns true."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


async def test_the_webhook_gets_each_resize_as_json(tmp_path: Path) -> None:
    async with (
        receiver() as hook,
        running_manager(manager_config(tmp_path, notify_webhook=hook.url)) as manager,
    ):
        await manager.configure(numNodes="2")
        await hook.wait_for_posts(1)
        # As the autoscaler resizes, with its evidence.
        await manager.server.app[CONTROLLER].resize(
            1, "autoscaler: miss rate below 2%", miss_rate=0.012, lookups=500
        )
        await hook.wait_for_posts(2)
        await until(lambda: _all_delivered(manager, 2))
        cells = await manager.deliveries()
    (_, grow), (_, shrink) = hook.posts
    assert set(grow) == DOCUMENT_KEYS
    assert grow["event"] == "resize"
    assert (grow["from"], grow["to"]) == (1, 2)
    assert grow["cause"] == "configure_cache (API)"
    assert grow["miss_rate"] is None
    assert (
        grow["text"] == "imagecache: the cache pool grew from 1 to 2 nodes: configure_cache (API)"
    )
    sent = datetime.fromisoformat(grow["time"])
    assert sent.tzinfo is not None
    assert abs(datetime.now(UTC) - sent) < timedelta(minutes=1)
    assert shrink == {
        "text": "imagecache: the cache pool shrank from 2 to 1 node:"
        " autoscaler: miss rate below 2% (miss rate 1.2%)",
        "event": "resize",
        "from": 2,
        "to": 1,
        "cause": "autoscaler: miss rate below 2%",
        "miss_rate": 0.012,
        "time": shrink["time"],
    }
    assert len(cells) == 2
    assert all(re.fullmatch(r"webhook: delivered at \d\d:\d\d:\d\d", c) for c in cells), cells


async def _all_delivered(manager: Manager, count: int) -> bool:
    cells = await manager.deliveries()
    return len(cells) == count and all("delivered" in c for c in cells)


async def test_a_webhook_that_does_not_answer_delays_no_resize_and_is_retried_with_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        receiver(status=500, open_gate=False) as hook,
        running_manager(manager_config(tmp_path, notify_webhook=hook.url)) as manager,
    ):
        # The receiver holds the first try; the resize does not wait for it. (A
        # resize that did would end only when its tries ran out: 3 of 10 s each.)
        await asyncio.wait_for(manager.configure(numNodes="2"), timeout=25)
        assert len(hook.posts) <= 1  # not one try ended yet
        assert manager.server.app[CONTROLLER].size == 2
        await hook.wait_for_posts(1)
        assert not hook.gate.is_set()
        assert await manager.deliveries() == ["webhook: pending"]
        # Answering 500 from now on: tried 3 times in all, 0.2 s then 0.4 s apart.
        hook.gate.set()
        await hook.wait_for_posts(3)
        await until(lambda: _has(manager, "failed"))
        cells = await manager.deliveries()
        await asyncio.sleep(0.8)  # no fourth try
    assert len(hook.posts) == 3
    first, second, third = (at for at, _ in hook.posts)
    assert second - first >= 0.2
    assert third - second >= 0.4
    assert all(document == hook.posts[0][1] for _, document in hook.posts)
    assert cells == ["webhook: failed after 3 tries: HTTP 500 Internal Server Error"]
    given_up = [r for r in caplog.records if "given up" in r.getMessage()]
    assert len(given_up) == 1
    assert given_up[0].exc_info is None
    # The URL's secret stays out of the manager's log (the receiver's own access log has it).
    manager_log = [r.getMessage() for r in caplog.records if r.name.startswith("manager")]
    assert not any("secret-path" in line for line in manager_log)


async def _has(manager: Manager, state: str) -> bool:
    return any(state in cell for cell in await manager.deliveries())


async def test_a_failed_resize_is_announced(tmp_path: Path) -> None:
    async with (
        receiver() as hook,
        running_manager(manager_config(tmp_path, notify_webhook=hook.url)) as manager,
    ):
        backend = manager.server.app[BACKEND]
        assert isinstance(backend, LocalPool)
        backend.capacity_mb = -1  # every node it starts from now on refuses to run
        await manager.configure(expect=503, numNodes="3")
        await hook.wait_for_posts(1)
        await until(lambda: _all_delivered(manager, 1))
        page = await manager.activity()
    ((_, document),) = hook.posts
    assert set(document) == DOCUMENT_KEYS
    assert document["event"] == "resize_failed"
    assert (document["from"], document["to"]) == (1, 3)
    assert document["cause"].startswith("failed: configure_cache (API): ")
    assert document["text"].startswith(
        "imagecache: resizing the cache pool from 1 to 3 nodes failed; it keeps 1 node: "
        "configure_cache (API): "
    )
    assert '<span class="bad">failed</span>' in page


async def test_undelivered_announcements_are_taken_up_by_the_next_start(tmp_path: Path) -> None:
    async with receiver(open_gate=False) as hook:
        config = manager_config(tmp_path, notify_webhook=hook.url)
        async with running_manager(config) as manager:
            await manager.configure(numNodes="2")
            await hook.wait_for_posts(1)  # held by the receiver while the manager stops
        async with running_manager(config) as manager:
            hook.gate.set()
            await hook.wait_for_posts(2)
            await until(lambda: _all_delivered(manager, 1))
    assert hook.posts[0][1] == hook.posts[1][1]


async def test_sns_delivers_to_a_subscribed_queue(
    tmp_path: Path,
    moto_server: str,  # noqa: F811
    aws_environment: None,  # noqa: F811
) -> None:
    session = get_session()
    async with (
        session.create_client("sns", region_name=REGION, endpoint_url=moto_server) as sns,
        session.create_client("sqs", region_name=REGION, endpoint_url=moto_server) as sqs,
    ):
        topic_arn = (await sns.create_topic(Name="imagecache-resizes"))["TopicArn"]
        queue_url = (await sqs.create_queue(QueueName="resizes"))["QueueUrl"]
        queue_arn = (
            await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
        )["Attributes"]["QueueArn"]
        await sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
        config = manager_config(
            tmp_path, aws=AwsConfig(REGION, moto_server), sns_topic_arn=topic_arn
        )
        async with running_manager(config) as manager:
            await manager.configure(numNodes="2")
            messages: list[dict[str, Any]] = []
            deadline = time.monotonic() + 20
            while not messages and time.monotonic() < deadline:
                answer = await sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1)
                messages = answer.get("Messages", [])
            await until(lambda: _all_delivered(manager, 1))
            cells = await manager.deliveries()
    (message,) = messages
    envelope = json.loads(message["Body"])
    document = json.loads(envelope["Message"])  # the queue's own message: the document
    assert set(document) == DOCUMENT_KEYS
    assert (document["event"], document["from"], document["to"]) == ("resize", 1, 2)
    assert document["text"] == (
        "imagecache: the cache pool grew from 1 to 2 nodes: configure_cache (API)"
    )
    assert envelope["Subject"] == document["text"]
    assert envelope["TopicArn"] == topic_arn
    assert len(cells) == 1
    assert cells[0].startswith("sns: delivered at ")


async def test_closing_the_notifier_stops_a_delivery_in_flight(tmp_path: Path) -> None:
    """A delivery its webhook still holds is cancelled by close: it stays pending
    for the next start, and the answer that comes later records nothing."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'metadata.db'}"
    async with (
        receiver(open_gate=False) as hook,
        Database.open(url) as database,
        ClientSession() as http,
    ):
        store = await Announcements.open(database)
        notifier = Notifier([WebhookChannel(hook.url, http)], store, tries=1)
        notifier.start()
        notifier.announce(
            ResizeNotice(None, 1, 2, 2, "manual", None, failed=False, at=datetime.now(UTC))
        )
        await hook.wait_for_posts(1)
        async with asyncio.timeout(5):
            await notifier.close()
        hook.gate.set()  # the held POST is answered 200 now
        await asyncio.sleep(0.3)
        [delivery] = await store.pending()
        assert (delivery.state, delivery.tries, delivery.delivered_at) == (PENDING, 0, None)


@pytest.mark.parametrize(
    ("variables", "refusal"),
    [
        ({"IMAGECACHE_NOTIFY_WEBHOOK": "ftp://example.com/hook"}, "notify_webhook"),
        ({"IMAGECACHE_NOTIFY_WEBHOOK": "hooks.example.com/x"}, "notify_webhook"),
        ({"IMAGECACHE_NOTIFY_WEBHOOK": "https:///no-host"}, "notify_webhook"),
        ({"IMAGECACHE_SNS_TOPIC_ARN": "my-topic"}, "sns_topic_arn"),
        ({"IMAGECACHE_SNS_TOPIC_ARN": "arn:aws:sqs:us-east-1:123456789012:q"}, "sns_topic_arn"),
    ],
)
def test_announcement_settings_are_checked_at_start(
    variables: dict[str, str], refusal: str
) -> None:
    with pytest.raises(ConfigError, match=refusal) as refused:
        load_config(environ=variables)
    assert "example.com" not in str(refused.value)  # a webhook's URL may hold its secret


def test_good_announcement_settings_are_taken() -> None:
    config = load_config(
        environ={
            "IMAGECACHE_NOTIFY_WEBHOOK": "https://hooks.slack.com/services/T0/B0/x",
            "IMAGECACHE_SNS_TOPIC_ARN": "arn:aws:sns:eu-west-1:123456789012:imagecache-alerts",
        }
    )
    assert config.manager.notify_webhook == "https://hooks.slack.com/services/T0/B0/x"
    assert config.manager.sns_topic_arn == "arn:aws:sns:eu-west-1:123456789012:imagecache-alerts"
