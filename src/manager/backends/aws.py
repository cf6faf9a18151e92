"""The AWS pool backend: cache nodes as the instances of an EC2 Auto Scaling Group.

The group (its launch template, subnets, MinSize and MaxSize) is made outside the
application; this backend only moves its desired capacity and terminates chosen
instances. Each instance runs one cache node on ``node_port``. The manager, not
AWS, decides which node leaves: a shrink terminates exactly the instances asked
for, decrementing the desired capacity, never lowering the capacity and letting
the group's termination policy choose. What AWS or an operator changes in the
group (replacements, terminations, added capacity) reaches the membership
through ``nodes()``, which the manager's reconcile loop reads.

Clients come from the standard AWS credential chain (environment, shared files,
instance profile); nothing here reads or stores a credential.

Use it as ``async with AwsPool(...) as pool:``, or call ``start()`` and
``close()`` yourself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from datetime import datetime
from typing import Any, NoReturn

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from cachenode.client import OPEN_ACCESS, NodeAccess, NodeClient
from cachenode.errors import NodeError
from cachenode.routing import AddressError, parse_address
from imagecache.config import AwsConfig
from manager.backends.base import NodeHandle, PoolError

log = logging.getLogger(__name__)

Resolver = Callable[[str, str], str]
"""``resolve_address(instance_id, private_ip) -> "host:port"`` of the instance's node."""

# Instances in these states are already leaving the group.
_LEAVING = ("Terminating", "Terminated")
# A readiness probe gives up on one node quickly; the grow loop tries again later.
_PROBE_TIMEOUT = 2.0
_PROBE_CONNECT_TIMEOUT = 1.0


