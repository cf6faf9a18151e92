"""The manager's Prometheus metrics: every node's STATS, and the pool's own series.

Per node (label ``node``, its id), under the names prometheus/memcached_exporter
gives memcached's statistics, so its dashboards and alerts work unchanged:
``memcached_up``, ``memcached_commands_total{command,status}``,
``memcached_current_items``, ``memcached_current_bytes``,
``memcached_limit_bytes`` and ``memcached_items_evicted_total``. Beside them,
per node too, the reads no pool size can fix, which memcached does not have:
``imagecache_missing_lookups_total`` (keys with no image) and
``imagecache_uncacheable_lookups_total`` (images too large to cache). They
are per node, not summed, because they are the nodes' lifetime counters: a
sum drops when a node leaves the pool, which Prometheus would take for a
counter reset; ``sum(rate(...))`` gives the pool's figure. A get that
missed counts as ``memcached_commands_total{command="get",status="miss"}``
whether or not it was one of those, as memcached counts it: the node moves
such a miss out of its own ``misses`` when told, and a counter must not go
down. The pool's series are ``imagecache_*``: its size, its resizes by cause,
the predicted miss ratio by size, and the last minute's rates from the
collector.

Everything is read at scrape time: every member's STATS at once, each within
``NODE_TIMEOUT``, so one node that does not answer costs the scrape that long
and no more; it shows ``memcached_up 0`` and none of its other series.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cachenode.client import NodeAccess
from cachenode.errors import NodeError
from cachenode.routing import AddressError
from manager.appkeys import COLLECTOR, CONFIG, CONTROLLER, CURVES, RECORDS
from manager.backends.base import NodeHandle
from manager.metrics import MinuteStats
from manager.nodestats import NodeFigures, read_stats

log = logging.getLogger(__name__)

# Seconds a node has to connect, authenticate and answer STATS in a scrape
# (Prometheus's own scrape timeout is 10 s by default).
NODE_TIMEOUT = 1.0


# The per-node series beside memcached_up and the commands, by kind:
# name -> (the NodeFigures field it shows, help).
_NODE_GAUGES = {
    "memcached_current_items": ("items", "Current number of items stored by this instance."),
    "memcached_current_bytes": ("bytes", "Current number of bytes used to store items."),
    "memcached_limit_bytes": (
        "capacity",
        "Number of bytes this server is allowed to use for storage.",
    ),
}
_NODE_COUNTERS = {
    "memcached_items_evicted": (
        "evictions",
        "Total number of valid items removed from cache to free memory for new items.",
    ),
    "imagecache_missing_lookups": (
        "missing",
        "Gets of keys with no image: misses no pool size can fix, not in the miss rate.",
    ),
    "imagecache_uncacheable_lookups": (
        "uncacheable",
        "Gets of images over the nodes' maximum item size: misses no pool size can fix, "
        "not in the miss rate.",
    ),
}


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """What one scrape shows, gathered before the (synchronous) collection."""

    size: int
    nodes: Mapping[str, NodeFigures | None]  # by node id; None: did not answer
    resizes: Mapping[str, int]  # by kind: manual, automatic, failed
    last_minute: MinuteStats | None
    # The predicted miss ratio of the pool at each size (nodes -> ratio), or
    # None until a prediction exists: see predicted_miss_ratio_by_size.
    predicted_miss_ratio: Mapping[int, float] | None = None


class PoolCollector:
    """A prometheus_client collector of one ``PoolSnapshot``."""

    def __init__(self, snapshot: PoolSnapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from self._node_series()
        yield from self._pool_series()

    def _node_series(self) -> Iterator[Metric]:
        nodes = self._snapshot.nodes
        up = GaugeMetricFamily(
            "memcached_up", "Could the memcached server be reached.", labels=["node"]
        )
        for node_id, stats in nodes.items():
            up.add_metric([node_id], 0 if stats is None else 1)
        yield up
        answering = {node_id: stats for node_id, stats in nodes.items() if stats is not None}
        commands = CounterMetricFamily(
            "memcached_commands",
            "Total number of all requests broken down by command (get, set, etc.) and status.",
            labels=["node", "command", "status"],
        )
        for node_id, figures in answering.items():
            # memcached_exporter's label values; the node counts no delete misses.
            # Every get that missed counts as a miss: also those moved out of
            # "misses" since, as memcached counts them (a counter must not go down).
            for command, status, count in (
                ("get", "hit", figures.hits),
                ("get", "miss", figures.misses + figures.unfixable),
                ("set", "hit", figures.sets),
                ("delete", "hit", figures.deletes),
            ):
                commands.add_metric([node_id, command, status], count)
        yield commands
        for kind, table in (
            (GaugeMetricFamily, _NODE_GAUGES),
            (CounterMetricFamily, _NODE_COUNTERS),
        ):
            for name, (field, help_text) in table.items():
                family = kind(name, help_text, labels=["node"])
                for node_id, figures in answering.items():
                    family.add_metric([node_id], getattr(figures, field))
                yield family

    def _pool_series(self) -> Iterator[Metric]:
        snapshot = self._snapshot
        nodes = GaugeMetricFamily("imagecache_nodes", "Cache nodes in the pool")
        nodes.add_metric([], snapshot.size)
        yield nodes
        resizes = CounterMetricFamily(
            "imagecache_resizes",
            "Resizes of the pool in the activity history, by cause: manual, automatic, failed",
            labels=["cause"],
        )
        for kind, count in snapshot.resizes.items():
            resizes.add_metric([kind], count)
        yield resizes
        if snapshot.predicted_miss_ratio is not None:
            predicted = GaugeMetricFamily(
                "imagecache_predicted_miss_ratio",
                "The miss ratio the pool is predicted to have with this many nodes",
                labels=["nodes"],
            )
            for size, ratio in sorted(snapshot.predicted_miss_ratio.items()):
                predicted.add_metric([str(size)], ratio)
            yield predicted
        minute = snapshot.last_minute
        for name, value in (
            ("miss_rate", minute.miss_rate if minute else None),
            ("hit_rate", minute.hit_rate if minute else None),
        ):
            family = GaugeMetricFamily(
                f"imagecache_pool_{name}", f"The pool's {name} over the last minute"
            )
            if value is not None:
                family.add_metric([], value)
            yield family
        if minute is not None:
            for name, number in (("items", minute.items), ("bytes", minute.bytes)):
                family = GaugeMetricFamily(f"imagecache_pool_{name}", f"Cached {name} in the pool")
                family.add_metric([], number)
                yield family


async def read_node(node: NodeHandle, access: NodeAccess) -> NodeFigures | None:
    """The node's STATS figures, or None when it does not answer them in ``NODE_TIMEOUT``."""
    try:
        return NodeFigures.from_stats(await read_stats(node, access, NODE_TIMEOUT))
    except (NodeError, AddressError, TimeoutError, OSError) as error:
        # The collector warns about a node that stops answering; once is enough.
        log.debug("node %s (%s) left out of the scrape: %s", node.node_id, node.address, error)
    except (KeyError, TypeError, ValueError) as error:
        log.warning(
            "node %s (%s) answered STATS without its figures: %r", node.node_id, node.address, error
        )
    return None


