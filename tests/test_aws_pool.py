"""The AWS pool backend against a moto server on loopback.

moto invents private addresses (10.x.x.x) for its instances; nothing here ever
connects to one. Each instance id is mapped, the first time the pool resolves
it, to a real cache node process that the test runs on 127.0.0.1.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import uuid4

import pytest
from aiobotocore.session import AioSession, get_session

from cachenode.client import NodeClient
from cachenode.routing import parse_address
from imagecache.config import AwsConfig
from manager.backends.aws import AwsPool
from manager.backends.base import NodeHandle, PoolError
from tests.aws import REGION, aws_environment, moto_server  # noqa: F401
from tests.conftest import NodeProcess, start_node_process

NODE_PORT = 11311  # what the default resolver would use; the tests map instances instead


class NodeFleet:
    """Runs a cache node on loopback for each instance id it is asked to resolve."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeProcess] = {}
        self.private_ips: dict[str, str] = {}

    def resolve(self, instance_id: str, private_ip: str) -> str:
        self.private_ips[instance_id] = private_ip
        node = self.nodes.get(instance_id)
        if node is None:
            # Blocks the event loop for the node's start-up; fine in a test.
            node = self.nodes[instance_id] = start_node_process("--capacity-mb", "8")
        return f"{node.host}:{node.port}"

    def stop_all(self) -> None:
        # Signal every node first so they shut down side by side.
        for node in self.nodes.values():
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            node.stop()


@pytest.fixture
def fleet() -> Iterator[NodeFleet]:
    nodes = NodeFleet()
    try:
        yield nodes
    finally:
        nodes.stop_all()


@pytest.fixture
async def aws(moto_server: str, aws_environment: None) -> AwsConfig:  # noqa: F811
    return AwsConfig(REGION, moto_server)


@pytest.fixture(scope="module")
def session() -> AioSession:
    # One session for the checking clients: it parses EC2's large API model once.
    return get_session()


@pytest.fixture
async def clients(aws: AwsConfig, session: AioSession) -> AsyncIterator[tuple[Any, Any]]:
    """(autoscaling, ec2) clients for checking what the pool did."""
    async with (
        session.create_client(
            "autoscaling", region_name=REGION, endpoint_url=aws.endpoint_url
        ) as autoscaling,
        session.create_client("ec2", region_name=REGION, endpoint_url=aws.endpoint_url) as ec2,
    ):
        yield autoscaling, ec2


@pytest.fixture
async def group(clients: tuple[Any, Any]) -> AsyncIterator[str]:
    """A new Auto Scaling group (min 0, max 8) with one instance; yields its name."""
    autoscaling, ec2 = clients
    # A filtered listing: moto has over a thousand images, and listing them all is slow.
    images = await ec2.describe_images(
        Filters=[{"Name": "name", "Values": ["ubuntu/images/hvm-ssd/*"]}]
    )
    image_id = images["Images"][0]["ImageId"]
    name = f"cache-nodes-{uuid4().hex}"
    await ec2.create_launch_template(
        LaunchTemplateName=name,
        LaunchTemplateData={"ImageId": image_id, "InstanceType": "t3.micro"},
    )
    await autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateName": name, "Version": "$Latest"},
        MinSize=0,
        MaxSize=8,
        DesiredCapacity=1,
        AvailabilityZones=[f"{REGION}a"],
    )
    yield name
    await autoscaling.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)


async def describe_group(autoscaling: Any, name: str) -> dict[str, Any]:
    response = await autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
    result: dict[str, Any] = response["AutoScalingGroups"][0]
    return result


def in_service(group: dict[str, Any]) -> set[str]:
    return {i["InstanceId"] for i in group["Instances"] if i["LifecycleState"] == "InService"}


async def instance_states(ec2: Any, ids: list[str]) -> dict[str, tuple[Any, str]]:
    """instance id -> (launch time, EC2 state name)."""
    response = await ec2.describe_instances(InstanceIds=ids)
    return {
        i["InstanceId"]: (i["LaunchTime"], i["State"]["Name"])
        for r in response["Reservations"]
        for i in r["Instances"]
    }


async def assert_answers(handles: list[NodeHandle]) -> None:
    for handle in handles:
        host, port = parse_address(handle.address)
        # Only loopback nodes the test runs: never one of moto's 10.x addresses.
        assert host == "127.0.0.1"
        async with NodeClient(host, port) as client:
            assert await client.ping()


