"""Benchmark resizing the cache pool under a steady read load (see bench/README.md).

Starts ``imagecache up`` (manager, gateway and a local pool of node processes)
in a temporary folder on free loopback ports, uploads a working set of
random-noise PNGs that fits on one node, then keeps ``--clients`` readers
fetching random keys (``GET /image/<key>``) while it resizes the pool through
the gateway's ``/api/configure_cache`` (by default 1 -> 2 -> 4 -> 8 -> 4 -> 2 -> 1).
``--workers N`` runs the gateway in N processes (``imagecache up --workers N``;
1 by default, whatever ``up``'s own default); their counters are read from
each and summed.

For every step it prints the share of the working set whose owner changed
(rendezvous ring over the node ids before and after, read from the metadata
database's ``nodes`` table) against the ideal share, the gateway's cache hit
rate (its Prometheus counters) in the ``--settle-seconds`` before the call,
during it and after it, how long the call took, the read latency and every
read error, beside the goals: at most 1.15x the ideal share of keys moved, a
hit rate after the step of at least 95% of the one before, no read error.

Every process started here is stopped on the way out, also on an error,
Ctrl-C or SIGTERM (and, through PR_SET_PDEATHSIG, if this process is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import random
import re
import shutil
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import aiohttp
import uvloop

import benchkit
from benchkit import (
    KIB,
    MIB,
    Up,
    UpSlot,
    get_from_each,
    print_table_header,
    progress,
    prometheus_values,
    ratio_of,
    run_guarded,
    verdict,
)
from cachenode.client import NodeClient
from cachenode.routing import Ring

READ_TIMEOUT: Final = 10.0  # seconds; a read slower than this counts as an error
ADMIN_TIMEOUT: Final = 300.0  # seconds for one configure_cache call
UPLOADS_IN_FLIGHT: Final = 8
IMAGE_WIDTH: Final = 100  # pixels; the height follows from the wanted file size
HASH_SAMPLE: Final = 100_000  # synthetic keys for the ring's share of moved keys
DEFAULT_STEPS: Final = "1,2,4,8,4,2,1"
MIN_NODES: Final = 1
MAX_NODES: Final = 8
# Goals from the issue.
GOAL_MOVED: Final = 1.15  # keys whose owner changed, at most this multiple of the ideal share
GOAL_HITS_AFTER: Final = 0.95  # hit rate after a step, at least this share of the one before
METRIC_PREFIX: Final = "imagecache_gateway_"
# The manager's line; "N outdated" (copies refused as older than the catalog) came later.
MIGRATION_LINE: Final = re.compile(
    r"migration: (\d+) of (\d+) keys changed owner, (\d+) copied \(([\d.]+) MB\),?"
    r"(?: (\d+) outdated,)? in ([\d.]+) s"
)
READ_AROUND_LINE: Final = "failed, reading around it"


# -- the working set ---------------------------------------------------------------


def noise_png(size: int, seed: int) -> bytes:
    """A PNG of random pixels of about ``size`` bytes (noise does not compress)."""
    return benchkit.noise_png(size, seed, IMAGE_WIDTH)[0]


def working_set(count: int, size: int) -> dict[str, bytes]:
    return {f"bench-{number:05d}": noise_png(size, seed=number) for number in range(count)}


async def upload_all(http: aiohttp.ClientSession, up: Up, images: Mapping[str, bytes]) -> None:
    slots = asyncio.Semaphore(UPLOADS_IN_FLIGHT)

    async def upload(key: str, data: bytes) -> None:
        form = aiohttp.FormData()
        form.add_field("key", key)
        form.add_field("file", data, filename=f"{key}.png", content_type="image/png")
        async with slots, http.post(f"{up.gateway}/api/upload", data=form) as reply:
            text = await reply.text()
            if reply.status != 200:
                raise RuntimeError(f"upload of {key} answered {reply.status}: {text}")

    await asyncio.gather(*(upload(key, data) for key, data in images.items()))


# -- what the system says ------------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    """The gateway's Prometheus counters at one moment, summed over its processes.

    Each gateway worker counts for itself; ``processes`` are the pids read, and
    ``lookups`` the hits + misses of each. A difference of two readings
    (``since``) is stale, its counters NaN, when the processes differ (a
    worker exited or was started again in between: its counts restarted from
    0) or when some process could not be read at either end (``missing``).
    """

    at: float
    hits: float
    misses: float
    node_errors: float
    blob_reads: float
    nodes: float
    processes: tuple[int, ...] = ()
    lookups: tuple[float, ...] = ()
    missing: int = 0

    @property
    def stale(self) -> bool:
        return self.missing > 0

    def since(self, earlier: Counters) -> Counters:
        if self.processes != earlier.processes or self.stale or earlier.stale:
            return Counters(
                self.at - earlier.at,
                math.nan,
                math.nan,
                math.nan,
                math.nan,
                self.nodes,
                self.processes,
                (),
                max(1, self.missing + earlier.missing),
            )
        return Counters(
            self.at - earlier.at,
            self.hits - earlier.hits,
            self.misses - earlier.misses,
            self.node_errors - earlier.node_errors,
            self.blob_reads - earlier.blob_reads,
            self.nodes,
            self.processes,
            tuple(a - b for a, b in zip(self.lookups, earlier.lookups, strict=True)),
        )

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else math.nan


async def scrape(up: Up) -> Counters:
    """The gateway's hit, miss, node error and blob read counters (``GET /metrics``).

    With several gateway processes, each one's (the kernel picks the process
    for each connection: ``benchkit.get_from_each`` connects until every one
    answered, told apart by which holds the connection), summed.
    """
    return await asyncio.to_thread(_scrape, up)


def _scrape(up: Up) -> Counters:
    processes = up.gateway_processes()
    answers = get_from_each(up.gateway_port, "/metrics", processes)
    at = time.monotonic()
    each: list[dict[str, float]] = []
    for pid in processes:
        if pid in answers:
            values = prometheus_values(answers[pid].decode())
            each.append(
                {
                    name.removeprefix(METRIC_PREFIX).removesuffix("_total"): value
                    for name, value in values.items()
                    if name.startswith(METRIC_PREFIX)
                }
            )

    def total(name: str) -> float:
        return sum(values[name] for values in each)

    return Counters(
        at,
        total("cache_hits"),
        total("cache_misses"),
        total("cache_node_errors"),
        total("blob_reads"),
        min((values["cache_nodes"] for values in each), default=math.nan),
        processes,
        tuple(values["cache_hits"] + values["cache_misses"] for values in each),
        # None found at all (every worker gone) counts as one missing.
        len(processes) - len(each) if processes else 1,
    )


@dataclass(frozen=True)
class Member:
    node_id: str
    address: str
    state: str


def membership(up: Up) -> list[Member]:
    """The pool as the manager published it (the ``nodes`` table of the metadata database)."""
    connection = sqlite3.connect(f"file:{up.database}?mode=ro", uri=True, timeout=10)
    try:
        rows = connection.execute(
            "SELECT node_id, address, state FROM nodes ORDER BY position"
        ).fetchall()
    finally:
        connection.close()
    return [Member(str(node_id), str(address), str(state)) for node_id, address, state in rows]


async def keys_on(member: Member) -> set[bytes]:
    host, _, port = member.address.rpartition(":")
    async with NodeClient(host, int(port), timeout=5) as client:
        return {key async for key, _size in client.iter_keys()}


@dataclass(frozen=True)
class Placement:
    on_owner: int  # keys of the working set cached on the node that owns them
    elsewhere: int  # copies of working-set keys on a node that does not own them
    total: int


async def placement(members: Sequence[Member], keys: Sequence[str]) -> Placement:
    """Where the working set is cached now, by listing every member's keys."""
    ring = Ring([m.node_id for m in members])
    held = await asyncio.gather(*(keys_on(m) for m in members))
    by_node = {m.node_id: found for m, found in zip(members, held, strict=True)}
    on_owner = elsewhere = 0
    for key in keys:
        encoded = key.encode()
        owner = ring.owner(encoded)
        for node_id, found in by_node.items():
            if encoded in found:
                if node_id == owner:
                    on_owner += 1
                else:
                    elsewhere += 1
    return Placement(on_owner, elsewhere, len(keys))


