"""Benchmark image reads while the manager is flooded with wrong passwords.

Starts ``imagecache up --workers 1`` (the gateway then runs on the manager's
event loop, in one process) in a temporary folder on free loopback ports,
uploads one random-noise PNG, and reads it back (``GET /image/<key>``) at a
steady pace from ``--readers`` clients: first for ``--seconds`` with nothing
else going on (idle), then for as long while ``--flooders`` clients post
wrong passwords to the manager's ``POST /login`` back to back (flood).

By default every flood request comes from a loopback address of its own
(127.1.0.1 and up), so the per-address throttle of wrong passwords does not
turn them away: each one is hashed, as in a flood from many machines.
``--one-address`` floods from 127.0.0.1 alone, which the throttle stops
after a few tries.

Prints, for both phases, the reads and their median, p99 and worst latency,
the logins answered by status during the flood, and the goal: a median read
latency during the flood within ``--goal-ratio`` (2) times the idle one, with
PASS or FAIL (exit status 0 or 1). Every process started here is stopped on
the way out, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import uvloop

from benchkit import (
    HOST,
    Up,
    UpSlot,
    noise_png,
    progress,
    run_guarded,
    verdict,
)

IMAGE_KEY: Final = "flood-probe"
IMAGE_WIDTH: Final = 100  # pixels, as bench/resize.py's
READ_TIMEOUT: Final = 10.0  # seconds; a slower read counts as an error
LOGIN_TIMEOUT: Final = 30.0
WARM_UP_SECONDS: Final = 1.0  # reads before each measured phase, not counted


@dataclass
class Phase:
    """The reads of one phase: latencies in seconds, and the errors."""

    name: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def percentile(self, share: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    @property
    def median(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")


async def upload(http: aiohttp.ClientSession, up: Up, data: bytes) -> None:
    form = aiohttp.FormData()
    form.add_field("key", IMAGE_KEY)
    form.add_field("file", data, filename=f"{IMAGE_KEY}.png", content_type="image/png")
    async with http.post(f"{up.gateway}/api/upload", data=form) as reply:
        text = await reply.text()
        if reply.status != 200:
            raise RuntimeError(f"the upload answered {reply.status}: {text}")


async def read_steadily(
    http: aiohttp.ClientSession, up: Up, interval: float, until: float, phase: Phase | None
) -> None:
    """One reader: a read every ``interval`` seconds (or back to back when late)."""
    url = f"{up.gateway}/image/{IMAGE_KEY}"
    loop = asyncio.get_running_loop()
    next_read = loop.time()
    while next_read < until:
        await asyncio.sleep(max(0.0, next_read - loop.time()))
        started = time.perf_counter()
        try:
            async with http.get(url) as reply:
                await reply.read()
                status = reply.status
        except (aiohttp.ClientError, TimeoutError) as error:
            if phase is not None:
                phase.errors.append(f"{type(error).__name__}: {error}")
        else:
            if phase is not None:
                if status == 200:
                    phase.latencies.append(time.perf_counter() - started)
                else:
                    phase.errors.append(f"status {status}")
        next_read = max(next_read + interval, loop.time())


async def measure(
    http: aiohttp.ClientSession, up: Up, name: str, args: argparse.Namespace
) -> Phase:
    """``args.readers`` readers for a warm-up, then ``args.seconds`` measured."""
    interval = args.readers / args.rate
    loop = asyncio.get_running_loop()
    warm_until = loop.time() + WARM_UP_SECONDS
    await asyncio.gather(
        *(read_steadily(http, up, interval, warm_until, None) for _ in range(args.readers))
    )
    phase = Phase(name)
    until = loop.time() + args.seconds
    await asyncio.gather(
        *(read_steadily(http, up, interval, until, phase) for _ in range(args.readers))
    )
    return phase


def flood_addresses() -> Iterator[str]:
    """A fresh loopback address for each flood request, shared by all flooders:
    127.1.0.1, 127.1.0.2 ... 127.1.0.254, 127.1.1.1 ..."""
    for number in itertools.count():
        yield f"127.{1 + number // (256 * 254) % 254}.{number // 254 % 256}.{1 + number % 254}"


async def flood(
    up: Up,
    addresses: Iterator[str] | None,
    answers: collections.Counter[str],
    stop: asyncio.Event,
) -> None:
    """One flooder: wrong passwords to the manager, back to back, until ``stop``.

    Each request comes on a new connection from the next of ``addresses``;
    without them, all come from 127.0.0.1 on one connection kept open.
    """
    timeout = aiohttp.ClientTimeout(total=LOGIN_TIMEOUT)
    if addresses is None:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not stop.is_set():
                await post_wrong_password(http, up, answers)
        return
    while not stop.is_set():
        connector = aiohttp.TCPConnector(local_addr=(next(addresses), 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            await post_wrong_password(http, up, answers)


async def post_wrong_password(
    http: aiohttp.ClientSession, up: Up, answers: collections.Counter[str]
) -> None:
    try:
        async with http.post(
            f"http://{HOST}:{up.manager_port}/login",
            data={"password": "not the password", "next": "/config"},
            allow_redirects=False,
        ) as reply:
            await reply.read()
            answers[str(reply.status)] += 1
    except (aiohttp.ClientError, TimeoutError) as error:
        answers[type(error).__name__] += 1


async def benchmark(up: Up, args: argparse.Namespace) -> bool:
    timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=args.readers + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await upload(http, up, noise_png(args.size_kb * 1024, 1, IMAGE_WIDTH)[0])
        progress(f"reading {IMAGE_KEY} idle for {args.seconds:g} s")
        idle = await measure(http, up, "idle", args)
        progress(f"reading it again during a flood of {args.flooders} clients")
        stop = asyncio.Event()
        answers: collections.Counter[str] = collections.Counter()
        addresses = None if args.one_address else flood_addresses()
        flood_started = time.perf_counter()
        flooders = [
            asyncio.create_task(flood(up, addresses, answers, stop)) for _ in range(args.flooders)
        ]
        try:
            flooded = await measure(http, up, "flood", args)
        finally:
            stop.set()
            await asyncio.gather(*flooders, return_exceptions=True)
        flood_seconds = time.perf_counter() - flood_started
    return print_results(args, idle, flooded, answers, flood_seconds)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def print_results(
    args: argparse.Namespace,
    idle: Phase,
    flooded: Phase,
    answers: collections.Counter[str],
    flood_seconds: float,
) -> bool:
    source = "127.0.0.1" if args.one_address else "a fresh loopback address per request"
    print(
        f"image reads: {args.readers} readers, {args.rate:g} reads/s in all, "
        f"{args.size_kb} KB PNG, {args.seconds:g} s a phase; flood: {args.flooders} clients "
        f"posting wrong passwords back to back from {source}"
    )
    print(f"{'phase':<6} {'reads':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for phase in (idle, flooded):
        worst = max(phase.latencies, default=float("nan"))
        print(
            f"{phase.name:<6} {len(phase.latencies):>6} {len(phase.errors):>6} "
            f"{_ms(phase.median):>8} {_ms(phase.percentile(0.99)):>8} {_ms(worst):>8}"
        )
    logins = sum(answers.values())
    by_status = ", ".join(f"{status}: {count}" for status, count in sorted(answers.items()))
    print(
        f"logins answered during the flood: {logins} in {flood_seconds:.1f} s "
        f"({logins / flood_seconds:.1f}/s); by status: {by_status or 'none'}"
    )
    for phase in (idle, flooded):
        for error in sorted(set(phase.errors))[:5]:
            print(f"  {phase.name} read error: {error}")
    ratio = flooded.median / idle.median if idle.latencies and flooded.latencies else float("nan")
    passed = ratio <= args.goal_ratio and not idle.errors and not flooded.errors
    print(
        f"goal: median read during the flood within {args.goal_ratio:g}x of idle, no read "
        f"error: {ratio:.2f}x ({_ms(flooded.median)} ms against {_ms(idle.median)} ms) "
        f"{verdict(passed)}"
    )
    return passed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase (10)")
    parser.add_argument("--readers", type=int, default=4, help="concurrent readers (4)")
    parser.add_argument("--rate", type=float, default=200.0, help="reads/s of all readers (200)")
    parser.add_argument("--size-kb", type=int, default=20, help="size of the image, about (20)")
    parser.add_argument("--flooders", type=int, default=4, help="flooding clients (4)")
    parser.add_argument(
        "--one-address", action="store_true", help="flood from 127.0.0.1 only (the throttle's case)"
    )
    parser.add_argument("--goal-ratio", type=float, default=2.0, help="flood/idle median (2)")
    parser.add_argument("--log-level", default="WARNING", help="imagecache up's --log-level")
    args = parser.parse_args(argv)
    if min(args.readers, args.flooders, args.size_kb) < 1 or args.rate <= 0:
        parser.error("--readers, --flooders, --size-kb and --rate must be positive")
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")

    slot = UpSlot()

    def work(directory: Path) -> int:
        up = slot.start(directory, args.log_level, workers=1)
        progress(
            f"imagecache up (pid {up.process.pid}): gateway on port {up.gateway_port}, "
            f"manager on {up.manager_port}"
        )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            passed = runner.run(benchmark(up, args))
        return 0 if passed else 1

    return run_guarded(
        work,
        prefix="bench-login-flood-",
        cleanup=slot.stop,
        stopped="every process stopped",
        on_failure=slot.show_output,
    )


if __name__ == "__main__":
    sys.exit(main())