class AwsPool:
    """The cache nodes of the Auto Scaling Group ``group_name`` (a PoolBackend).

    ``resolve_address`` turns an instance into its node's ``host:port``; the
    default is ``f"{private_ip}:{node_port}"`` (tests map instances to nodes on
    loopback instead). ``grow`` waits up to ``ready_timeout`` seconds for the new
    nodes, looking again every ``poll_seconds``. Raises ValueError for a bad
    port, timeout or interval.
    """

    def __init__(
        self,
        group_name: str,
        node_port: int,
        aws: AwsConfig,
        *,
        resolve_address: Resolver | None = None,
        ready_timeout: float = 300,
        poll_seconds: float = 5,
        node_access: NodeAccess = OPEN_ACCESS,
    ) -> None:
        self.group_name = group_name
        self.aws = aws
        if not 0 < node_port < 65536:
            raise ValueError(f"node_port must be a TCP port, not {node_port}")
        self.node_port = node_port
        if ready_timeout <= 0 or poll_seconds <= 0:
            raise ValueError("ready_timeout and poll_seconds must be positive")
        self.ready_timeout = ready_timeout
        self.poll_seconds = poll_seconds
        # How nodes are reached: their address (the instance's private IP by
        # default) and the token and TLS they require.
        self._resolve_address = resolve_address or self._private_address
        self._node_access = node_access
        # The AWS clients while started (``start``); None before and after.
        self._stack: AsyncExitStack | None = None
        self._autoscaling: Any = None
        self._ec2: Any = None
        # One resize at a time: grow tells its new instances apart from a
        # snapshot of the group, which a concurrent shrink or grow would spoil.
        self._resizing = asyncio.Lock()

    async def start(self) -> None:
        """Create the AWS clients and check that the group exists.

        Raises PoolError when the group cannot be described (missing group,
        no credentials, endpoint unreachable); the clients are closed again then.
        """
        if self._stack is not None:
            return
        stack = AsyncExitStack()
        try:
            session = get_session()
            self._autoscaling = await stack.enter_async_context(
                session.create_client(
                    "autoscaling", region_name=self.aws.region, endpoint_url=self.aws.endpoint_url
                )
            )
            self._ec2 = await stack.enter_async_context(
                session.create_client(
                    "ec2", region_name=self.aws.region, endpoint_url=self.aws.endpoint_url
                )
            )
            self._stack = stack
            await self._group()
        except BaseException:
            self._forget_clients()
            await stack.aclose()
            raise

    async def __aenter__(self) -> AwsPool:
        """The pool, started (``start``); it closes on exit."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the AWS clients. The instances keep running: they are the pool."""
        stack = self._stack
        self._forget_clients()
        if stack is not None:
            await stack.aclose()

    def _forget_clients(self) -> None:
        self._stack = self._autoscaling = self._ec2 = None

    async def nodes(self) -> list[NodeHandle]:
        """The group's InService, Healthy instances as nodes, oldest launch first
        (ties broken by instance id).

        An instance EC2 does not describe yet (eventual consistency) or that has
        no private address is left out until it does. Raises PoolError when AWS
        fails or an address cannot be resolved.
        """
        group = await self._group()
        return await self._handles(_in_service(group))

    async def grow(self, count: int) -> list[NodeHandle]:
        """Raise the desired capacity by ``count`` and return the new nodes once
        each is InService, Healthy and answers a cache node PING.

        The result normally holds exactly ``count`` nodes, oldest first; more only
        if the group launched a replacement at the same time.

        Raises ValueError when ``count`` < 1, PoolError when the group's MaxSize
        would be exceeded (nothing changes then), when AWS fails, or when the new
        nodes are not ready within ``ready_timeout``. After a failure past the
        capacity change grow rolls back, so that AWS keeps no half-started
        capacity and no instance the manager does not know of: it lowers the
        desired capacity by the instances not launched yet and terminates the
        ones launched, decrementing the capacity. A rollback that fails too is
        named in the PoolError, and the desired capacity may then stay raised.
        A cancelled grow does not roll back: its instances join the pool and
        show in ``nodes()`` once InService.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        async with self._resizing:
            group = await self._group()
            desired: int = group["DesiredCapacity"]
            if desired + count > group["MaxSize"]:
                raise PoolError(
                    f"cannot grow Auto Scaling group {self.group_name!r} from {desired} to "
                    f"{desired + count} instances: its MaxSize is {group['MaxSize']}"
                )
            before = {instance["InstanceId"] for instance in group["Instances"]}
            with _aws_errors(
                f"set the desired capacity of {self.group_name!r} to {desired + count}"
            ):
                await self._autoscaling.set_desired_capacity(
                    AutoScalingGroupName=self.group_name,
                    DesiredCapacity=desired + count,
                    HonorCooldown=False,
                )
            log.info(
                "growing %s from %d to %d instances", self.group_name, desired, desired + count
            )
            try:
                async with asyncio.timeout(self.ready_timeout):
                    return await self._wait_ready(before, count)
            except TimeoutError:
                reason = (
                    f"{count} new instance(s) of {self.group_name!r} were not InService "
                    f"and answering within {self.ready_timeout} s"
                )
                await self._roll_back(before, count, reason)
            except PoolError as error:
                await self._roll_back(before, count, str(error))

    async def shrink(self, node_ids: Sequence[str]) -> None:
        """Terminate exactly these instances, decrementing the desired capacity.

        Instances already terminating are skipped. Nothing is terminated, and
        PoolError is raised, when an id is not an instance of this group (so a
        mistaken id can never terminate another group's instance) or when the
        group would fall below its MinSize. Raises PoolError when AWS fails; its
        message names the instances terminated before the failure.
        """
        wanted = list(dict.fromkeys(node_ids))
        if not wanted:
            return
        async with self._resizing:
            group = await self._group()
            states = {i["InstanceId"]: i["LifecycleState"] for i in group["Instances"]}
            strangers = [node_id for node_id in wanted if node_id not in states]
            if strangers:
                raise PoolError(
                    f"cannot shrink Auto Scaling group {self.group_name!r}: "
                    f"not its instances: {', '.join(strangers)}"
                )
            leaving = [node_id for node_id in wanted if not states[node_id].startswith(_LEAVING)]
            desired: int = group["DesiredCapacity"]
            if desired - len(leaving) < group["MinSize"]:
                raise PoolError(
                    f"cannot shrink Auto Scaling group {self.group_name!r} from {desired} to "
                    f"{desired - len(leaving)} instances: its MinSize is {group['MinSize']}"
                )
            done: list[str] = []
            for node_id in leaving:
                try:
                    await self._terminate(node_id)
                except PoolError as error:
                    if not done:
                        raise
                    raise PoolError(f"{error} (already terminated: {', '.join(done)})") from error
                done.append(node_id)
            log.info("shrank %s by terminating %s", self.group_name, ", ".join(done) or "nothing")

    # -- plumbing -----------------------------------------------------------

    def _private_address(self, instance_id: str, private_ip: str) -> str:
        return f"{private_ip}:{self.node_port}"

    async def _group(self) -> dict[str, Any]:
        if self._autoscaling is None:
            raise PoolError("the AWS pool is not started (use async with, or start())")
        with _aws_errors(f"describe Auto Scaling group {self.group_name!r}"):
            response = await self._autoscaling.describe_auto_scaling_groups(
                AutoScalingGroupNames=[self.group_name]
            )
        groups: list[dict[str, Any]] = response.get("AutoScalingGroups", [])
        if not groups:
            raise PoolError(
                f"there is no Auto Scaling group named {self.group_name!r} in {self.aws.region}"
            )
        return groups[0]

    async def _handles(self, instance_ids: Sequence[str]) -> list[NodeHandle]:
        """The instances as nodes, oldest launch first; undescribed ones left out."""
        return [handle for _, handle in await self._launched(instance_ids)]

    async def _launched(self, instance_ids: Sequence[str]) -> list[tuple[datetime, NodeHandle]]:
        """(launch time, node) of the instances EC2 describes, oldest launch first."""
        if not instance_ids:
            return []
        launched: list[tuple[datetime, str, str]] = []
        # A filter, unlike InstanceIds=, leaves out an id EC2 does not know yet
        # instead of failing the whole call.
        pages = self._ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-id", "Values": list(instance_ids)}]
        )
        with _aws_errors(f"describe the instances of {self.group_name!r}"):
            async for page in pages:
                for reservation in page.get("Reservations", ()):
                    for instance in reservation.get("Instances", ()):
                        instance_id = instance["InstanceId"]
                        private_ip = instance.get("PrivateIpAddress")
                        if private_ip is None:
                            log.warning("instance %s has no private address yet", instance_id)
                            continue
                        launched.append((instance["LaunchTime"], instance_id, private_ip))
        launched.sort()
        return [
            (launch_time, NodeHandle(instance_id, self._resolve(instance_id, private_ip)))
            for launch_time, instance_id, private_ip in launched
        ]

    def _resolve(self, instance_id: str, private_ip: str) -> str:
        try:
            address = self._resolve_address(instance_id, private_ip)
            parse_address(address)
        except AddressError as error:
            raise PoolError(f"bad node address for instance {instance_id}: {error}") from error
        except Exception as error:
            # The resolver is the caller's code; whatever it raises, the manager
            # should see one kind of pool failure.
            raise PoolError(f"cannot resolve the node address of {instance_id}: {error}") from error
        return address

    async def _wait_ready(self, before: set[str], count: int) -> list[NodeHandle]:
        """Poll until ``count`` instances not in ``before`` are InService and answer."""
        ready: dict[str, tuple[datetime, NodeHandle]] = {}
        while True:
            group = await self._group()
            fresh = [i for i in _in_service(group) if i not in before and i not in ready]
            candidates = await self._launched(fresh)
            answers = await asyncio.gather(
                *(_answers(handle, self._node_access) for _, handle in candidates)
            )
            for (launch_time, handle), ok in zip(candidates, answers, strict=True):
                if ok:
                    ready[handle.node_id] = (launch_time, handle)
            if len(ready) >= count:
                return [handle for _, handle in sorted(ready.values(), key=_launch_order)]
            await asyncio.sleep(self.poll_seconds)

    async def _roll_back(self, before: set[str], count: int, reason: str) -> NoReturn:
        """Undo a failed grow as far as AWS lets us, then raise PoolError(reason)."""
        log.warning("grow of %s failed (%s); rolling back", self.group_name, reason)
        try:
            group = await self._group()
            launched = [
                i["InstanceId"]
                for i in group["Instances"]
                if i["InstanceId"] not in before and not i["LifecycleState"].startswith(_LEAVING)
            ]
            unlaunched = count - len(launched)
            if unlaunched > 0:
                # First, so that the group stops launching what nobody waits for.
                target = max(group["MinSize"], group["DesiredCapacity"] - unlaunched)
                with _aws_errors(f"set the desired capacity of {self.group_name!r} to {target}"):
                    await self._autoscaling.set_desired_capacity(
                        AutoScalingGroupName=self.group_name,
                        DesiredCapacity=target,
                        HonorCooldown=False,
                    )
            # Terminating by id, never by lowering the capacity, so the group
            # cannot pick an old, serving node instead of a new one.
            for instance_id in launched:
                await self._terminate(instance_id)
        except PoolError as error:
            raise PoolError(
                f"{reason}; rolling back failed too, so the desired capacity of "
                f"{self.group_name!r} may stay raised: {error}"
            ) from error
        raise PoolError(f"{reason}; the new capacity was given back")

    async def _terminate(self, instance_id: str) -> None:
        with _aws_errors(f"terminate instance {instance_id} of {self.group_name!r}"):
            await self._autoscaling.terminate_instance_in_auto_scaling_group(
                InstanceId=instance_id, ShouldDecrementDesiredCapacity=True
            )


def _launch_order(entry: tuple[datetime, NodeHandle]) -> tuple[datetime, str]:
    return entry[0], entry[1].node_id


def _in_service(group: dict[str, Any]) -> list[str]:
    return [
        instance["InstanceId"]
        for instance in group.get("Instances", ())
        if instance.get("LifecycleState") == "InService"
        and instance.get("HealthStatus") == "Healthy"
    ]


async def _answers(handle: NodeHandle, node_access: NodeAccess) -> bool:
    """Whether the node at ``handle.address`` answers PING now."""
    client = NodeClient.at(
        handle.address,
        pool_size=1,
        timeout=_PROBE_TIMEOUT,
        connect_timeout=_PROBE_CONNECT_TIMEOUT,
        access=node_access,
    )
    try:
        await client.ping()
    except NodeError as error:
        log.debug("node %s at %s not ready: %s", handle.node_id, handle.address, error)
        return False
    finally:
        await client.close()
    return True


@contextmanager
def _aws_errors(action: str) -> Iterator[None]:
    """Turn botocore's errors into PoolError("cannot <action>: <why>")."""
    try:
        yield
    except (ClientError, BotoCoreError) as error:
        raise PoolError(f"cannot {action}: {error}") from error
