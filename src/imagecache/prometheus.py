"""The gateway's Prometheus metrics (``GET /metrics``), read from its state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from imagecache.appkeys import POOL, SERVICE


class _GatewayMetrics:
    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        counters = self._app[POOL].counters
        for name, value, help_text in (
            ("cache_hits", counters.hits, "Reads answered by a cache node"),
            ("cache_misses", counters.misses, "Reads the cache could not answer"),
            ("cache_node_errors", counters.errors, "Cache node failures read around"),
            ("blob_reads", self._app[SERVICE].blob_reads, "Loads that read the blob store"),
        ):
            family = CounterMetricFamily(f"imagecache_gateway_{name}", help_text)
            family.add_metric([], value)
            yield family
        nodes = GaugeMetricFamily("imagecache_gateway_cache_nodes", "Cache nodes routed over")
        nodes.add_metric([], len(self._app[POOL].node_ids))
        yield nodes


async def metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry()
    registry.register(_GatewayMetrics(request.app))
    return web.Response(body=generate_latest(registry), content_type="text/plain")