async def node_stats(members: Sequence[Member]) -> list[dict[str, object]]:
    async def one(member: Member) -> dict[str, object]:
        host, _, port = member.address.rpartition(":")
        async with NodeClient(host, int(port), timeout=5) as client:
            return await client.stats()

    return list(await asyncio.gather(*(one(m) for m in members)))


async def warm(http: aiohttp.ClientSession, up: Up, images: Mapping[str, bytes]) -> None:
    """Read every image once (a miss fills the cache); raises on a wrong answer."""
    slots = asyncio.Semaphore(UPLOADS_IN_FLIGHT)

    async def read(key: str) -> None:
        async with slots, http.get(f"{up.gateway}/image/{key}") as reply:
            body = await reply.read()
            if reply.status != 200 or body != images[key]:
                raise RuntimeError(f"GET /image/{key} answered {reply.status}, {len(body)} bytes")

    await asyncio.gather(*(read(key) for key in images))


def cpu_jiffies() -> tuple[int, int]:
    """The machine's busy and total CPU time (``/proc/stat``), in clock ticks."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


# -- the readers ------------------------------------------------------------------


@dataclass
class Reads:
    """Every read: when it started, how long it took, and the failed ones."""

    starts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)

    def latencies_between(self, start: float, end: float) -> list[float]:
        return [
            latency
            for started, latency in zip(self.starts, self.latencies, strict=True)
            if start <= started < end
        ]

    def errors_between(self, start: float, end: float) -> list[str]:
        return [what for started, what in self.errors if start <= started < end]


async def reader(
    number: int,
    http: aiohttp.ClientSession,
    up: Up,
    images: Mapping[str, bytes],
    interval: float,
    reads: Reads,
    stop: asyncio.Event,
) -> None:
    """One client: GET random keys until ``stop``, one every ``interval`` s (0: back to back)."""
    rng = random.Random(number)
    keys = list(images)
    due = time.monotonic() + rng.random() * interval  # spread the clients' phases
    while not stop.is_set():
        if interval:
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            # A late client does not catch up in a burst: the rate stays bounded.
            due = max(due + interval, time.monotonic())
        key = rng.choice(keys)
        started = time.monotonic()
        problem: str | None = None
        try:
            async with http.get(f"{up.gateway}/image/{key}") as reply:
                body = await reply.read()
                if reply.status != 200:
                    problem = f"{key}: HTTP {reply.status} {body[:200]!r}"
                elif body != images[key]:
                    problem = f"{key}: {len(body)} bytes, not the {len(images[key])} uploaded"
        except (aiohttp.ClientError, TimeoutError) as error:
            problem = f"{key}: {type(error).__name__} {error}"
        reads.starts.append(started)
        reads.latencies.append(time.monotonic() - started)
        if problem is not None:
            reads.errors.append((started, problem))


# -- one resize ---------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A stretch of the run: the gateway's counters over it and the reads started in it."""

    counters: Counters
    latencies: list[float]
    errors: list[str]
    busy_cores: float

    @property
    def reads(self) -> int:
        return len(self.latencies)

    def percentile(self, share: float) -> float:
        return percentile(self.latencies, share)