async def read_nodes(
    members: Sequence[NodeHandle], access: NodeAccess
) -> dict[str, NodeFigures | None]:
    """Every member's figures (None for one that does not answer), read at once."""
    nodes: dict[str, NodeHandle] = {}
    for node in members:
        nodes.setdefault(node.node_id, node)  # one series per node id
    readings = await asyncio.gather(*(read_node(node, access) for node in nodes.values()))
    return dict(zip(nodes, readings, strict=True))


def predicted_miss_ratio_by_size(app: web.Application) -> Mapping[int, float] | None:
    """The pool's predicted miss ratio at each size (1..8 nodes), from the
    latest window of the miss curve (manager.curves).

    None while no lookup was sampled: the series is left out rather than shown
    with made-up values.
    """
    curves = app[CURVES]
    window = curves.latest()
    predicted = {
        nodes: ratio
        for nodes, ratio in zip(curves.sizes, window.predicted_miss, strict=True)
        if ratio is not None
    }
    return predicted or None


async def snapshot(app: web.Application) -> PoolSnapshot:
    """What a scrape of the manager ``app`` shows now."""
    controller = app[CONTROLLER]
    members = controller.members
    nodes, resizes = await asyncio.gather(
        read_nodes(members, app[CONFIG].node_access()), app[RECORDS].count_resizes()
    )
    return PoolSnapshot(
        size=controller.size,
        nodes=nodes,
        resizes=resizes,
        last_minute=app[COLLECTOR].last_minute(),
        predicted_miss_ratio=predicted_miss_ratio_by_size(app),
    )


async def exposition(app: web.Application) -> bytes:
    """The metrics of the manager ``app`` in Prometheus's text format."""
    registry = CollectorRegistry()
    registry.register(PoolCollector(await snapshot(app)))
    return generate_latest(registry)
