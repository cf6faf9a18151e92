"""The manager's pool follows its Auto Scaling group (a moto server on loopback).

The real manager and gateway apps run in this process against moto; each
instance id is mapped to a real cache node process on 127.0.0.1 (never to
moto's 10.x addresses). Instances are terminated, detached and added behind
the manager's back, as AWS or an operator would.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from cachenode.client import NodeClient
from cachenode.routing import Ring, parse_address
from imagecache.app import create_app as create_gateway
from imagecache.appkeys import SERVICE
from imagecache.config import AwsConfig, Config, ConfigError, load_config
from manager.app import create_app as create_manager
from manager.appkeys import CONTROLLER, RECORDS
from manager.backends.base import NodeHandle
from manager.resizehistory import FOLLOWED_CAUSE
from tests.aws import aws_environment, moto_server  # noqa: F401
from tests.conftest import NodeProcess, image_bytes, start_node_process
from tests.test_aws_pool import (  # noqa: F401
    NodeFleet,
    aws,
    clients,
    describe_group,
    free_port,
    group,
    in_service,
    session,
)
from tests.test_manager import PASSWORD, TOKEN, System
from tests.test_notify import receiver

RECONCILE_SECONDS = 0.3
# A reconcile period the tests never reach: the loop stays out of the way.
NEVER = 3600.0


class Fleet(NodeFleet):
    """A NodeFleet that can also hand out prepared nodes and fixed addresses."""

    def __init__(self) -> None:
        super().__init__()
        self.spares: list[NodeProcess] = []  # given, in order, to instances not seen yet
        self.fixed: dict[str, str] = {}  # instance id -> address (perhaps nothing listens)
        self.extra: list[NodeProcess] = []  # started by the test itself
        self.silent_from_now = False  # instances not seen yet get an address where nothing listens

    def resolve(self, instance_id: str, private_ip: str) -> str:
        if instance_id in self.fixed:
            self.private_ips[instance_id] = private_ip
            return self.fixed[instance_id]
        if instance_id not in self.nodes and self.silent_from_now:
            self.fixed[instance_id] = f"127.0.0.1:{free_port()}"
            return self.resolve(instance_id, private_ip)
        if instance_id not in self.nodes and self.spares:
            self.nodes[instance_id] = self.spares.pop(0)
        return super().resolve(instance_id, private_ip)

    def stop_all(self) -> None:
        for node in self.extra + self.spares:
            self.nodes[f"extra-{node.port}"] = node
        super().stop_all()


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    nodes = Fleet()
    yield nodes
    nodes.stop_all()  # pytest runs this whatever the test did


@dataclass(frozen=True, slots=True)
class Stack:
    """What every test here starts from: the group (in moto, one instance),
    the clients of Auto Scaling and EC2, and the fleet of nodes behind it."""

    tmp_path: Path
    aws: AwsConfig
    autoscaling: Any
    ec2: Any
    group: str
    fleet: Fleet

    def system(self, **options: Any) -> AbstractAsyncContextManager[System]:
        """The manager and gateway on this group (``aws_system``'s options)."""
        return aws_system(self.tmp_path, self.aws, self.group, self.fleet.resolve, **options)

    async def in_service(self) -> set[str]:
        return in_service(await self.described())

    async def described(self) -> dict[str, Any]:
        return await describe_group(self.autoscaling, self.group)

    async def set_capacity(self, desired: int) -> list[str]:
        """Set the group's desired capacity (as AWS or an operator would); its InService ids."""
        await self.autoscaling.set_desired_capacity(
            AutoScalingGroupName=self.group, DesiredCapacity=desired
        )
        return sorted(await self.in_service())


@pytest.fixture
def stack(
    tmp_path: Path,
    aws: AwsConfig,  # noqa: F811
    clients: tuple[Any, Any],  # noqa: F811
    group: str,  # noqa: F811
    fleet: Fleet,
) -> Stack:
    autoscaling, ec2 = clients
    return Stack(tmp_path, aws, autoscaling, ec2, group, fleet)


@asynccontextmanager
async def aws_system(
    tmp_path: Path,
    aws: AwsConfig,  # noqa: F811
    group: str,  # noqa: F811
    resolve: Callable[[str, str], str],
    reconcile_seconds: float = RECONCILE_SECONDS,
    node_ready_seconds: float = 30,
    notify_webhook: str = "",
) -> AsyncIterator[System]:
    """A manager whose pool is the group, and a gateway forwarding to it."""
    base = Config(data_dir=tmp_path / "data")
    config = replace(
        base,
        metadata_url=f"sqlite+aiosqlite:///{tmp_path}/data/imagecache.db",
        blobs=replace(base.blobs, folder=tmp_path / "data" / "blobs"),
        aws=aws,
        gateway=replace(base.gateway, manager_token=TOKEN),
        manager=replace(
            base.manager,
            password=PASSWORD,
            pool="aws",
            asg_name=group,
            reconcile_seconds=reconcile_seconds,
            node_ready_seconds=node_ready_seconds,
            notify_webhook=notify_webhook,
            collect_seconds=60,
        ),
    )
    (tmp_path / "data").mkdir(exist_ok=True)
    manager = TestServer(create_manager(config, resolve_node_address=resolve), host="127.0.0.1")
    async with manager:
        manager_url = str(manager.make_url("")).rstrip("/")
        config = replace(config, gateway=replace(config.gateway, manager_url=manager_url))
        gateway = TestServer(create_gateway(config), host="127.0.0.1")
        async with gateway, ClientSession() as http:
            yield System(config, manager, gateway, http)


def member_ids(system: System) -> set[str]:
    return {n.node_id for n in system.manager.app[CONTROLLER].members}


async def wait_for_members(system: System, expected: set[str], within: float = 30) -> None:
    """Until the manager's members are ``expected``, and the gateway routes over them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while member_ids(system) != expected:
        assert loop.time() < deadline, f"members {member_ids(system)}, expected {expected}"
        await asyncio.sleep(0.05)
    # Every publication waited for the gateways: the gateway's numNodes agrees.
    assert (await system.api("getNumNodes"))["numNodes"] == len(expected)


async def followed_change(system: System, within: float = 30) -> Any:
    """The activity row of the reconcile pass that changed the members, once it
    is recorded (the pass has ended then: warming and dropping included)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        latest = await system.manager.app[RECORDS].list_activity(limit=1)
        if latest and latest[0].cause.startswith(FOLLOWED_CAUSE):
            return latest[0]
        assert loop.time() < deadline, f"no change recorded, latest: {latest}"
        await asyncio.sleep(0.05)


async def upload(system: System, key: str, data: bytes) -> None:
    form = aiohttp.FormData()
    form.add_field("key", key)
    form.add_field("file", data, filename=f"{key}.png")
    async with system.http.post(system.gateway.make_url("/api/upload"), data=form) as reply:
        assert reply.status == 200, await reply.text()


async def read(system: System, key: str) -> bytes:
    async with system.http.post(system.gateway.make_url(f"/api/key/{key}")) as reply:
        assert reply.status == 200, await reply.text()
        return base64.b64decode((await reply.json())["content"])


async def keys_on(address: str) -> set[bytes]:
    host, port = parse_address(address)
    async with NodeClient(host, port) as client:
        return {key async for key, _ in client.iter_keys()}


def images(version: int) -> dict[str, bytes]:
    return {
        f"img-{i:02d}": image_bytes("PNG", (16, 16), (i * 8, version * 40, 9)) for i in range(24)
    }


async def test_a_terminated_instance_leaves_and_reads_stay_fresh(stack: Stack) -> None:
    first = await stack.set_capacity(2)
    async with stack.system() as system:
        await wait_for_members(system, set(first))
        old = images(1)
        for key, data in old.items():
            await upload(system, key, data)
            assert await read(system, key) == data

        # An operator terminates one: the group launches a replacement at once.
        # Its node keeps running with the old images, as an instance that is
        # still shutting down would.
        doomed = first[1]
        await stack.ec2.terminate_instances(InstanceIds=[doomed])
        now = await stack.in_service()
        assert doomed not in now
        assert len(now) == 2
        await wait_for_members(system, now)
        assert doomed not in member_ids(system)

        new = images(2)
        for key, data in new.items():
            await upload(system, key, data)
        for key, data in new.items():
            assert await read(system, key) == data, f"{key} read back old"

        await followed_change(system)
        history = await system.manager.app[RECORDS].list_activity()
        assert any(f"{doomed} left" in row.cause for row in history)


async def test_an_instance_added_behind_the_managers_back_joins_cleared_and_warmed(
    stack: Stack,
) -> None:
    [first] = await stack.in_service()
    async with receiver() as webhook, stack.system(notify_webhook=webhook.url) as system:
        await wait_for_members(system, {first})
        # The node the next instance gets holds what a reused machine might: junk.
        spare = start_node_process("--capacity-mb", "8")
        stack.fleet.spares.append(spare)
        async with NodeClient(spare.host, spare.port) as client:
            assert await client.set(b"left-over", b"from another life")
        for key, data in images(1).items():
            await upload(system, key, data)  # written through to the only node
        # (Best effort: under load a write-through may time out; count what is there.)
        cached = await keys_on(system.manager.app[CONTROLLER].members[0].address)

        both = await stack.set_capacity(2)
        await wait_for_members(system, set(both))
        activity = await followed_change(system)

        [added] = set(both) - {first}
        members = {n.node_id: n for n in system.manager.app[CONTROLLER].members}
        assert members[added] == NodeHandle(added, f"{spare.host}:{spare.port}")
        ring = Ring(list(members))
        owned = {key for key in cached if ring.owner(key) == added}
        assert owned, "the new node owns none of the cached keys: pick more"
        # Cleared (the junk is gone), then warmed with exactly the keys it owns now.
        assert await keys_on(members[added].address) == owned
        assert await keys_on(members[first].address) == cached - owned
        service = system.gateway.app[SERVICE]
        blob_reads = service.blob_reads
        for name in sorted(k.decode() for k in cached):
            assert await read(system, name) == images(1)[name]
        assert service.blob_reads == blob_reads, "reads after the join missed"
        for key, data in images(1).items():
            assert await read(system, key) == data
        assert (activity.size_before, activity.size_after) == (1, 2)
        assert activity.cause == f"{FOLLOWED_CAUSE} {added} joined"
        # The operator hears of it as of any resize.
        await webhook.wait_for_posts(1, seconds=30)
        [(_, announcement)] = webhook.posts
        assert (announcement["event"], announcement["from"], announcement["to"]) == ("resize", 1, 2)
        assert announcement["cause"] == activity.cause


@pytest.mark.parametrize("instances", [2, 1])
async def test_the_manager_starts_while_an_instance_does_not_answer(
    stack: Stack, instances: int
) -> None:
    """One of two instances is silent; or the only one is (the whole stack
    starting at once): then the pool starts empty and reads go to the blobs."""
    *answering, silent = await stack.set_capacity(instances)
    port = free_port()
    stack.fleet.fixed[silent] = f"127.0.0.1:{port}"  # still booting: nothing listens yet

    async with stack.system() as system:
        assert member_ids(system) == set(answering)
        assert (await system.api("getNumNodes"))["numNodes"] == len(answering)
        data = image_bytes("PNG", (8, 8), "blue")
        await upload(system, "cat", data)
        assert await read(system, "cat") == data

        # It answers at last: the reconcile loop lets it join, cleared.
        node = start_node_process("--capacity-mb", "8", "--port", str(port))
        stack.fleet.extra.append(node)
        async with NodeClient(node.host, node.port) as client:
            await client.set(b"left-over", b"junk")
        await wait_for_members(system, {*answering, silent})
        await followed_change(system)
        assert b"left-over" not in await keys_on(f"127.0.0.1:{port}")
        assert await read(system, "cat") == data


async def test_a_shrink_after_an_instance_vanished_keeps_the_membership_consistent(
    stack: Stack,
) -> None:
    await stack.set_capacity(3)
    async with stack.system(reconcile_seconds=NEVER) as system:
        members = system.manager.app[CONTROLLER].members
        assert len(members) == 3
        # The newest member is the one a shrink picks; an operator detaches it
        # first, and the loop has not noticed yet.
        vanished = members[-1].node_id
        await stack.autoscaling.detach_instances(
            InstanceIds=[vanished],
            AutoScalingGroupName=stack.group,
            ShouldDecrementDesiredCapacity=True,
        )

        answer = await system.api("configure_cache", numNodes="2")
        assert answer["numNodes"] == 2
        described = await stack.described()
        assert member_ids(system) == in_service(described) == {m.node_id for m in members[:2]}
        assert described["DesiredCapacity"] == 2

        await system.api("configure_cache", numNodes="1")
        described = await stack.described()
        assert member_ids(system) == in_service(described) == {members[0].node_id}
        assert described["DesiredCapacity"] == 1
        data = image_bytes("PNG", (8, 8), "green")
        await upload(system, "dog", data)
        assert await read(system, "dog") == data


async def test_configure_cache_on_instances_that_boot_too_slowly_answers_503_and_changes_nothing(
    stack: Stack,
) -> None:
    [first] = await stack.in_service()
    async with stack.system(node_ready_seconds=1) as system:
        stack.fleet.silent_from_now = True  # new instances are still booting
        async with asyncio.timeout(45):  # well within the gateway's 120 s
            answer = await system.api("configure_cache", 503, numNodes="3", cacheSize="5")
        assert "nothing changed" in answer["error"]["message"]
        assert "within 1 s" in answer["error"]["message"]
        assert (await system.api("getNumNodes"))["numNodes"] == 1
        assert member_ids(system) == {first}
        described = await stack.described()
        assert (described["DesiredCapacity"], in_service(described)) == (1, {first})
        settings = await system.manager.app[CONTROLLER].settings()
        assert settings.capacity_mb != 5


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("IMAGECACHE_RECONCILE_SECONDS", "0", "reconcile_seconds must be above 0"),
        (
            "IMAGECACHE_NODE_READY_SECONDS",
            "300",
            "node_ready_seconds must be above 0 and at most 100",
        ),
    ],
)
def test_bad_reconcile_settings_are_refused(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ={variable: value})
    settings = load_config(
        environ={"IMAGECACHE_RECONCILE_SECONDS": "12", "IMAGECACHE_NODE_READY_SECONDS": "60"}
    ).manager
    assert (settings.reconcile_seconds, settings.node_ready_seconds) == (12, 60)