@dataclass(frozen=True)
class Migration:
    """The manager's own log line about the keys it moved."""

    moved: int
    examined: int
    copied: int
    megabytes: float
    seconds: float
    outdated: int = 0  # copies refused: older than the catalog's version


@dataclass(frozen=True)
class Step:
    before: list[Member]
    after: list[Member]
    answer: dict[str, object]
    call_seconds: float
    windows: dict[str, Window]  # "before", "during", "after"
    moved_keys: int
    total_keys: int
    sample_moved: float  # share of HASH_SAMPLE synthetic keys whose owner changed
    migration: Migration | None
    read_around: int  # log lines of the call and after it: a node failed, was read around
    placement: Placement

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.before), len(self.after)

    @property
    def ideal(self) -> float:
        small, large = sorted(self.sizes)
        return 1 - small / large

    @property
    def moved_share(self) -> float:
        return self.moved_keys / self.total_keys

    @property
    def moved_ratio(self) -> float:
        return ratio_of(self.moved_share, self.ideal)

    @property
    def hits_kept(self) -> float:
        return ratio_of(
            self.windows["after"].counters.hit_rate, self.windows["before"].counters.hit_rate
        )

    @property
    def errors(self) -> int:
        return sum(len(w.errors) for w in self.windows.values())


def moved_between(before: Sequence[str], after: Sequence[str], keys: Sequence[bytes]) -> int:
    """How many of ``keys`` have another owner under ``after`` than under ``before``."""
    old, new = Ring(before), Ring(after)
    return sum(old.owner(key) != new.owner(key) for key in keys)


