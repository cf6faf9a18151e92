"""Benchmark the autoscaler's evidence against a local pool (issue 11; see bench/README.md).

Starts 8 real cache nodes (``imagecache node --capacity-mb C --policy P``) on
free 127.0.0.1 ports and drives them as the gateway does on a read, through
its own ``imagecache.cachepool.CachePool`` (the rendezvous ring over the
first n nodes): GET the key from its owner; on a miss, "fetch the image" (a
value of the key's size, drawn once per key, deterministic) and SET it on the
owner. ``--concurrency`` readers share each minute's lookups.

Time is compressed: a *minute* is ``--lookups-per-minute`` lookups. Each
workload is a deterministic stream of minutes, the first ``--warmup-minutes``
unmeasured, the next ``--minutes`` measured:

- ``zipf-S`` (steady): every lookup draws a key from a Zipf(S) popularity
  over ``--keys`` keys (ranks mapped to keys by a fixed random permutation,
  so hotness is independent of a key's name and of whether it is sampled);
- ``fits`` (steady): uniform over 2.15 nodes' worth of keys, a working set
  between n and 2n nodes' capacity, the one that flipped the pool every few
  minutes before issue 11 (1 node misses over half, 2 nodes under a tenth);
- ``drift`` (the working set moves): Zipf(0.9) over a hot set of ``--keys``
  keys, newest hottest, and every minute ``--drift-keys`` new keys arrive at
  its head while as many of the oldest leave its tail (a feed of uploads).

Key names carry the seed (``img-<seed>-<id>``), so another ``--seed`` also
samples other keys.

For each workload the same stream is run at every pool size 1..8 (nodes
cleared before each run), and after each minute every node's own counters
(binary STATS ``lookups``, ``misses``, ``bytes``: what the manager's collector
reads) give that minute's MEASURED miss rate and bytes in use at that size.

The PREDICTED curve comes from the code the system runs: during the run at
size 1, every lookup goes through the gateway's ``KeySampler``, and each
minute's batch is fed, with the rate it was sampled at, to the manager's
``MissCurves`` following the nodes' capacity and policy, which closes a
window each minute as the manager does (its miniature caches stay warm)
and chooses the next window's sampling rate (manager.samplingrate: toward
``TARGET_SAMPLED_KEYS`` distinct sampled keys a window, within
``MAX_SAMPLED_PER_SECOND`` sampled lookups a second). The sampler starts at
the curves' first rate and takes theirs after each window, as a gateway
does from the answer to its next post. The curves judge a window's traffic
on a simulated clock: a bench minute lasts ``--lookups-per-minute /
--traffic`` seconds of it (default traffic: lookups-per-minute / 60, a
bench minute is a minute), so ``--traffic`` says how busy a pool the same
stream stands for, and the budget caps the rate as it would there. A rate
change starts the miniature caches over: that window is cold (not
evidence, and left out of the prediction's mean). The pool's key stream is
the same at every size, so one pool's samples predict them all. The
accuracy table compares, per size, the mean of the measured minutes' warm
windows' predictions with the measured miss rate over those minutes (goal:
within 0.05), and names the rate: the first, the final, and the window
from which every window was sampled at it.

The policies are then run minute by minute through the autoscaler's own
``decide`` (ratio rule) and ``decide_predictive``, both through
``stabilized`` with the autoscaler's window and settling time (a bench
minute counts as 60 s), starting at 1 node at the first measured minute.
Each minute, the figures they judge are the ones MEASURED in that minute of
the run at the size the pool has then, and the curve is that minute's
predicted one. This is derived, not live: after a resize the figures come
from a pool that had the new size all along, whereas a real grow starts
with the migrated contents of the smaller pool, so the first minute after
a grow misses a little more than shown. Printed per workload and policy:
resizes until the measured miss rate is within [minMiss, maxMiss],
flaps (a resize reversed by another within ``--flap-minutes``; goal 0 on
the steady workloads), node-minutes, and the mean miss rate. On the steady
workloads a third, reference row, ``original``, runs ``decide`` told that no
bytes are in use and without ``stabilized``: the ratio rule without the
evidence rules that keep it from flapping. On every workload a reference
row, ``oracle``, runs ``decide_predictive`` on the miss rates measured that
minute at every size instead of the sampled curve: the policy given a
perfect prediction. Predictive gets each minute's curve as the autoscaler
does (``CurveWindow.evidence``: none when the minute sampled fewer than
``curves.MIN_SAMPLED_LOOKUPS`` lookups, and then ``decide``'s ratio rule
answers).

Two more figures say where a prediction's error comes from: ``unsampled``,
the same miniature simulation fed every lookup (rate 1, full-size caches),
whose difference from the measured rate is the model's error (the node's
accounting, n nodes behind a ring against one cache of n times the capacity,
concurrent readers); the rest is the sample's. ``--sampling-seeds N``
measures that sampling error offline (no nodes) on N other seeds of each
steady workload: other streams and other keys in the sample, through the
same ``MissCurves`` on the same simulated clock, so at the rate the
manager chooses for them.

Nothing is pinned (the nodes and this process share the machine's cores).
Exit status 0 whatever the figures; 130 on Ctrl-C, 143 on SIGTERM. Every
node is stopped on the way out (and, through PR_SET_PDEATHSIG, if this
process is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final, TypeVar

from benchkit import (
    HOST,
    KIB,
    MIB,
    Children,
    free_port,
    node_argv,
    print_table_header,
    progress,
    run_guarded,
    run_on_uvloop,
    show_log_tails,
    wait_until_listening,
)
from cachenode.client import NodeClient
from imagecache.cachepool import CachePool
from imagecache.keysamples import KeySampler
from imagecache.sampling import is_sampled, sampling_threshold
from manager.autoscaler import (
    DEFAULT_SETTLE_SECONDS,
    STABILIZATION_JUDGEMENTS,
    Decision,
    decide,
    decide_predictive,
    stabilized,
)
from manager.curves import MIN_SAMPLED_LOOKUPS, CurveWindow, MissCurves
from manager.metrics import MinuteStats
from manager.misscurve import ITEM_OVERHEAD, POOL_SIZES, MissCurve
from manager.samplingrate import MAX_SAMPLED_PER_SECOND, TARGET_SAMPLED_KEYS
from manager.settings import CacheSettings, Mode

T = TypeVar("T")
MINUTE_SECONDS: Final = 60.0  # what a bench minute stands for, for settling and stabilization
GOAL_ERROR: Final = 0.05  # |predicted - measured| at every size
GOAL_FLAPS: Final = 0  # on a steady workload
DRIFT_SKEW: Final = 0.9
NODE_TIMEOUT: Final = 5.0  # seconds; a slower node answer would count as a miss (checked)
POLICIES: Final = ("ratio", "predictive")
# The ratio rule without the bytes-in-use rule and the shrink window (``decide``
# told no bytes are in use, nothing stabilized): the rule before issue 11, for
# reference on the flaps.
ORIGINAL: Final = "original"
# ``decide_predictive`` handed each minute's MEASURED miss rates at every size
# instead of the sampled curve: the policy with a perfect prediction, for
# reference on what the sample costs.
ORACLE: Final = "oracle"
# The "fits" workload: uniform over this many nodes' worth of keys, a working
# set between n and 2n nodes' capacity (n = 2 here would do, 1 flips).
FITS_NODES: Final = 2.15
DEFAULTS: Final = CacheSettings()


# -- workloads -------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A deterministic stream of minutes of key ids; ``steady`` ones keep their popularity."""

    name: str
    description: str
    steady: bool
    skew: float
    hot_keys: int  # keys with a popularity at any one minute
    drift_per_minute: int  # new keys at the head of the popularity order each minute

    def universe(self, minutes: int) -> int:
        """How many distinct key ids the stream may name over ``minutes``."""
        return self.hot_keys + self.drift_per_minute * minutes

    def minutes(self, count: int, per_minute: int, seed: int) -> list[list[int]]:
        """``count`` minutes of ``per_minute`` key ids each (the same for the same seed)."""
        rng = random.Random(f"{seed}/{self.name}")
        weights = list(
            itertools.accumulate(1.0 / (rank + 1) ** self.skew for rank in range(self.hot_keys))
        )
        ranks = range(self.hot_keys)
        if self.steady:
            key_of_rank = list(ranks)
            rng.shuffle(key_of_rank)
            return [
                [key_of_rank[r] for r in rng.choices(ranks, cum_weights=weights, k=per_minute)]
                for _ in range(count)
            ]
        # Newest hottest: rank 0 is the newest key of the minute's hot set.
        minutes = []
        for minute in range(count):
            newest = self.hot_keys - 1 + minute * self.drift_per_minute
            minutes.append(
                [newest - r for r in rng.choices(ranks, cum_weights=weights, k=per_minute)]
            )
        return minutes