def free_port() -> int:
    """A loopback port nothing listens on (closed again at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_grow_and_shrink_from_one_to_three_to_two_to_one(
    aws: AwsConfig, clients: tuple[Any, Any], group: str, fleet: NodeFleet
) -> None:
    autoscaling, ec2 = clients
    async with AwsPool(
        group, NODE_PORT, aws, resolve_address=fleet.resolve, ready_timeout=30, poll_seconds=0.05
    ) as pool:
        [first] = await pool.nodes()
        await assert_answers([first])

        grown = await pool.grow(2)

        assert len(grown) == 2
        assert first.node_id not in {h.node_id for h in grown}
        await assert_answers(grown)
        three = await pool.nodes()
        assert {h.node_id for h in three} == {first.node_id} | {h.node_id for h in grown}
        described = await describe_group(autoscaling, group)
        assert described["DesiredCapacity"] == 3
        assert in_service(described) == {h.node_id for h in three}
        launched = await instance_states(ec2, [h.node_id for h in three])
        # Oldest launch first, ties broken by id.
        assert [h.node_id for h in three] == sorted(launched, key=lambda i: (launched[i][0], i))

        # The manager picks the node to leave: the middle one, not the group's choice.
        chosen = three[1].node_id
        await pool.shrink([chosen])

        described = await describe_group(autoscaling, group)
        assert described["DesiredCapacity"] == 2
        assert chosen not in in_service(described)
        states = await instance_states(ec2, [chosen])
        assert states[chosen][1] in ("shutting-down", "terminated")
        two = await pool.nodes()
        assert two == [h for h in three if h.node_id != chosen]

        await pool.shrink([two[0].node_id])

        described = await describe_group(autoscaling, group)
        assert described["DesiredCapacity"] == 1
        assert await pool.nodes() == [two[1]]
        assert in_service(described) == {two[1].node_id}

    # moto handed out 10.x addresses; every node address the pool gave was loopback.
    assert all(ip.startswith("10.") for ip in fleet.private_ips.values())
    assert set(fleet.private_ips) == {h.node_id for h in three}


async def test_grow_of_unreachable_nodes_fails_in_time_and_gives_capacity_back(
    aws: AwsConfig, clients: tuple[Any, Any], group: str
) -> None:
    autoscaling, ec2 = clients
    [original] = in_service(await describe_group(autoscaling, group))
    dead = f"127.0.0.1:{free_port()}"
    resolved: list[str] = []

    def resolve(instance_id: str, private_ip: str) -> str:
        resolved.append(instance_id)
        return dead

    async with AwsPool(
        group, NODE_PORT, aws, resolve_address=resolve, ready_timeout=0.5, poll_seconds=0.05
    ) as pool:
        started = time.monotonic()
        with pytest.raises(PoolError, match=r"not InService and answering within 0\.5 s"):
            await pool.grow(2)
        elapsed = time.monotonic() - started

    assert elapsed < 3
    described = await describe_group(autoscaling, group)
    assert described["DesiredCapacity"] == 1
    assert in_service(described) == {original}
    new = sorted(set(resolved))
    assert len(new) == 2
    states = await instance_states(ec2, new)
    assert {state for _, state in states.values()} <= {"shutting-down", "terminated"}


async def test_refused_resizes_change_nothing(
    aws: AwsConfig, clients: tuple[Any, Any], group: str
) -> None:
    autoscaling, _ = clients
    await autoscaling.update_auto_scaling_group(AutoScalingGroupName=group, MinSize=1)
    [member] = in_service(await describe_group(autoscaling, group))

    async with AwsPool(group, NODE_PORT, aws) as pool:
        with pytest.raises(PoolError, match="MaxSize is 8"):
            await pool.grow(8)
        with pytest.raises(ValueError, match="at least 1"):
            await pool.grow(0)
        # Never terminate an instance of another group, even with the group's own.
        with pytest.raises(PoolError, match="not its instances: i-0123456789abcdef0"):
            await pool.shrink([member, "i-0123456789abcdef0"])
        with pytest.raises(PoolError, match="MinSize is 1"):
            await pool.shrink([member])
        await pool.shrink([])

    described = await describe_group(autoscaling, group)
    assert (described["DesiredCapacity"], in_service(described)) == (1, {member})


async def test_a_missing_group_fails_at_start(aws: AwsConfig) -> None:
    with pytest.raises(PoolError, match="no Auto Scaling group named 'nowhere'"):
        async with AwsPool("nowhere", NODE_PORT, aws):
            pass


async def test_default_address_and_the_pool_lifecycle(aws: AwsConfig, group: str) -> None:
    pool = AwsPool(group, NODE_PORT, aws)
    with pytest.raises(PoolError, match="not started"):
        await pool.nodes()

    await pool.start()
    # Resolved only, never connected to: the default is the private ip and node port.
    [node] = await pool.nodes()
    await pool.close()
    await pool.close()

    host, port = parse_address(node.address)
    assert host.startswith("10.")
    assert port == NODE_PORT
    with pytest.raises(PoolError, match="not started"):
        await pool.grow(1)