class Measure:
    """Marks a window: the gateway's counters, the machine's CPU, the time."""

    def __init__(self, up: Up, reads: Reads) -> None:
        self._up = up
        self._reads = reads

    async def mark(self) -> tuple[Counters, tuple[int, int]]:
        return await scrape(self._up), cpu_jiffies()

    def window(
        self, start: tuple[Counters, tuple[int, int]], end: tuple[Counters, tuple[int, int]]
    ) -> Window:
        (first, (busy0, total0)), (last, (busy1, total1)) = start, end
        cores = os.cpu_count() or 1
        busy = (busy1 - busy0) / (total1 - total0) * cores if total1 > total0 else math.nan
        return Window(
            last.since(first),
            self._reads.latencies_between(first.at, last.at),
            self._reads.errors_between(first.at, last.at),
            busy,
        )


async def resize(
    admin: aiohttp.ClientSession,
    up: Up,
    measure: Measure,
    target: int,
    settle: float,
    keys: Sequence[str],
) -> Step:
    """One step: settle, resize with configure_cache, settle; everything measured."""
    before = await asyncio.to_thread(membership, up)
    first = await measure.mark()
    await asyncio.sleep(settle)
    called = await measure.mark()
    log_offset = up.output_size()
    started = time.monotonic()
    async with admin.post(
        f"{up.gateway}/api/configure_cache", params={"mode": "manual", "numNodes": str(target)}
    ) as reply:
        answer: dict[str, object] = await reply.json(content_type=None)
        status = reply.status
    call_seconds = time.monotonic() - started
    returned = await measure.mark()
    if status != 200:
        progress(f"configure_cache numNodes={target} answered {status}: {answer}")
    after = await asyncio.to_thread(membership, up)
    where = await placement([m for m in after if m.state == "active"], keys)
    await asyncio.sleep(settle)
    last = await measure.mark()

    text = up.output(log_offset)
    found = MIGRATION_LINE.findall(text)
    migration = None
    if found:
        moved, examined, copied, megabytes, outdated, seconds = found[-1]
        migration = Migration(
            int(moved),
            int(examined),
            int(copied),
            float(megabytes),
            float(seconds),
            int(outdated) if outdated else 0,
        )
    ids_before = [m.node_id for m in before]
    ids_after = [m.node_id for m in after]
    encoded = [key.encode() for key in keys]
    return Step(
        before=before,
        after=after,
        answer=answer,
        call_seconds=call_seconds,
        windows={
            "before": measure.window(first, called),
            "during": measure.window(called, returned),
            "after": measure.window(returned, last),
        },
        moved_keys=moved_between(ids_before, ids_after, encoded),
        total_keys=len(keys),
        sample_moved=math.nan,  # worked out once the readers stopped: it takes the CPU
        migration=migration,
        read_around=text.count(READ_AROUND_LINE),
        placement=where,
    )