def items_per_node(args: argparse.Namespace) -> float:
    """About how many items of the mean size one node holds."""
    mean_value: float = (args.smallest_kb + args.largest_kb) / 2 * KIB
    capacity: float = args.capacity_mb * MIB
    return capacity / (mean_value + len(Images.name_of(0, 1)) + ITEM_OVERHEAD)


def workloads(args: argparse.Namespace) -> list[Workload]:
    chosen = [
        Workload(
            f"zipf-{skew:g}",
            f"Zipf {skew:g} over {args.keys:,} keys",
            steady=True,
            skew=skew,
            hot_keys=args.keys,
            drift_per_minute=0,
        )
        for skew in args.skews
    ]
    if args.fits:
        keys = round(FITS_NODES * items_per_node(args))
        chosen.append(
            Workload(
                "fits",
                f"uniform over {keys:,} keys, {FITS_NODES:g} nodes' capacity",
                steady=True,
                skew=0.0,
                hot_keys=keys,
                drift_per_minute=0,
            )
        )
    if args.drift_keys:
        chosen.append(
            Workload(
                "drift",
                f"Zipf {DRIFT_SKEW:g} over {args.keys:,} keys, newest hottest, "
                f"{args.drift_keys:,} new keys a minute",
                steady=False,
                skew=DRIFT_SKEW,
                hot_keys=args.keys,
                drift_per_minute=args.drift_keys,
            )
        )
    return chosen


