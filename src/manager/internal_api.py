"""The manager's API for gateways: configure_cache, getNumNodes, getRate, miss_curve,
and key_samples (the gateways' samples of their lookups, for the miss curve).

Gateways forward the public ``/api/...`` admin calls here (the README's API
gives their answers); the shared token guards it.
"""

from __future__ import annotations

import logging
import math

from aiohttp import web

from imagecache.answers import failure, success
from imagecache.errors import StorageError
from manager.appkeys import COLLECTOR, CONTROLLER, CURVES
from manager.backends.base import PoolError
from manager.forms import read_form
from manager.pool import ResizeError
from manager.settings import MAX_NODES, MIN_NODES, SettingsError, apply_params, policy_label

log = logging.getLogger(__name__)
# Samples one post may carry (a gateway sends at most keysamples.MAX_SAMPLES_PER_POST).
MAX_SAMPLES = 10_000


def add_routes(app: web.Application) -> None:
    """Every call is a POST to /internal/<its name>."""
    calls = {
        "configure_cache": configure_cache,
        "getNumNodes": get_num_nodes,
        "getRate": get_rate,
        "miss_curve": miss_curve,
        "key_samples": key_samples,
    }
    for name, handler in calls.items():
        app.router.add_post(f"/internal/{name}", handler)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


async def configure_cache(request: web.Request) -> web.Response:
    """Apply mode, numNodes, cacheSize, policy and the autoscaler's parameters.

    Everything is validated before anything changes; the answer echoes what
    is in force once it returns (the pool already has numNodes nodes then).
    """
    params: dict[str, str] = dict(await read_form(request))
    controller = request.app[CONTROLLER]
    try:
        settings = apply_params(await controller.settings(), params)
        target: int | None = None
        if params.get("numNodes", "") != "":
            text = params["numNodes"]
            if not text.isdigit() or not MIN_NODES <= int(text) <= MAX_NODES:
                raise SettingsError(f"numNodes must be a whole number from 1 to 8, not {text!r}")
            target = int(text)
    except SettingsError as problem:
        return failure(400, str(problem))
    try:
        await controller.configure(settings, target, "configure_cache (API)")
    except ResizeError as problem:
        return failure(400, str(problem))
    except (PoolError, StorageError) as problem:
        # Logged by the controller; the settings and the size are as they were.
        return failure(503, f"the pool could not be resized, nothing changed: {problem}")
    return success(
        mode=settings.mode.value,
        numNodes=controller.size,
        cacheSize=_number(settings.capacity_mb),
        policy=policy_label(settings.policy),
    )


async def get_num_nodes(request: web.Request) -> web.Response:
    return success(numNodes=request.app[CONTROLLER].size)


async def get_rate(request: web.Request) -> web.Response:
    """The miss or hit rate of the last minute (0 when there were no lookups)."""
    params = {**request.query, **(await read_form(request))}
    rate = params.get("rate", "").lower()
    if rate not in ("miss", "hit"):
        return failure(400, "rate must be 'miss' or 'hit'")
    collector, controller = request.app[COLLECTOR], request.app[CONTROLLER]
    await collector.collect(controller.members)  # include the last few seconds
    minute = collector.last_minute()
    value = None if minute is None else (minute.miss_rate if rate == "miss" else minute.hit_rate)
    return success(rate=rate, value=value or 0.0)


async def miss_curve(request: web.Request) -> web.Response:
    """The predicted miss rate of every pool size 1..8 (manager.curves), over the
    last complete minute, or the minute so far while none is complete."""
    curves = request.app[CURVES]
    curves.follow(await request.app[CONTROLLER].settings())
    window = curves.latest()
    return success(
        nodes=list(curves.sizes),
        predicted_miss=window.predicted_miss,
        capacity_mb=_number(window.capacity_mb),
        window_seconds=round(window.seconds, 3),
        sampled_lookups=window.sampled_lookups,
        window_complete="true" if window.complete else "false",
        sampling_rate=window.rate,
    )


async def key_samples(request: web.Request) -> web.Response:
    """A gateway's lookups since its last post: ``{"lookups": N, "samples":
    [[key, size], ...], "rate": R}``, answered with the rate to sample at next.
    A body out of shape is refused whole."""
    try:
        lookups, samples, rate = _parse_samples(await request.json())
    except ValueError as problem:
        message = f"the key samples are not {problem}"
        log.info("refused POST %s (400): %s", request.path, message)
        return failure(400, message)
    curves = request.app[CURVES]
    curves.follow(await request.app[CONTROLLER].settings())
    curves.feed(lookups, samples, rate)
    # The rate the gateway is to sample at from now on (manager.samplingrate).
    return success(rate=curves.rate)


def _parse_samples(body: object) -> tuple[int, list[tuple[str, int]], float | None]:
    """The posted lookups, samples and rate; ValueError names what is wrong.
    (request.json's JSONDecodeError is a ValueError too.)"""
    if not isinstance(body, dict):
        raise ValueError("a JSON object")
    lookups, samples, rate = body.get("lookups"), body.get("samples"), body.get("rate")
    if type(lookups) is not int or lookups < 0:
        raise ValueError("well formed: lookups must be a whole number >= 0")
    if not isinstance(samples, list) or len(samples) > MAX_SAMPLES:
        raise ValueError(f"well formed: samples must be a list of at most {MAX_SAMPLES}")
    parsed: list[tuple[str, int]] = []
    for sample in samples:
        if (
            not isinstance(sample, list)
            or len(sample) != 2
            or not isinstance(sample[0], str)
            or type(sample[1]) is not int
            or sample[1] < 0
        ):
            raise ValueError("well formed: each sample must be [key, size in bytes]")
        parsed.append((sample[0], sample[1]))
    if len(parsed) > lookups:
        raise ValueError("consistent: more samples than lookups")
    if rate is not None and (
        not isinstance(rate, int | float) or not math.isfinite(rate) or not 0 < rate <= 1
    ):
        raise ValueError("well formed: rate must be above 0 and at most 1")
    return lookups, parsed, None if rate is None else float(rate)