# -- output ---------------------------------------------------------------------------


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1%}"


def _times(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def _count(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.1f}"


def print_results(
    steps: Sequence[Step], args: argparse.Namespace, image_bytes: int, cache_mb: int
) -> None:
    print()
    load = (
        f"{args.clients} clients back to back (closed loop)"
        if not args.rate
        else f"{args.clients} clients at {args.rate:g} reads/s in all"
    )
    print(
        f"Resizing under load: {args.images} noise PNGs ({image_bytes / MIB:.1f} MB, "
        f"{image_bytes / args.images / KIB:.1f} KB each) in nodes of {cache_mb} MB (LRU); "
        f"GET /image/<key> of random keys by {load}; "
        + (
            "one gateway process"
            if args.workers == 1
            else f"{args.workers} gateway worker processes (imagecache up --workers {args.workers})"
        )
    )
    summed = (
        f", summed over the {args.workers} workers (each read apart)" if args.workers > 1 else ""
    )
    print(
        f"windows: {args.settle_seconds:g} s before the configure_cache call, the call itself, "
        f"{args.settle_seconds:g} s after it returned. Hits: the gateway's Prometheus counters\n"
        f"imagecache_gateway_cache_hits_total / (+ cache_misses_total), deltas over each "
        f"window{summed}. moved: working-set keys whose owner\nchanged (cachenode.routing.Ring "
        "over the node ids of "
        f"the nodes table before and after); ideal: 1 - smaller/larger pool;\n"
        f"{HASH_SAMPLE // 1000}k: the same share over {HASH_SAMPLE:,} synthetic keys "
        f"(the hash, without the sampling noise of {args.images} keys)"
    )
    print()
    header = (
        f"{'step':<8}{'moved':>11}{'share':>8}{'ideal':>7}{'ratio':>7}"
        f"{f'{HASH_SAMPLE // 1000}k':>8}"
        f"{'ratio':>7}  {'manager: moved/listed, copied, MB, s':<38}{'cached':>9}{'stray':>7}"
    )
    print_table_header(header)
    for step in steps:
        old, new = step.sizes
        migration = step.migration
        reported = (
            f"{migration.moved}/{migration.examined}, {migration.copied}, "
            f"{migration.megabytes:.1f}, {migration.seconds:.2f}"
            + (f", {migration.outdated} outdated" if migration.outdated else "")
            if migration is not None
            else "(no migration line)"
        )
        print(
            f"{f'{old}->{new}':<8}{f'{step.moved_keys}/{step.total_keys}':>11}"
            f"{step.moved_share:>8.1%}{step.ideal:>7.1%}{step.moved_ratio:>6.2f}x"
            f"{step.sample_moved:>8.1%}{ratio_of(step.sample_moved, step.ideal):>6.2f}x  "
            f"{reported:<38}"
            f"{step.placement.on_owner / step.placement.total:>9.1%}{step.placement.elsewhere:>7}"
        )
    print(
        "(manager: its own log line for the step; cached: working-set keys on their owner right "
        "after the call returned, by listing\nevery node's keys; stray: copies on a node that "
        "does not own them)"
    )
    print()
    header = (
        f"{'step':<8}{'hit before':>11}{'during':>8}{'after':>8}{'kept':>7}{'call s':>8}"
        f"{'reads/s':>9}{'p50 ms':>8}{'p99 before':>11}{'p99 during':>11}{'p99 after':>10}"
        f"{'errors':>8}{'cores':>7}{'misses':>8}{'node err':>9}"
    )
    print_table_header(header)
    for step in steps:
        old, new = step.sizes
        before, during, after = (step.windows[w] for w in ("before", "during", "after"))
        misses = "/".join(_count(w.counters.misses) for w in (before, during, after))
        node_errors = "/".join(_count(w.counters.node_errors) for w in (before, during, after))
        print(
            f"{f'{old}->{new}':<8}{_percent(before.counters.hit_rate):>11}"
            f"{_percent(during.counters.hit_rate):>8}{_percent(after.counters.hit_rate):>8}"
            f"{_times(step.hits_kept):>7}{step.call_seconds:>8.2f}"
            f"{during.reads / during.counters.at if during.counters.at else math.nan:>9,.0f}"
            f"{_ms(during.percentile(0.5)):>8}{_ms(before.percentile(0.99)):>11}"
            f"{_ms(during.percentile(0.99)):>11}{_ms(after.percentile(0.99)):>10}"
            f"{step.errors:>8}{during.busy_cores:>7.2f}{misses:>8}{node_errors:>9}"
        )
    print(
        "(kept: hit rate after / before; call s: the configure_cache call, which returns when "
        "the resize and migration are done;\nreads/s, p50: during the call; errors: reads "
        "that failed or answered non-200 or other bytes, in all three windows; cores: the\n"
        f"machine's busy CPUs during the call (of {os.cpu_count()}); misses, node err: the "
        "gateway's counters before/during/after"
        + (", summed over its workers)" if args.workers > 1 else ")")
    )
    print()


def print_accounting(steps: Sequence[Step], reads: Reads, whole: Counters, up: Up) -> None:
    """Whether the gateway's counters saw every read: the hit rates rest on them."""
    processes = (
        "the gateway (in the up process)"
        if up.workers == 1
        else f"the {up.workers} gateway workers (pids {', '.join(map(str, whole.processes))})"
    )
    if whole.stale:
        print(
            f"counters: {processes} could not all be read at the start and the end of the "
            "readers, or one exited or was started again meanwhile: no accounting"
        )
        return
    lookups = whole.hits + whole.misses
    print(
        f"counters: {processes} counted {lookups:,.0f} lookups (hits + misses) for the "
        f"{len(reads.starts):,} reads made ({ratio_of(lookups, len(reads.starts)):.1%}), "
        f"{whole.hits:,.0f} hits, {whole.misses:,.0f} misses, {whole.node_errors:,.0f} node "
        f"errors, {whole.blob_reads:,.0f} blob reads"
        + (
            "; lookups per worker: "
            + ", ".join(
                f"{number}: {count:,.0f} ({ratio_of(count, lookups):.0%})"
                for number, count in enumerate(whole.lookups, 1)
            )
            if up.workers > 1
            else ""
        )
    )


def print_goals(steps: Sequence[Step], reads: Reads) -> bool:
    moved_ok = all(s.moved_ratio <= GOAL_MOVED for s in steps)
    hits_ok = all(s.hits_kept >= GOAL_HITS_AFTER for s in steps)
    errors = len(reads.errors)  # the whole run, not only the windows
    sizes_ok = all(s.answer.get("numNodes") == s.sizes[1] for s in steps)
    worst_moved = max(s.moved_ratio for s in steps)
    kept = [s.hits_kept for s in steps]
    # NaN: a window without counters (stale: see the check below).
    worst_kept = math.nan if any(map(math.isnan, kept)) else min(kept)
    print(
        f"goal: keys moved at most {GOAL_MOVED:g}x the ideal share: worst {worst_moved:.2f}x  "
        f"{verdict(moved_ok)}"
    )
    print(
        f"goal: hit rate after at least {GOAL_HITS_AFTER:.0%} of before: worst "
        f"{_percent(worst_kept)}  {verdict(hits_ok)}"
    )
    print(f"goal: no read error in the whole run: {errors}  {verdict(errors == 0)}")
    print(
        "check: every configure_cache call answered the size asked for, and the nodes table "
        f"listed that many active nodes  {verdict(sizes_ok)}"
    )
    stale = sum(w.counters.stale for s in steps for w in s.windows.values())
    print(
        "check: the counters of every gateway process were read at every mark, and no process "
        f"exited or started in between: {stale} stale windows  {verdict(stale == 0)}"
    )
    for _started, problem in reads.errors[:10]:
        print(f"  {problem}")
    print()
    return moved_ok and hits_ok and errors == 0 and sizes_ok and stale == 0


# -- the benchmark ---------------------------------------------------------------------


async def configure(admin: aiohttp.ClientSession, up: Up, **params: str) -> dict[str, object]:
    async with admin.post(f"{up.gateway}/api/configure_cache", params=params) as reply:
        answer: dict[str, object] = await reply.json(content_type=None)
        if reply.status != 200:
            raise RuntimeError(f"configure_cache {params} answered {reply.status}: {answer}")
        return answer


async def benchmark(up: Up, args: argparse.Namespace, steps: Sequence[int]) -> bool:
    """Fill the pool, read throughout, resize step by step; print; True when every goal held."""
    images = await asyncio.to_thread(working_set, args.images, args.size_kb * KIB)
    image_bytes = sum(len(data) for data in images.values())
    keys = list(images)
    # Room for the whole working set on one node, with the per-item overhead and to spare.
    cache_mb = args.cache_mb or max(8, math.ceil(2 * image_bytes / MIB) + 4)
    admin_timeout = aiohttp.ClientTimeout(total=ADMIN_TIMEOUT)
    read_timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=args.clients + 4)
    async with (
        aiohttp.ClientSession(timeout=admin_timeout) as admin,
        aiohttp.ClientSession(timeout=read_timeout, connector=connector) as http,
    ):
        answer = await configure(
            admin,
            up,
            mode="manual",
            numNodes=str(steps[0]),
            cacheSize=str(cache_mb),
            policy="LRU",
        )
        progress(f"configure_cache: {answer}")
        started = time.monotonic()
        await upload_all(admin, up, images)
        members = await asyncio.to_thread(membership, up)
        where = await placement(members, keys)
        progress(
            f"uploaded {len(images)} images ({image_bytes / MIB:.1f} MB) in "
            f"{time.monotonic() - started:.1f} s; {where.on_owner} of them cached on their owner "
            f"among {len(members)} node(s): {', '.join(m.node_id for m in members)}; "
            + "; ".join(
                f"{m.node_id}: {stats.get('sets')} sets, {stats.get('items')} items, "
                f"{stats.get('evictions')} evictions"
                for m, stats in zip(members, await node_stats(members), strict=True)
            )
        )
        if where.on_owner < len(keys):
            # The uploads write through to the owner, but only as a best effort: fill
            # the rest by reading every key once, so that the steps start warm.
            first = await scrape(up)
            await warm(http, up, images)
            last = (await scrape(up)).since(first)
            where = await placement(members, keys)
            progress(
                f"read every key once: {last.misses:.0f} misses, {last.hits:.0f} hits; now "
                f"{where.on_owner} cached on their owner"
            )
        if where.on_owner < len(keys):
            progress("WARNING: the working set is not all cached before the first step")

        reads = Reads()
        opening = await scrape(up)  # every read of the run counts between this and the last
        stop = asyncio.Event()
        interval = args.clients / args.rate if args.rate else 0.0
        readers = [
            asyncio.create_task(reader(n, http, up, images, interval, reads, stop))
            for n in range(args.clients)
        ]
        measure = Measure(up, reads)
        results: list[Step] = []
        try:
            for target in steps[1:]:
                progress(f"step {len(members)} -> {target}")
                step = await resize(admin, up, measure, target, args.settle_seconds, keys)
                results.append(step)
                members = step.after
                during = step.windows["during"]
                progress(
                    f"  {step.call_seconds:.2f} s; moved {step.moved_keys}/{step.total_keys}; "
                    f"hits {_percent(step.windows['before'].counters.hit_rate)} / "
                    f"{_percent(during.counters.hit_rate)} / "
                    f"{_percent(step.windows['after'].counters.hit_rate)}; "
                    f"p99 during {_ms(during.percentile(0.99))} ms; errors {step.errors}; "
                    f"gateway log: a node read around {step.read_around} times; "
                    f"now {', '.join(f'{m.node_id} ({m.state})' for m in step.after)}"
                )
                if len(step.after) != target or any(m.state != "active" for m in step.after):
                    progress(f"  the nodes table does not list {target} active nodes")
        finally:
            stop.set()
            await asyncio.gather(*readers, return_exceptions=True)
        whole = (await scrape(up)).since(opening)
        if results:
            sample = [f"sample-{number}".encode() for number in range(HASH_SAMPLE)]
            results = [
                replace(
                    step,
                    sample_moved=moved_between(
                        [m.node_id for m in step.before], [m.node_id for m in step.after], sample
                    )
                    / HASH_SAMPLE,
                )
                for step in results
            ]
            print_results(results, args, image_bytes, cache_mb)
            total_reads = len(reads.starts)
            print(
                f"{total_reads:,} reads in all, {len(reads.errors)} failed; "
                f"p99 over the whole run {_ms(percentile(reads.latencies, 0.99))} ms"
            )
            print_accounting(results, reads, whole, up)
            print()
            return print_goals(results, reads)
    return True


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of pool sizes: {text!r}") from None
    if len(steps) < 2 or not all(MIN_NODES <= s <= MAX_NODES for s in steps):
        raise argparse.ArgumentTypeError(
            f"give at least two pool sizes, each from {MIN_NODES} to {MAX_NODES}"
        )
    if any(a == b for a, b in itertools.pairwise(steps)):
        raise argparse.ArgumentTypeError("consecutive pool sizes must differ")
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=400, help="images in the working set (400)")
    parser.add_argument("--size-kb", type=int, default=20, help="size of each image, about (20)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent readers (16)")
    parser.add_argument(
        "--rate",
        type=float,
        default=400.0,
        help="reads per second of all clients together; 0: back to back (400)",
    )
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=10.0,
        help="seconds measured before each resize and after it (10)",
    )
    parser.add_argument(
        "--steps",
        type=parse_steps,
        default=parse_steps(DEFAULT_STEPS),
        help=f"pool sizes in turn, the first one the start ({DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--cache-mb",
        type=int,
        default=0,
        help="node capacity (cacheSize) in MB; 0: twice the working set + 4, at least 8 (0)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes: imagecache up --workers N (1, as before up had workers; "
        "up's own default is one per core)",
    )
    parser.add_argument("--keep-log", metavar="PATH", help="copy imagecache up's output there")
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="imagecache up's --log-level (INFO: resizes, migrations)",
    )
    args = parser.parse_args(argv)
    if min(args.images, args.size_kb, args.clients, args.workers) < 1 or args.cache_mb < 0:
        parser.error(
            "--images, --size-kb, --clients, --workers must be positive, --cache-mb not negative"
        )
    if args.rate < 0 or args.settle_seconds < 1:
        parser.error("--rate must not be negative, --settle-seconds at least 1")

    slot = UpSlot()

    def work(directory: Path) -> int:
        up = slot.start(directory, args.log_level, args.workers)
        progress(
            f"imagecache up (pid {up.process.pid}) in {directory}: gateway on port "
            f"{up.gateway_port}, manager on {up.manager_port}, nodes from "
            f"{up.first_node_port}"
        )
        progress(
            "(the dashboard password and gateway token it made up are not needed: the "
            "gateway forwards configure_cache to the manager with its own token)"
        )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            passed = runner.run(benchmark(up, args, args.steps))
        return 0 if passed else 1

    def cleanup() -> None:
        slot.stop()
        if slot.up is not None and args.keep_log:
            shutil.copyfile(slot.up.log, args.keep_log)

    return run_guarded(
        work,
        prefix="bench-resize-",
        cleanup=cleanup,
        stopped="every process stopped",
        on_failure=slot.show_output,
    )


if __name__ == "__main__":
    sys.exit(main())