class Images:
    """The "images": a key name and a value size per key id, drawn once (deterministic)."""

    def __init__(self, count: int, smallest: int, largest: int, seed: int) -> None:
        rng = random.Random(f"{seed}/sizes")
        # The seed is in the names: another seed samples other keys (CRC-32 of the name).
        self.names = [self.name_of(key_id, seed) for key_id in range(count)]
        self.sizes = [rng.randint(smallest, largest) for _ in range(count)]
        self._blank = bytes(largest)

    @staticmethod
    def name_of(key_id: int, seed: int) -> str:
        return f"img-{seed}-{key_id:08d}"

    def value(self, key_id: int) -> bytes:
        return self._blank[: self.sizes[key_id]]

    def sampled_share(self, key_ids: range, threshold: int) -> int:
        return sum(1 for k in key_ids if is_sampled(self.names[k].encode(), threshold))


# -- the pool ----------------------------------------------------------------------


@dataclass
class Node:
    port: int
    client: NodeClient

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def start_nodes(
    children: Children, count: int, capacity_mb: float, policy: str, log: IO[bytes]
) -> list[int]:
    """Start ``count`` nodes (all at once, then wait for each); their ports."""
    started = []
    for _ in range(count):
        port = free_port()
        argv = node_argv(port, capacity_mb, "--policy", policy)
        process = children.start(argv, core=0, stdout=log, stderr=log)
        started.append((process, port))
    for process, port in started:
        wait_until_listening(process, port, f"the node on port {port}")
    return [port for _, port in started]


@dataclass(frozen=True)
class MinuteFigures:
    """One minute at one pool size, from the nodes' own STATS deltas."""

    lookups: int
    misses: int
    bytes: int  # in use at the minute's end, summed over the pool's nodes

    @property
    def miss_rate(self) -> float:
        return self.misses / self.lookups if self.lookups else 0.0


@dataclass
class Run:
    """Every minute of one workload at one pool size."""

    size: int
    minutes: list[MinuteFigures] = field(default_factory=list)
    bench_lookups: int = 0
    node_errors: int = 0  # node failures the pool answered as misses (should be 0)
    seconds: float = 0.0

    def miss_rate(self, warmup: int) -> float:
        """Misses / lookups over the minutes after ``warmup``."""
        minutes = self.minutes[warmup:]
        return sum(m.misses for m in minutes) / sum(m.lookups for m in minutes)


async def pool_counters(nodes: Sequence[Node]) -> tuple[int, int, int]:
    """Lookups and misses (lifetime) and bytes in use, summed over ``nodes``."""
    stats = await asyncio.gather(*(node.client.stats() for node in nodes))
    return (
        sum(int(s["lookups"]) for s in stats),
        sum(int(s["misses"]) for s in stats),
        sum(int(s["bytes"]) for s in stats),
    )


class Sampling:
    """The gateway's ``KeySampler`` feeding the manager's ``MissCurves``, a window
    a bench minute, at the rate the manager chooses, as the system does: the
    sampler starts at the curves' first rate, each minute's batch is fed with
    the rate it was taken at, and after each window the sampler takes the
    curves' rate (a gateway learns it from the answer to its next post).

    The curves judge each window at ``traffic`` lookups a second: their clock
    advances ``per_minute / traffic`` seconds a bench minute, so the budget of
    sampled lookups a second (manager.samplingrate) caps the rate as it would
    on a pool serving that much. The key stream is the same whatever the
    traffic; only the rate chosen for it changes.
    """

    def __init__(self, settings: CacheSettings, per_minute: int, traffic: float) -> None:
        self._now = 0.0
        self._seconds_per_minute = per_minute / traffic
        self.curves = MissCurves(clock=lambda: self._now)
        self.curves.follow(settings)
        # A gateway posts every few seconds, well under MAX_SAMPLES_PER_POST;
        # the bench posts once a minute, so its batch holds a whole minute.
        self.sampler = KeySampler(self.curves.rate, max_samples=per_minute)
        self.windows: list[CurveWindow] = []
        self.sampled_keys: list[int] = []  # distinct sampled keys, per window

    def close_minute(self) -> CurveWindow:
        """Post the minute's batch, close its window, and take the manager's rate."""
        batch = self.sampler.take()
        assert batch.dropped == 0, "the bench's batch holds a whole minute"
        self.curves.feed(batch.lookups, batch.samples, self.sampler.rate)
        self.sampled_keys.append(len({key for key, _ in batch.samples}))
        self._now += self._seconds_per_minute
        window = self.curves.close_window()
        self.windows.append(window)
        self.sampler.set_rate(self.curves.rate)
        return window


