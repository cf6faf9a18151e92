"""A cache node's memory against clients that send half of a large SET and go.

Starts ``imagecache node`` (capacity 64 MB, maximum item 16 MiB: the defaults)
on a free loopback port. Then, for each round, opens 80 connections that each
send the binary header of a SET of 16 MiB and 15 MiB of its value, and closes
them all. It prints the node's resident memory (VmRSS) before, while the
connections hold their partial values, right after they close and 5 s later,
and its peak (VmHWM), beside the goals: at most capacity + 100 MB at any time,
and back within 10 MB of where it started 5 s after the connections close.

Every process started here is stopped on the way out, also on an error,
Ctrl-C or SIGTERM (and, through PR_SET_PDEATHSIG, if this process is killed).
Run it against another copy of the code with PYTHONPATH=that/src.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from benchkit import (
    HOST,
    MIB,
    Children,
    free_port,
    node_argv,
    print_table_header,
    run_guarded,
    verdict,
    wait_until_listening,
)
from cachenode.protocol import MAGIC_REQUEST, Opcode, encode_header

SETTLE_SECONDS: Final = 5.0
# "Freed": back within this much of the RSS before the round.
FREED_SLACK_MB: Final = 10.0
HEADROOM_MB: Final = 100.0  # the goal: at most capacity + this


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


async def half_sent_sets(
    pid: int, port: int, connections: int, value_mb: int, sent_mb: int
) -> float:
    """Open ``connections`` connections, send on each a SET header for
    ``value_mb`` MiB and ``sent_mb`` MiB of the value, then close them all;
    the node's (``pid``) RSS while they were open, all sent."""
    chunk = memoryview(bytes(MIB))
    writers: list[asyncio.StreamWriter] = []

    async def send(index: int) -> None:
        _, writer = await asyncio.open_connection(HOST, port)
        writers.append(writer)
        writer.write(
            encode_header(MAGIC_REQUEST, Opcode.SET, index, b"half-%d" % index, value_mb * MIB)
        )
        for _ in range(sent_mb):
            writer.write(chunk)
            await writer.drain()

    try:
        await asyncio.gather(*(send(index) for index in range(connections)))
        # What the kernel still buffers reaches the node in a moment.
        await asyncio.sleep(0.5)
        return rss_mb(pid)
    finally:
        for writer in writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


def start_node(
    children: Children, capacity_mb: int, max_item_mb: int, log: Path
) -> tuple[int, int]:
    """The node's pid and port."""
    port = free_port()
    argv = node_argv(
        port,
        capacity_mb,
        "--max-item-mb",
        str(max_item_mb),
        log_level="ERROR",  # not a line per refused SET
    )
    with open(log, "wb") as output:
        process = children.start(argv, core=0, stdout=subprocess.DEVNULL, stderr=output)
    wait_until_listening(process, port, "the node", timeout=15)
    return process.pid, port


def measure(args: argparse.Namespace, children: Children, workdir: Path) -> bool:
    pid, port = start_node(children, args.capacity_mb, args.max_item_mb, workdir / "node.log")
    goal_mb = args.capacity_mb + HEADROOM_MB
    print(
        f"node: capacity {args.capacity_mb} MB, max item {args.max_item_mb} MiB; each round "
        f"{args.connections} connections send a SET header of {args.value_mb} MiB and "
        f"{args.sent_mb} MiB of its value, then close"
    )
    header = (
        f"{'':<34}{'VmRSS MB':>9}  goals: <= {args.capacity_mb} + {HEADROOM_MB:.0f}"
        f" = {goal_mb:.0f} MB; {SETTLE_SECONDS:.0f} s after: <= before + {FREED_SLACK_MB:.0f}"
    )
    print_table_header(header)
    before = rss_mb(pid)
    print(f"{'before':<34}{before:>9.1f}")
    passed = True
    for round_number in range(1, args.rounds + 1):
        started = time.perf_counter()
        held = asyncio.run(half_sent_sets(pid, port, args.connections, args.value_mb, args.sent_mb))
        sending = time.perf_counter() - started
        right_after = rss_mb(pid)
        time.sleep(SETTLE_SECONDS)
        later = rss_mb(pid)
        peak = rss_mb(pid, "VmHWM")
        bounded, freed = peak <= goal_mb, later <= before + FREED_SLACK_MB
        passed = passed and bounded and freed
        rows = [
            ("peak so far (VmHWM)", peak, verdict(bounded)),
            ("all sent, held", held, ""),
            (f"closed ({sending:.1f} s in)", right_after, ""),
            (f"{SETTLE_SECONDS:.0f} s after", later, verdict(freed)),
        ]
        for label, value, judged in rows:
            print(f"{f'round {round_number}: {label}':<34}{value:>9.1f}  {judged}".rstrip())
    return passed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capacity-mb", type=int, default=64, help="the node's capacity")
    parser.add_argument("--max-item-mb", type=int, default=16, help="the node's maximum item")
    parser.add_argument("--connections", type=int, default=80, help="hostile connections per round")
    parser.add_argument("--value-mb", type=int, default=16, help="the value size each announces")
    parser.add_argument("--sent-mb", type=int, default=15, help="how much of it each sends")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of connections")
    args = parser.parse_args(argv)
    if (
        min(args.connections, args.value_mb, args.rounds) < 1
        or not 0 < args.sent_mb < args.value_mb
    ):
        parser.error("--sent-mb must be positive and below --value-mb")
    children = Children(pin=False)
    return run_guarded(
        lambda directory: 0 if measure(args, children, directory) else 1,
        prefix="bench-node-memory-",
        cleanup=children.close,
        stopped="the node stopped",
    )


if __name__ == "__main__":
    sys.exit(main())
