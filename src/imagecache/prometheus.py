"""The gateway's Prometheus metrics (``GET /metrics``), read from its state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from imagecache.appkeys import FAST_PATH_COUNTERS, KEPT_COPIES, POOL, SERVICE


class _GatewayMetrics:
    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        counters = self._app[POOL].counters
        fast = self._app[FAST_PATH_COUNTERS]
        for name, value, help_text in (
            ("fast_path_served", fast.served, "Cache hits answered from a kept copy"),
            ("fast_path_loaded", fast.loaded, "Reads of images with no kept copy, answered"),
            ("fast_path_not_found", fast.not_found, "Reads of keys with no image, answered 404"),
            ("fast_path_handed_over", fast.handed_over, "Connections given to aiohttp"),
            ("version_checks", fast.checks, "CHECKs of kept copies sent to cache nodes"),
            ("cache_hits", counters.hits, "Reads answered by a cache node"),
            ("cache_misses", counters.misses, "Reads the cache could not answer"),
            ("cache_node_errors", counters.errors, "Cache node failures read around"),
            ("blob_reads", self._app[SERVICE].blob_reads, "Loads that read the blob store"),
        ):
            family = CounterMetricFamily(f"imagecache_gateway_{name}", help_text)
            family.add_metric([], value)
            yield family
        kept = GaugeMetricFamily("imagecache_gateway_kept_copies_bytes", "Kept copies' size")
        kept.add_metric([], self._app[KEPT_COPIES].used)
        yield kept
        nodes = GaugeMetricFamily("imagecache_gateway_cache_nodes", "Cache nodes routed over")
        nodes.add_metric([], len(self._app[POOL].node_ids))
        yield nodes


async def metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry()
    registry.register(_GatewayMetrics(request.app))
    return web.Response(body=generate_latest(registry), content_type="text/plain")