async def run_at_size(
    nodes: Sequence[Node],
    size: int,
    stream: Sequence[Sequence[int]],
    images: Images,
    concurrency: int,
    sampling: Sampling | None,
) -> Run:
    """The stream through a pool of the first ``size`` of ``nodes``, emptied first;
    with ``sampling``, the lookups are sampled and fed to its curves, a window a minute."""
    await asyncio.gather(*(node.client.clear() for node in nodes))
    members = nodes[:size]
    pool = CachePool(timeout=NODE_TIMEOUT)
    await pool.set_members([(f"node-{i}", node.address) for i, node in enumerate(members)])
    run = Run(size)
    started = time.perf_counter()
    before = await pool_counters(members)
    try:
        for key_ids in stream:
            pending = iter(key_ids)

            async def reader(pending: Any = pending) -> None:
                for key_id in pending:
                    key = images.names[key_id]
                    if await pool.get(key) is None:
                        owner = pool.usable_owner(key)
                        if owner is not None:
                            await owner.client.set(key.encode(), images.value(key_id))
                    if sampling is not None:
                        sampling.sampler.looked_up(key, images.sizes[key_id])

            await asyncio.gather(*(reader() for _ in range(concurrency)))
            after = await pool_counters(members)
            run.minutes.append(MinuteFigures(after[0] - before[0], after[1] - before[1], after[2]))
            before = after
            run.bench_lookups += len(key_ids)
            if sampling is not None:
                sampling.close_minute()
    finally:
        run.node_errors = pool.counters.errors
        await pool.close()
    run.seconds = time.perf_counter() - started
    return run


def unsampled_curve(
    stream: Sequence[Sequence[int]], images: Images, settings: CacheSettings, warmup: int
) -> list[float | None]:
    """The miss rates the miniature simulation gives with every lookup simulated
    (rate 1, full-size caches) over the minutes after ``warmup``: what the curve
    would say without sampling, to tell sampling error from model error."""
    curve = MissCurve(int(settings.capacity_mb * MIB), rate=1.0, policy=settings.policy)
    for minute, key_ids in enumerate(stream):
        if minute == warmup:
            curve.reset_counts()
        for key_id in key_ids:
            curve.record(images.names[key_id].encode(), images.sizes[key_id])
    return curve.predicted()


def sampled_curve(
    stream: Sequence[Sequence[int]], images: Images, sampling: Sampling, warmup: int
) -> list[float | None]:
    """The manager's curve over ``stream`` sampled as a gateway samples it, at
    the rate ``sampling``'s curves choose (no nodes: the lookups in stream
    order), over the warm windows after ``warmup`` (``predicted_curve``)."""
    for key_ids in stream:
        for key_id in key_ids:
            sampling.sampler.looked_up(images.names[key_id], images.sizes[key_id])
        sampling.close_minute()
    return predicted_curve(sampling.windows[warmup:])


def predicted_curve(windows: Sequence[CurveWindow]) -> list[float | None]:
    """Per size, the mean prediction of the warm ones of ``windows``: a window
    whose miniature caches started with it (a new rate) counts cold misses the
    pool's warm nodes do not have, and the autoscaler does not act on it."""
    warm = [window.predicted_miss for window in windows if window.warm]
    return [
        mean([p for p in known if p is not None]) if any(p is not None for p in known) else None
        for known in zip(*warm, strict=True)
    ] or [None] * len(POOL_SIZES)


def sampling_spread(
    workload: Workload, args: argparse.Namespace, settings: CacheSettings
) -> list[tuple[float, float]]:
    """The worst |sampled - unsampled| over sizes 1..8 and the rate the manager
    settled on, for ``--sampling-seeds`` other seeds of ``workload`` (other
    streams, other keys in the sample)."""
    worst = []
    total_minutes = args.warmup_minutes + args.minutes
    for seed in range(args.seed + 1, args.seed + 1 + args.sampling_seeds):
        stream = workload.minutes(total_minutes, args.lookups_per_minute, seed)
        images = Images(
            workload.universe(total_minutes), args.smallest_kb * KIB, args.largest_kb * KIB, seed
        )
        sampling = Sampling(settings, args.lookups_per_minute, args.traffic)
        sampled = sampled_curve(stream, images, sampling, args.warmup_minutes)
        exact = unsampled_curve(stream, images, settings, args.warmup_minutes)
        error = max(
            abs(p - e) if p is not None and e is not None else float("inf")
            for p, e in zip(sampled, exact, strict=True)
        )
        worst.append((error, sampling.curves.rate))
        progress(
            f"{workload.name}: seed {seed}: worst sampling error {error:.3f} "
            f"at rate {fraction(sampling.curves.rate)}"
        )
    return worst


# -- the policies, minute by minute ------------------------------------------------


@dataclass(frozen=True)
class PolicyRun:
    policy: str
    sizes: list[int]  # the pool's size in each measured minute
    miss_rates: list[float]  # measured at that size in that minute
    decisions: list[Decision]

    @property
    def resizes(self) -> int:
        return sum(1 for a, b in itertools.pairwise(self.sizes) if a != b)

    @property
    def node_minutes(self) -> int:
        return sum(self.sizes)

    @property
    def mean_miss(self) -> float:
        return sum(self.miss_rates) / len(self.miss_rates)

    def first_in_band(self, settings: CacheSettings) -> int | None:
        """The first minute whose measured miss rate is within [minMiss, maxMiss]."""
        for minute, rate in enumerate(self.miss_rates):
            if settings.min_miss <= rate <= settings.max_miss:
                return minute
        return None

    def resizes_before(self, minute: int) -> int:
        return sum(1 for a, b in itertools.pairwise(self.sizes[: minute + 1]) if a != b)

    def flaps(self, within: int) -> int:
        """Resizes reversed by the next resize within ``within`` minutes."""
        changes = [
            (minute, b - a)
            for minute, (a, b) in enumerate(itertools.pairwise(self.sizes), start=1)
            if a != b
        ]
        return sum(
            1
            for (at, step), (later, back) in itertools.pairwise(changes)
            if later - at <= within and (step > 0) != (back > 0)
        )

    def trajectory(self) -> str:
        """``1 ->2@m3 ->4@m6``: the sizes and the measured minute each began."""
        parts = [str(self.sizes[0])]
        for minute, (a, b) in enumerate(itertools.pairwise(self.sizes), start=1):
            if a != b:
                parts.append(f"{b}@m{minute}")
        return " -> ".join(parts)


def run_policy(
    policy: str,
    runs: dict[int, Run],
    curves: Sequence[CurveWindow],
    settings: CacheSettings,
    warmup: int,
) -> PolicyRun:
    """The autoscaler's judgements over the measured minutes, from 1 node, as
    ``Autoscaler.tick`` makes them (decide or decide_predictive, then stabilized)."""
    size = 1
    since_resize: float | None = None
    recent: deque[int] = deque(maxlen=STABILIZATION_JUDGEMENTS - 1)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    sizes, rates, decisions = [], [], []
    for minute in range(warmup, len(curves)):
        if since_resize is not None:
            since_resize += MINUTE_SECONDS
        figures = runs[size].minutes[minute]
        stats = MinuteStats(
            minute=start + timedelta(minutes=minute),
            workers=size,
            lookups=figures.lookups,
            hits=figures.lookups - figures.misses,
            misses=figures.misses,
            requests=figures.lookups,
            items=0,
            bytes=0 if policy == ORIGINAL else figures.bytes,
        )
        if policy in ("predictive", ORACLE):
            curve = (
                [runs[n].minutes[minute].miss_rate for n in POOL_SIZES]
                if policy == ORACLE
                else curves[minute].evidence
            )
            recommended = decide_predictive(
                size, stats, curve, settings, since_resize, DEFAULT_SETTLE_SECONDS
            )
        else:
            recommended = decide(size, stats, settings, since_resize, DEFAULT_SETTLE_SECONDS)
        decision = recommended if policy == ORIGINAL else stabilized(recommended, recent)
        recent.append(recommended.target)
        sizes.append(size)
        rates.append(figures.miss_rate)
        decisions.append(decision)
        if decision.resizes:
            size, since_resize = decision.target, 0.0
    return PolicyRun(policy, sizes, rates, decisions)


# -- output --------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def row(values: Sequence[float | None], *, signed: bool = False) -> str:
    """Figures in columns of 7, ``-`` for unknown ones."""
    spec = "+7.3f" if signed else "7.3f"
    return "".join(f"{'-':>7}" if v is None else format(v, spec) for v in values)


def flag(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def fraction(rate: float) -> str:
    """A sampling rate as the manager chooses them, a power of two: ``1/32``, ``1``."""
    return "1" if rate >= 1 else f"1/{round(1 / rate)}"


@dataclass
class WorkloadResult:
    workload: Workload
    runs: dict[int, Run]
    curves: list[CurveWindow]  # per minute
    sampled_keys: list[int]  # distinct sampled keys, per minute
    unsampled: list[float | None]  # sizes 1..8, over the measured minutes
    hot_sampled: int  # keys of the hot set in the sample at the final rate
    policies: dict[str, PolicyRun]
    # --sampling-seeds: the worst error and the rate the manager settled on, per seed
    spread: list[tuple[float, float]] = field(default_factory=list)

    def measured(self, size: int, warmup: int) -> float:
        return self.runs[size].miss_rate(warmup)

    def predicted(self, warmup: int) -> list[float | None]:
        return predicted_curve(self.curves[warmup:])

    def rates(self) -> str:
        """``1/128 -> 1 @w1``: the first and final rate, and the window (from 0,
        warm-up included) from which every window was sampled at the final one."""
        rates = [window.rate for window in self.curves]
        settled = len(rates)
        while settled > 0 and rates[settled - 1] == rates[-1]:
            settled -= 1
        if settled == 0:
            return f"{fraction(rates[0])} throughout"
        return f"{fraction(rates[0])} -> {fraction(rates[-1])} @w{settled}"

    def sampled_per_minute(self, warmup: int) -> list[int]:
        return [window.sampled_lookups for window in self.curves[warmup:]]


def print_accuracy(results: Sequence[WorkloadResult], warmup: int) -> list[float]:
    print("Miss rate over the measured minutes per pool size: predicted (the manager's miss curve")
    print(
        "fed the size-1 run's sample at the rate it chose, mean of its warm windows) against "
        f"measured (the nodes' STATS); goal |error| <= {GOAL_ERROR}."
    )
    print(
        "unsampled: the same simulation fed every lookup (no sampling error); "
        "- meas.: its error (the model's)"
    )
    print(
        "rate: the manager's first and final sampling rate, @wN: sampled at the final one from "
        "window N (from 0, warm-up included)"
    )
    print()
    header = f"{'workload':<11}{'':<11}" + "".join(f"{n:>7}" for n in POOL_SIZES)
    header += f"{'worst':>8}{'goal':>7}  flag"
    print_table_header(header)
    worst_all = []
    for result in results:
        name = result.workload.name
        predicted = result.predicted(warmup)
        measured = [result.measured(n, warmup) for n in POOL_SIZES]
        errors = [
            p - m if p is not None else float("inf")
            for p, m in zip(predicted, measured, strict=True)
        ]
        worst = max(abs(e) for e in errors)
        worst_all.append(worst)
        print(f"{name:<11}{'predicted':<11}{row(predicted)}  rate {result.rates()}")
        print(f"{'':<11}{'measured':<11}{row(measured)}")
        print(
            f"{'':<11}{'error':<11}{row(errors, signed=True)}"
            f"{worst:>8.3f}{GOAL_ERROR:>7.2f}  {flag(worst <= GOAL_ERROR)}"
        )
        print(f"{'':<11}{'unsampled':<11}{row(result.unsampled)}")
        model = [
            u - m if u is not None else None
            for u, m in zip(result.unsampled, measured, strict=True)
        ]
        print(f"{'':<11}{'  - meas.':<11}{row(model, signed=True)}")
    print()
    return worst_all


def print_spread(results: Sequence[WorkloadResult], args: argparse.Namespace) -> None:
    print(
        f"Sampling error over {args.sampling_seeds} other seeds (no nodes: the curve at the "
        "rate the manager chose against the"
    )
    print(
        "unsampled simulation, which matched the nodes above): worst |error| over sizes 1..8 "
        "per seed, and the final rates"
    )
    print()
    header = f"{'workload':<11}{'seeds':>6}{'median':>8}{'mean':>7}{'max':>7}{'<= goal':>9}  rates"
    print_table_header(header)
    for result in results:
        if not result.spread:
            continue
        spread = sorted(error for error, _ in result.spread)
        rates = sorted({rate for _, rate in result.spread}, reverse=True)
        within = sum(1 for e in spread if e <= GOAL_ERROR)
        print(
            f"{result.workload.name:<11}{len(spread):>6}{spread[len(spread) // 2]:>8.3f}"
            f"{mean(spread):>7.3f}{spread[-1]:>7.3f}{f'{within}/{len(spread)}':>9}  "
            + ", ".join(map(fraction, rates))
        )
    print()


def print_policies(
    results: Sequence[WorkloadResult], settings: CacheSettings, flap_minutes: int
) -> None:
    print(
        f"Policies from 1 node over the measured minutes: maxMiss {settings.max_miss:g}, "
        f"minMiss {settings.min_miss:g}, expRatio {settings.exp_ratio:g}, shrinkRatio "
        f"{settings.shrink_ratio:g}, settling {DEFAULT_SETTLE_SECONDS:g} s, shrink window "
        f"{STABILIZATION_JUDGEMENTS} judgements"
    )
    print(
        "Each minute judged on the figures measured in that minute at the size the pool had "
        "(derived from the runs at every size, not a live resize)"
    )
    print()
    header = (
        f"{'workload':<11}{'policy':<12}{'resizes':>8}{'in band':>8}{'flaps':>6}{'goal':>5}"
        f"{'flag':>6}{'node-min':>9}{'mean miss':>10}  sizes (from minute)"
    )
    print_table_header(header)
    for result in results:
        steady = result.workload.steady
        for policy in (*POLICIES, ORACLE, ORIGINAL) if steady else (*POLICIES, ORACLE):
            run = result.policies[policy]
            in_band = run.first_in_band(settings)
            to_band = "never" if in_band is None else str(run.resizes_before(in_band))
            at = "-" if in_band is None else f"m{in_band}"
            flaps = run.flaps(flap_minutes)
            judged = steady and policy in POLICIES
            goal = str(GOAL_FLAPS) if judged else "-"
            verdict = flag(flaps <= GOAL_FLAPS) if judged else ""
            print(
                f"{result.workload.name:<11}{policy:<12}{to_band:>8}{at:>8}{flaps:>6}{goal:>5}"
                f"{verdict:>6}{run.node_minutes:>9}{run.mean_miss:>10.3f}  {run.trajectory()}"
            )
    print()
    print(
        "Node-minutes, predictive against ratio (below 1: predictive used fewer nodes), "
        "and the oracle's"
    )
    print()
    header = (
        f"{'workload':<11}{'ratio':>9}{'predictive':>11}{'pred/ratio':>11}{'oracle':>8}"
        f"{'orac/ratio':>11}{'miss ratio':>11}{'miss pred':>10}{'miss orac':>10}"
    )
    print_table_header(header)
    for result in results:
        ratio, predictive = result.policies["ratio"], result.policies["predictive"]
        oracle = result.policies[ORACLE]
        print(
            f"{result.workload.name:<11}{ratio.node_minutes:>9}{predictive.node_minutes:>11}"
            f"{predictive.node_minutes / ratio.node_minutes:>11.2f}{oracle.node_minutes:>8}"
            f"{oracle.node_minutes / ratio.node_minutes:>11.2f}"
            f"{ratio.mean_miss:>11.3f}{predictive.mean_miss:>10.3f}{oracle.mean_miss:>10.3f}"
        )
    print()


def print_checks(results: Sequence[WorkloadResult], warmup: int) -> None:
    print("Checks: every lookup the bench made was counted by a node, and no node failed;")
    print(
        "the manager's sampling rate, the distinct keys and the lookups the curve sampled a "
        "minute, and the minutes"
    )
    print(
        f"with warm miniature caches and the {MIN_SAMPLED_LOOKUPS} sampled lookups that "
        "predictive scaling needs to trust it (CurveWindow.evidence)"
    )
    print()
    for result in results:
        counted = sum(sum(m.lookups for m in run.minutes) for run in result.runs.values())
        made = sum(run.bench_lookups for run in result.runs.values())
        errors = sum(run.node_errors for run in result.runs.values())
        seconds = sum(run.seconds for run in result.runs.values())
        print(
            f"{result.workload.name:<11}lookups counted {counted:,} of {made:,} "
            f"{'(equal)' if counted == made else '(NOT EQUAL: another client used the nodes)'}"
            "; node errors "
            f"{errors}; {made / seconds:,.0f} lookups/s"
        )
        sampled = result.sampled_per_minute(warmup)
        keys = result.sampled_keys[warmup:]
        measured = result.curves[warmup:]
        warm = sum(1 for window in measured if window.warm)
        trusted = sum(1 for window in measured if window.evidence is not None)
        print(
            f"{'':<11}rate {result.rates()}; sampled keys in the hot set "
            f"{result.hot_sampled:,}; distinct sampled keys a minute {min(keys):,}-{max(keys):,}"
        )
        print(
            f"{'':<11}sampled lookups a minute {min(sampled):,}-{max(sampled):,}; warm in "
            f"{warm}, trusted in {trusted} of {len(sampled)} minutes"
        )
    print()


# -- main ------------------------------------------------------------------------------


async def benchmark(args: argparse.Namespace, ports: Sequence[int]) -> list[WorkloadResult]:
    settings = CacheSettings(
        capacity_mb=args.capacity_mb,
        policy=args.policy,
        mode=Mode.AUTO,
        max_miss=args.max_miss,
        min_miss=args.min_miss,
    ).validate()
    total_minutes = args.warmup_minutes + args.minutes
    chosen = workloads(args)
    universe = max(w.universe(total_minutes) for w in chosen)
    images = Images(universe, args.smallest_kb * KIB, args.largest_kb * KIB, args.seed)
    nodes = [Node(port, NodeClient(HOST, port, timeout=NODE_TIMEOUT)) for port in ports]
    results = []
    try:
        for workload in chosen:
            stream = workload.minutes(total_minutes, args.lookups_per_minute, args.seed)
            sampling = Sampling(settings, args.lookups_per_minute, args.traffic)
            runs: dict[int, Run] = {}
            for size in POOL_SIZES:
                run = await run_at_size(
                    nodes,
                    size,
                    stream,
                    images,
                    args.concurrency,
                    sampling if size == 1 else None,
                )
                runs[size] = run
                progress(
                    f"{workload.name}: {size} node(s): measured miss rate "
                    f"{run.miss_rate(args.warmup_minutes):.3f} in {run.seconds:.1f} s; "
                    f"lookups counted {sum(m.lookups for m in run.minutes):,} of "
                    f"{run.bench_lookups:,}"
                )
            windows = sampling.windows
            threshold = sampling_threshold(sampling.curves.rate)
            result = WorkloadResult(
                workload,
                runs,
                windows,
                sampling.sampled_keys,
                unsampled_curve(stream, images, settings, args.warmup_minutes),
                images.sampled_share(range(workload.hot_keys), threshold),
                {
                    policy: run_policy(policy, runs, windows, settings, args.warmup_minutes)
                    for policy in (*POLICIES, ORACLE, ORIGINAL)
                },
            )
            if args.sampling_seeds and workload.steady:
                result.spread = sampling_spread(workload, args, settings)
            results.append(result)
    finally:
        for node in nodes:
            await node.client.close()
    return results


def print_header(args: argparse.Namespace) -> None:
    per_node = items_per_node(args)
    print(f"bench/autoscale.py, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, on {machine()}")
    print(
        f"Nodes: 8 x imagecache node --capacity-mb {args.capacity_mb:g} --policy {args.policy} "
        f"(about {per_node:,.0f} items each); values {args.smallest_kb}-{args.largest_kb} KB "
        f"uniform per key, counted as key + value + {ITEM_OVERHEAD} bytes"
    )
    print(
        f"A minute = {args.lookups_per_minute:,} lookups ({args.concurrency} readers); "
        f"{args.warmup_minutes} warm-up minutes, then {args.minutes} measured, at every size 1..8;"
        f" seed {args.seed}"
    )
    print(
        f"Traffic {args.traffic:,.0f} lookups/s (a bench minute is "
        f"{args.lookups_per_minute / args.traffic:.3g} s of the simulated pool's): the manager "
        f"samples toward {TARGET_SAMPLED_KEYS:,} distinct keys a window, within "
        f"{MAX_SAMPLED_PER_SECOND:,} sampled lookups/s"
    )
    print()


def parse_skews(text: str) -> list[float]:
    skews = [float(part) for part in text.split(",") if part.strip()]
    if not skews or any(not 0 <= s <= 3 for s in skews):
        raise argparse.ArgumentTypeError(f"skews are numbers from 0 to 3, not {text!r}")
    return skews


QUICK: Final = {
    "skews": [0.9],
    "keys": 100_000,
    "capacity_mb": 4.0,
    "lookups_per_minute": 5_000,
    "warmup_minutes": 4,
    "minutes": 8,
    "drift_keys": 200,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run (under a minute): "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--skews", type=parse_skews, default=[0.6, 0.9, 1.2], help="Zipf skews")
    parser.add_argument("--keys", type=int, default=200_000, help="keys in the hot set")
    parser.add_argument(
        "--drift-keys", type=int, default=500, help="drift: new keys a minute (0: no drift)"
    )
    parser.add_argument(
        "--no-fits", dest="fits", action="store_false", help="leave out the fits workload"
    )
    parser.add_argument("--capacity-mb", type=float, default=8.0, help="node capacity")
    parser.add_argument("--policy", choices=("lru", "random"), default="lru")
    parser.add_argument("--smallest-kb", type=int, default=1, help="smallest value")
    parser.add_argument("--largest-kb", type=int, default=8, help="largest value")
    parser.add_argument("--lookups-per-minute", type=int, default=12_000)
    parser.add_argument(
        "--traffic",
        type=float,
        default=None,
        metavar="PER_SECOND",
        help="lookups a second of the simulated pool, which the manager's sampling rate "
        "answers to (default: lookups-per-minute / 60, a bench minute is a minute)",
    )
    parser.add_argument("--warmup-minutes", type=int, default=5)
    parser.add_argument("--minutes", type=int, default=15, help="measured minutes")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent readers")
    parser.add_argument("--max-miss", type=float, default=DEFAULTS.max_miss)
    parser.add_argument("--min-miss", type=float, default=DEFAULTS.min_miss)
    parser.add_argument(
        "--flap-minutes", type=int, default=10, help="a resize reversed within this is a flap"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--sampling-seeds",
        type=int,
        default=0,
        metavar="N",
        help="also measure the sampling error offline on N other seeds of each steady workload",
    )
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if min(args.keys, args.lookups_per_minute, args.minutes, args.concurrency) < 1 or not (
        0 < args.smallest_kb <= args.largest_kb
    ):
        parser.error("--keys, --lookups-per-minute, --minutes, --concurrency must be positive")
    if args.traffic is None:
        args.traffic = args.lookups_per_minute / MINUTE_SECONDS
    if not args.traffic > 0:
        parser.error("--traffic must be positive")

    children = Children(pin=False)
    outcome: list[list[WorkloadResult]] = []  # what work() measured, printed after the cleanup

    def work(directory: Path) -> int:
        with open(directory / "nodes.log", "wb") as log:
            ports = start_nodes(children, max(POOL_SIZES), args.capacity_mb, args.policy, log)
            progress(f"8 nodes on ports {', '.join(map(str, ports))}")
            outcome.append(run_on_uvloop(benchmark(args, ports)))
        return 0

    status = run_guarded(
        work,
        prefix="bench-autoscale-",
        cleanup=children.close,
        stopped="every node stopped",
        on_failure=lambda directory: show_log_tails(directory, "nodes.log"),
    )
    if status:
        return status
    (results,) = outcome
    print_header(args)
    print_checks(results, args.warmup_minutes)
    print_accuracy(results, args.warmup_minutes)
    if args.sampling_seeds:
        print_spread(results, args)
    settings = CacheSettings(max_miss=args.max_miss, min_miss=args.min_miss)
    print_policies(results, settings, args.flap_minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
