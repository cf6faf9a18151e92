"""Benchmark one cache node against memcached on this machine (see bench/README.md).

Default mode: starts ``imagecache node`` and ``memcached -t 1`` on free loopback
ports, pins both servers to core 0 and this load generator to core 1, and
drives them in turn (memcached, node, node, memcached, node, node, ...) with
the same pipelined asyncio (uvloop) load generator: memcached's text protocol
against both, then the node's binary protocol. For every (system, protocol,
op, size) it prints throughput, p50/p99 latency, the server's CPU seconds per
1,000 operations, and the node/memcached ratios beside the goals. For small
values it also runs Debian's C load generator ``memcaslap`` against both,
because a Python generator saturates before either server does.

``--memory``: fills a 256 MB node with 100 KB values well beyond its capacity
over the binary protocol and compares its resident memory with the goal
(at most 1.10 x capacity + 40 MB).

Every process started here is stopped on the way out, also on an error,
Ctrl-C or SIGTERM (and, through PR_SET_PDEATHSIG, if this process is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Final, cast

from benchkit import (
    HOST,
    KIB,
    MEMCACHED_INSTALL_HINT,
    MIB,
    NODE_READY,
    Children,
    Server,
    cpu_seconds,
    machine_cpu,
    memcached_binary,
    node_argv,
    parse_size,
    pin_load_generator,
    print_table_header,
    progress,
    ratio_of,
    read_ready_line,
    run_guarded,
    run_on_uvloop,
    show_log_tails,
    start_memcached,
    verdict,
    wait_until_listening,
)
from cachenode.client import NodeClient
from cachenode.protocol import HEADER, HEADER_SIZE, MAGIC_REQUEST, MAGIC_RESPONSE, Opcode
from cachenode.status import Status

SERVER_CORE: Final = 0
CLIENT_CORE: Final = 1
CRLF: Final = b"\r\n"
# Values up to this size are sent in one buffer with their request line or
# header; bigger ones go out as separate buffers so they are never copied.
COALESCE_LIMIT: Final = 16 * KIB
RECEIVE_BUFFER: Final = 256 * KIB
MAX_LINE: Final = 4096
WARMUP_SECONDS: Final = 0.3
DRAIN_TIMEOUT: Final = 30.0
# memaslap's op mix and key length (its keys are at least 16 bytes).
MEMASLAP_GET_SHARE: Final = 0.9
MEMASLAP_KEY_LENGTH: Final = 32
# Goals from the issue: the node's GET throughput at least this share of
# memcached's at every size, its CPU per op at most this multiple from this size up.
GOAL_THROUGHPUT: Final = 0.8
GOAL_CPU: Final = 2.0
GOAL_CPU_FROM_SIZE: Final = 100 * KIB


class Op(Enum):
    GET = "GET"
    SET = "SET"


class Proto(Enum):
    TEXT = "text"
    BINARY = "binary"


# -- child processes -----------------------------------------------------------


def _memaslap_binary() -> str | None:
    return shutil.which("memcaslap") or shutil.which("memaslap")


def start_node(children: Children, capacity_mb: int, max_item_mb: int, log: IO[bytes]) -> Server:
    argv = node_argv(0, capacity_mb, "--max-item-mb", str(max_item_mb), "--policy", "lru")
    process = children.start(argv, core=SERVER_CORE, stdout=subprocess.PIPE, stderr=log)
    match = read_ready_line(process, NODE_READY, "the node", timeout=15)
    port = int(match.group(1))
    wait_until_listening(process, port, "the node", timeout=10)
    return Server("node", port, process.pid)


# -- /proc ----------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and friends of a process, in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name.startswith("Vm") or name.startswith("Rss"):
                values[name] = int(rest.split()[0])
    return values


# -- the load generator ---------------------------------------------------------


@dataclass
class Tally:
    """What the connections of one measurement share."""

    measuring: bool = False
    stopping: bool = False
    ops: int = 0
    misses: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = message


@dataclass(frozen=True)
class Workload:
    """The keys, value and operation one measurement sends, prepared once."""

    op: Op
    keys: list[bytes]
    value: bytes
    # Text protocol: the whole request per key for GET and small SETs, else the
    # request line ("set k 0 0 n\r\n") to send before the value and its CRLF.
    text_requests: list[bytes]

    @classmethod
    def make(cls, op: Op, keys: list[bytes], value: bytes) -> Workload:
        if op is Op.GET:
            requests = [b"get %s\r\n" % key for key in keys]
        elif len(value) <= COALESCE_LIMIT:
            requests = [b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value) for key in keys]
        else:
            requests = [b"set %s 0 0 %d\r\n" % (key, len(value)) for key in keys]
        return cls(op, keys, value, requests)


_OK, _MISS, _ERROR = 0, 1, 2


class LoadConnection(asyncio.BufferedProtocol):
    """One connection keeping ``depth`` requests in flight until told to stop.

    Subclasses send one request (``_send``) and parse replies out of a fixed
    receive buffer (``buffer_updated``): values are skipped by byte count, never
    copied or searched, so big values cost the generator little.
    """

    def __init__(
        self,
        workload: Workload,
        tally: Tally,
        depth: int,
        first_key: int,
        limit: int | None = None,
    ) -> None:
        self._workload = workload
        self._tally = tally
        self._depth = depth
        self._key_index = first_key % len(workload.keys)
        self._sends_left = limit  # None: until the tally says stop
        self._sent: deque[float] = deque()
        self._buffer = bytearray(RECEIVE_BUFFER)
        self._view = memoryview(self._buffer)
        self._skip = 0  # bytes of the current reply's body still to pass over
        self._skip_outcome = _OK
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def in_flight(self) -> int:
        return len(self._sent)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        for _ in range(self._depth):
            self._send_next()

    def close(self) -> None:
        if not self.done.done():
            self.done.cancel()  # nobody waits for it any more
        if self.transport is not None:
            self.transport.close()

    def _next_key(self) -> int:
        index = self._key_index
        self._key_index = index + 1 if index + 1 < len(self._workload.keys) else 0
        return index

    def _send_next(self) -> None:
        if self._sends_left is not None:
            if self._sends_left <= 0:
                return
            self._sends_left -= 1
        self._sent.append(time.perf_counter())
        self._send(self._next_key())

    def _send(self, index: int) -> None:
        raise NotImplementedError

    def _complete(self, outcome: int, detail: str = "") -> None:
        now = time.perf_counter()
        sent = self._sent.popleft()
        tally = self._tally
        if tally.measuring:
            tally.ops += 1
            tally.latencies.append(now - sent)
            if outcome == _MISS:
                tally.misses += 1
            elif outcome == _ERROR:
                tally.error(detail)
        if tally.stopping or self._sends_left == 0:
            if not self._sent and not self.done.done():
                self.done.set_result(None)
        else:
            self._send_next()

    def _fail(self, message: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(message))
        self.close()


class TextConnection(LoadConnection):
    """memcached's text protocol: ``get k`` or ``set k 0 0 n``, one key a request."""

    def __init__(
        self,
        workload: Workload,
        tally: Tally,
        depth: int,
        first_key: int,
        limit: int | None = None,
    ) -> None:
        super().__init__(workload, tally, depth, first_key, limit)
        self._partial = bytearray()  # a reply line split across reads

    def _send(self, index: int) -> None:
        transport = self.transport
        assert transport is not None
        workload = self._workload
        request = workload.text_requests[index]
        if workload.op is Op.GET or len(workload.value) <= COALESCE_LIMIT:
            transport.write(request)
        else:
            transport.writelines((request, workload.value, CRLF))

    def buffer_updated(self, nbytes: int) -> None:
        data = self._buffer
        pos = 0
        while pos < nbytes:
            skip = self._skip
            if skip:
                available = nbytes - pos
                if skip > available:
                    self._skip = skip - available
                    return
                pos += skip
                self._skip = 0
                self._complete(self._skip_outcome, "value of unexpected length")
                continue
            newline = data.find(b"\n", pos, nbytes)
            if newline < 0:
                self._partial += self._view[pos:nbytes]
                if len(self._partial) > MAX_LINE:
                    self._fail("reply line too long")
                return
            if self._partial:
                self._partial += self._view[pos : newline + 1]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = bytes(self._view[pos : newline + 1])
            pos = newline + 1
            self._reply_line(line)

    def _reply_line(self, line: bytes) -> None:
        if line.startswith(b"VALUE "):
            # VALUE <key> <flags> <bytes>\r\n, then the data, CRLF and END\r\n.
            length = int(line.split()[3])
            self._skip = length + len(CRLF) + len(b"END\r\n")
            expected = self._workload.op is Op.GET and length == len(self._workload.value)
            self._skip_outcome = _OK if expected else _ERROR
        elif line == b"STORED\r\n":
            self._complete(_OK)
        elif line == b"END\r\n":
            self._complete(_MISS)
        else:
            self._complete(_ERROR, line.decode("utf-8", "replace").strip())


class BinaryConnection(LoadConnection):
    """The node's binary protocol: 28-byte headers, replies in request order."""

    def __init__(
        self,
        workload: Workload,
        tally: Tally,
        depth: int,
        first_key: int,
        limit: int | None = None,
    ) -> None:
        super().__init__(workload, tally, depth, first_key, limit)
        self._opcode = Opcode.GET if workload.op is Op.GET else Opcode.SET
        self._next_id = 1
        self._expected_id = 1
        self._header = bytearray()  # a reply header split across reads

    def _send(self, index: int) -> None:
        transport = self.transport
        assert transport is not None
        key = self._workload.keys[index]
        request_id = self._next_id
        self._next_id = request_id + 1 if request_id < 0xFFFFFFFF else 1
        if self._opcode == Opcode.GET:
            transport.write(
                HEADER.pack(MAGIC_REQUEST, Opcode.GET, 0, len(key), 0, 0, request_id, 0, 0) + key
            )
            return
        value = self._workload.value
        header = (
            HEADER.pack(MAGIC_REQUEST, Opcode.SET, 0, len(key), 0, len(value), request_id, 0, 0)
            + key
        )
        if len(value) <= COALESCE_LIMIT:
            transport.write(header + value)
        else:
            transport.writelines((header, value))

    def buffer_updated(self, nbytes: int) -> None:
        data = self._buffer
        pos = 0
        while pos < nbytes:
            skip = self._skip
            if skip:
                available = nbytes - pos
                if skip > available:
                    self._skip = skip - available
                    return
                pos += skip
                self._skip = 0
                self._complete(self._skip_outcome, "error reply")
                continue
            if self._header or nbytes - pos < HEADER_SIZE:
                take = min(HEADER_SIZE - len(self._header), nbytes - pos)
                self._header += self._view[pos : pos + take]
                pos += take
                if len(self._header) < HEADER_SIZE:
                    return
                fields = HEADER.unpack(self._header)
                self._header.clear()
            else:
                fields = HEADER.unpack_from(data, pos)
                pos += HEADER_SIZE
            magic, _, status, key_length, _, value_length, request_id, _, _ = fields
            if magic != MAGIC_RESPONSE:
                self._fail(f"bad magic byte 0x{magic:02x} in a reply")
                return
            if request_id != self._expected_id:
                self._fail(f"reply for request {request_id}, expected {self._expected_id}")
                return
            self._expected_id = request_id + 1 if request_id < 0xFFFFFFFF else 1
            if status == Status.OK:
                if self._opcode == Opcode.GET and value_length != len(self._workload.value):
                    outcome = _ERROR
                else:
                    outcome = _OK
            elif status == Status.NOT_FOUND:
                outcome = _MISS
            else:
                outcome = _ERROR
            body = key_length + value_length
            if body:
                self._skip = body
                self._skip_outcome = outcome
            else:
                self._complete(outcome, f"status {status}")


@dataclass
class Sample:
    """One measured window."""

    ops: int
    seconds: float
    server_cpu: float
    generator_cpu: float
    misses: int
    errors: int
    first_error: str
    latencies: list[float]
    # CPU the rest of the machine took meanwhile (other processes), and what
    # the hypervisor stole, in cores: a disturbed window shows here.
    other_cores: float
    steal_cores: float


async def _connect(
    port: int,
    proto: Proto,
    workload: Workload,
    tally: Tally,
    count: int,
    depth: int,
    limit: int | None = None,
) -> list[LoadConnection]:
    loop = asyncio.get_running_loop()
    kind = TextConnection if proto is Proto.TEXT else BinaryConnection
    connections: list[LoadConnection] = []
    try:
        for number in range(count):
            first_key = number * len(workload.keys) // count

            def factory(first_key: int = first_key) -> LoadConnection:
                return kind(workload, tally, depth, first_key, limit)

            _, connection = await loop.create_connection(factory, HOST, port)
            connections.append(connection)
    except BaseException:
        for connection in connections:
            connection.close()
        raise
    return connections


async def measure(
    server: Server,
    proto: Proto,
    workload: Workload,
    connections: int,
    depth: int,
    duration: float,
) -> Sample:
    """Load ``server`` for a warm-up and then ``duration`` seconds of measurement."""
    tally = Tally()
    opened = await _connect(server.port, proto, workload, tally, connections, depth)
    try:
        for connection in opened:
            connection.start()
        await asyncio.sleep(WARMUP_SECONDS)
        cpu_before = cpu_seconds(server.pid)
        generator_before = time.process_time()
        busy_before, steal_before = machine_cpu()
        tally.measuring = True
        started = time.perf_counter()
        await asyncio.sleep(duration)
        tally.measuring = False
        seconds = time.perf_counter() - started
        cpu_after = cpu_seconds(server.pid)
        generator_after = time.process_time()
        busy_after, steal_after = machine_cpu()
        tally.stopping = True
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await asyncio.gather(*(connection.done for connection in opened))
    finally:
        for connection in opened:
            connection.close()
    server_cpu = cpu_after - cpu_before
    generator_cpu = generator_after - generator_before
    return Sample(
        ops=tally.ops,
        seconds=seconds,
        server_cpu=server_cpu,
        generator_cpu=generator_cpu,
        misses=tally.misses,
        errors=tally.errors,
        first_error=tally.first_error,
        latencies=tally.latencies,
        other_cores=max(0.0, busy_after - busy_before - server_cpu - generator_cpu) / seconds,
        steal_cores=(steal_after - steal_before) / seconds,
    )


async def populate(server: Server, proto: Proto, keys: list[bytes], value: bytes) -> None:
    """SET every key once, four connections pipelining eight requests each."""
    workload = Workload.make(Op.SET, keys, value)
    tally = Tally(measuring=True)
    count = min(4, len(keys))
    shares = [len(keys) // count + (1 if n < len(keys) % count else 0) for n in range(count)]
    loop = asyncio.get_running_loop()
    kind = TextConnection if proto is Proto.TEXT else BinaryConnection
    opened: list[LoadConnection] = []
    try:
        first = 0
        for share in shares:

            def factory(first_key: int = first, limit: int = share) -> LoadConnection:
                return kind(workload, tally, 8, first_key, limit)

            _, connection = await loop.create_connection(factory, HOST, server.port)
            opened.append(connection)
            first += share
        for connection in opened:
            connection.start()
        async with asyncio.timeout(120):
            await asyncio.gather(*(connection.done for connection in opened))
    finally:
        for connection in opened:
            connection.close()
    if tally.errors or tally.ops != len(keys):
        raise RuntimeError(
            f"populating {server.name} over {proto.value}: {tally.ops} of {len(keys)} done, "
            f"{tally.errors} errors (first: {tally.first_error})"
        )


# -- the comparison -------------------------------------------------------------


@dataclass(frozen=True)
class System:
    server: Server
    proto: Proto

    @property
    def label(self) -> str:
        return f"{self.server.name}/{self.proto.value}"


@dataclass
class Cell:
    """All rounds of one (system, op, size)."""

    system: System
    op: Op
    size: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def ops(self) -> int:
        return sum(sample.ops for sample in self.samples)

    @property
    def seconds(self) -> float:
        return sum(sample.seconds for sample in self.samples)

    @property
    def throughput(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_kop(self) -> float:
        """Server CPU seconds per 1,000 operations."""
        ops = self.ops
        return sum(sample.server_cpu for sample in self.samples) / ops * 1000 if ops else math.nan

    @property
    def generator_load(self) -> float:
        """The generator's CPU use over the windows, as a share of its one core."""
        seconds = self.seconds
        return sum(s.generator_cpu for s in self.samples) / seconds if seconds else 0.0

    @property
    def other_cores(self) -> float:
        """Cores busy with other processes during the windows, on average."""
        seconds = self.seconds
        return sum(s.other_cores * s.seconds for s in self.samples) / seconds if seconds else 0.0

    @property
    def steal_cores(self) -> float:
        seconds = self.seconds
        return sum(s.steal_cores * s.seconds for s in self.samples) / seconds if seconds else 0.0

    @property
    def misses(self) -> int:
        return sum(sample.misses for sample in self.samples)

    @property
    def errors(self) -> int:
        return sum(sample.errors for sample in self.samples)

    def percentile_ms(self, share: float) -> float:
        latencies = sorted(value for sample in self.samples for value in sample.latencies)
        if not latencies:
            return math.nan
        rank = max(0, math.ceil(share * len(latencies)) - 1)
        return latencies[rank] * 1000


def keys_for(size: int, budget_mb: int) -> list[bytes]:
    """100 to 1000 distinct keys of one size, at most ``budget_mb`` of values."""
    count = max(16, min(1000, budget_mb * MIB // size))
    return [b"bench:%d:%04d" % (size, number) for number in range(count)]


def value_of(size: int) -> bytes:
    pattern = bytes(range(33, 127))
    return (pattern * (size // len(pattern) + 1))[:size]


async def run_comparison(
    systems: list[System],
    sizes: list[int],
    args: argparse.Namespace,
) -> dict[tuple[str, Op, int], Cell]:
    cells: dict[tuple[str, Op, int], Cell] = {}
    workloads: dict[tuple[Op, int], Workload] = {}
    for size in sizes:
        keys = keys_for(size, args.key_budget_mb)
        value = value_of(size)
        for op in Op:
            workloads[op, size] = Workload.make(op, keys, value)
        populated: set[str] = set()
        for system in systems:
            if system.server.name not in populated:  # the node's protocols share one store
                await populate(system.server, system.proto, keys, value)
                populated.add(system.server.name)
        progress(f"populated {len(keys)} keys of {format_size(size)} in every server")
    for round_number in range(1, args.rounds + 1):
        for size in sizes:
            for op in Op:
                for system in systems:  # A B A B: the systems take turns, cell by cell
                    cell = cells.setdefault((system.label, op, size), Cell(system, op, size))
                    sample = await measure(
                        system.server,
                        system.proto,
                        workloads[op, size],
                        args.connections,
                        args.depth,
                        args.duration,
                    )
                    cell.samples.append(sample)
                    throughput = sample.ops / sample.seconds
                    cpu = sample.server_cpu / sample.ops * 1000 if sample.ops else math.nan
                    progress(
                        f"round {round_number}/{args.rounds}  {op.value} {format_size(size):>7}"
                        f"  {system.label:<16} {throughput:>10,.0f} ops/s"
                        f"  {cpu:.3f} CPU s/1k ops"
                        f"  generator {sample.generator_cpu / sample.seconds:.0%}"
                        f"  other {sample.other_cores:.2f} cores"
                        + (f"  misses {sample.misses}" if sample.misses else "")
                        + (
                            f"  ERRORS {sample.errors}: {sample.first_error}"
                            if sample.errors
                            else ""
                        )
                    )
    return cells


@dataclass
class MemaslapRun:
    tps: float
    ops: int
    seconds: float
    server_cpu: float
    get_misses: int


def run_memaslap(
    children: Children,
    binary: str,
    server: Server,
    size: int,
    connections: int,
    seconds: int,
    config: Path,
) -> MemaslapRun:
    argv = [
        binary,
        "-s",
        f"{HOST}:{server.port}",
        "-t",
        f"{seconds}s",
        "-T",
        "1",
        "-c",
        str(connections),
        "-X",
        str(size),
        "-F",
        str(config),
    ]
    cpu_before = cpu_seconds(server.pid)
    process = children.start(
        argv, core=CLIENT_CORE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = process.communicate(timeout=seconds + 60)
    finally:
        children.stop(process)
    cpu_after = cpu_seconds(server.pid)
    text = output.decode("utf-8", "replace")
    summary = re.search(r"Run time: ([0-9.]+)s Ops: (\d+) TPS: (\d+)", text)
    if process.returncode != 0 or summary is None:
        raise RuntimeError(f"memaslap failed (status {process.returncode}):\n{text[-2000:]}")
    misses = re.search(r"get_misses: (\d+)", text)
    return MemaslapRun(
        tps=float(summary.group(3)),
        ops=int(summary.group(2)),
        seconds=float(summary.group(1)),
        server_cpu=cpu_after - cpu_before,
        get_misses=int(misses.group(1)) if misses else -1,
    )


def memaslap_config(directory: Path, size: int) -> Path:
    """memaslap's -F file: fixed key and value lengths and the get/set mix."""
    path = directory / f"memaslap-{size}.cfg"
    path.write_text(
        "key\n"
        f"{MEMASLAP_KEY_LENGTH} {MEMASLAP_KEY_LENGTH} 1\n"
        "value\n"
        f"{size} {size} 1\n"
        "cmd\n"
        f"0 {1 - MEMASLAP_GET_SHARE:.2f}\n"
        f"1 {MEMASLAP_GET_SHARE:.2f}\n"
    )
    return path


# -- output ---------------------------------------------------------------------


def format_size(size: int) -> str:
    if size % MIB == 0:
        return f"{size // MIB} MB"
    if size % KIB == 0:
        return f"{size // KIB} KB"
    return f"{size} B"


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def print_results(
    cells: dict[tuple[str, Op, int], Cell],
    systems: list[System],
    sizes: list[int],
    args: argparse.Namespace,
) -> None:
    print()
    print(
        f"Results: {args.connections} connections, pipeline depth {args.depth} per connection "
        f"({args.connections * args.depth} requests outstanding), {args.rounds} rounds of "
        f"{args.duration:g} s per cell after a {WARMUP_SECONDS:g} s warm-up; "
        + (
            f"server on core {SERVER_CORE}, generator on core {CLIENT_CORE}"
            if args.pin
            else "NOTHING PINNED (fewer than 2 cores)"
        )
    )
    print(
        "CPU = server utime+stime over the measured window (/proc/PID/stat) per 1,000 ops; "
        "gen = the Python generator's CPU share of its core (about 100%: generator-bound);\n"
        "other = cores busy with other processes meanwhile, steal = cores taken by the "
        "hypervisor (both near 0 on a quiet machine)"
    )
    print()
    header = (
        f"{'system':<17}{'op':<5}{'size':>8}{'depth':>6}{'ops/s':>11}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'CPU s/1k':>10}{'gen':>6}{'MB/s':>8}{'other':>7}{'steal':>7}  notes"
    )
    print_table_header(header)
    for size in sizes:
        for op in Op:
            for system in systems:
                cell = cells[system.label, op, size]
                notes = []
                if cell.misses:
                    notes.append(f"{cell.misses} misses")
                if cell.errors:
                    notes.append(f"{cell.errors} errors ({cell.samples[-1].first_error})")
                print(
                    f"{system.label:<17}{op.value:<5}{format_size(size):>8}{args.depth:>6}"
                    f"{cell.throughput:>11,.0f}{cell.percentile_ms(0.5):>9.3f}"
                    f"{cell.percentile_ms(0.99):>9.3f}{cell.cpu_per_kop:>10.4f}"
                    f"{cell.generator_load:>6.0%}{cell.throughput * size / MIB:>8,.0f}"
                    f"{cell.other_cores:>7.2f}{cell.steal_cores:>7.2f}  {', '.join(notes)}"
                )
        print()

    reference = next(system for system in systems if system.server.name == "memcached")
    rivals = [system for system in systems if system.server.name != "memcached"]
    print("Ratios node / memcached (memcached over its text protocol, same generator and depth)")
    print(
        "goals: GET throughput >= "
        f"{GOAL_THROUGHPUT:g}x at every size; CPU per op <= {GOAL_CPU:g}x "
        f"from {format_size(GOAL_CPU_FROM_SIZE)} up"
    )
    print()
    header = (
        f"{'node via':<13}{'op':<5}{'size':>8}{'throughput':>12}{'per round':>18}"
        f"{'CPU/op':>9}{'per round':>18}  goal check"
    )
    print_table_header(header)
    for rival in rivals:
        for size in sizes:
            for op in Op:
                mine = cells[rival.label, op, size]
                theirs = cells[reference.label, op, size]
                throughput = ratio_of(mine.throughput, theirs.throughput)
                cpu = ratio_of(mine.cpu_per_kop, theirs.cpu_per_kop)
                rounds_throughput = " ".join(
                    f"{ratio_of(a.ops / a.seconds, b.ops / b.seconds):.2f}"
                    for a, b in zip(mine.samples, theirs.samples, strict=True)
                )
                rounds_cpu = " ".join(
                    f"{ratio_of(a.server_cpu / max(a.ops, 1), b.server_cpu / max(b.ops, 1)):.2f}"
                    for a, b in zip(mine.samples, theirs.samples, strict=True)
                )
                checks = []
                if op is Op.GET:
                    checks.append(
                        f"thr >= {GOAL_THROUGHPUT:g}x {verdict(throughput >= GOAL_THROUGHPUT)}"
                    )
                if size >= GOAL_CPU_FROM_SIZE:
                    checks.append(f"CPU <= {GOAL_CPU:g}x {verdict(cpu <= GOAL_CPU)}")
                if theirs.generator_load > 0.9 and op is Op.GET:
                    checks.append("(memcached figure generator-bound: see memaslap)")
                print(
                    f"{rival.proto.value:<13}{op.value:<5}{format_size(size):>8}"
                    f"{throughput:>11.2f}x{rounds_throughput:>18}{cpu:>8.2f}x"
                    f"{rounds_cpu:>18}  {'; '.join(checks)}"
                )
        print()


def print_memaslap(
    runs: dict[tuple[str, int], list[MemaslapRun]],
    sizes: list[int],
    connections: int,
    seconds: int,
    rounds: int,
) -> None:
    print(
        f"memaslap (C generator, text protocol, 1 thread on core {CLIENT_CORE}, "
        f"{connections} connections, one request in flight each, "
        f"{MEMASLAP_GET_SHARE:.0%} get / {1 - MEMASLAP_GET_SHARE:.0%} set, "
        f"{rounds} rounds of {seconds} s, systems in turn)"
    )
    print("CPU = server CPU over the whole memaslap run per 1,000 of its ops")
    print()
    header = (
        f"{'size':>8}{'memcached TPS':>15}{'CPU s/1k':>10}{'node TPS':>11}{'CPU s/1k':>10}"
        f"{'TPS ratio':>11}{'CPU ratio':>11}{'per-round TPS ratio':>21}  goal"
    )
    print_table_header(header)
    for size in sizes:
        theirs = runs["memcached", size]
        mine = runs["node", size]

        def tps(group: list[MemaslapRun]) -> float:
            return sum(run.ops for run in group) / sum(run.seconds for run in group)

        def cpu(group: list[MemaslapRun]) -> float:
            return sum(run.server_cpu for run in group) / sum(run.ops for run in group) * 1000

        ratio = ratio_of(tps(mine), tps(theirs))
        rounds_text = " ".join(
            f"{ratio_of(a.tps, b.tps):.2f}" for a, b in zip(mine, theirs, strict=True)
        )
        misses = sum(run.get_misses for run in mine + theirs)
        print(
            f"{format_size(size):>8}{tps(theirs):>15,.0f}{cpu(theirs):>10.4f}"
            f"{tps(mine):>11,.0f}{cpu(mine):>10.4f}{ratio:>10.2f}x"
            f"{ratio_of(cpu(mine), cpu(theirs)):>10.2f}x{rounds_text:>21}"
            f"  thr >= {GOAL_THROUGHPUT:g}x (90% get) {verdict(ratio >= GOAL_THROUGHPUT)}"
            + (f"  ({misses} get misses)" if misses else "")
        )
    print()


# -- modes ----------------------------------------------------------------------


def benchmark(children: Children, args: argparse.Namespace, workdir: Path) -> None:
    sizes: list[int] = args.sizes
    memaslap_sizes: list[int] = [] if args.no_memaslap else args.memaslap_sizes
    memcached = start_memcached(children, 1024, max(sizes), SERVER_CORE)
    node_log = open(workdir / "node.log", "wb")  # noqa: SIM115 - closed with the node
    try:
        node = start_node(children, 2048, max(16, math.ceil(max(sizes) / MIB) + 1), node_log)
    finally:
        node_log.close()
    version = subprocess.run(
        [memcached_binary(), "-V"], capture_output=True, text=True, check=False
    ).stdout.strip()
    progress(
        f"{version} (pid {memcached.pid}) on port {memcached.port}; "
        f"node (pid {node.pid}) on port {node.port}"
    )
    systems = [
        System(memcached, Proto.TEXT),
        System(node, Proto.TEXT),
        System(node, Proto.BINARY),
    ]
    cells = run_on_uvloop(run_comparison(systems, sizes, args))

    print_results(cells, systems, sizes, args)
    sys.stdout.flush()

    memaslap = _memaslap_binary()
    if not memaslap_sizes:
        return
    if memaslap is None:
        progress(
            f"memcaslap is not installed, skipping it; install it with: {MEMCACHED_INSTALL_HINT}"
        )
        return
    runs: dict[tuple[str, int], list[MemaslapRun]] = {}
    seconds: int = args.memaslap_seconds
    try:
        for round_number in range(1, args.rounds + 1):
            for size in memaslap_sizes:
                config = memaslap_config(workdir, size)
                for server in (memcached, node):  # A B A B here too
                    run = run_memaslap(
                        children, memaslap, server, size, args.connections, seconds, config
                    )
                    runs.setdefault((server.name, size), []).append(run)
                    progress(
                        f"round {round_number}/{args.rounds}  memaslap {format_size(size):>7}"
                        f"  {server.name:<10} {run.tps:>10,.0f} TPS"
                        f"  {run.server_cpu / run.ops * 1000:.4f} CPU s/1k ops"
                    )
    except RuntimeError as error:  # keep the results above; say why this part is missing
        progress(f"memaslap part abandoned: {error}")
        return
    print_memaslap(runs, memaslap_sizes, args.connections, seconds, args.rounds)


async def fill_node(port: int, count: int, size: int) -> dict[str, object]:
    value = value_of(size)
    async with NodeClient(HOST, port, pool_size=4, timeout=30) as client:
        batch = 32
        for start in range(0, count, batch):
            await asyncio.gather(
                *(
                    client.set(b"memory:%06d" % number, value)
                    for number in range(start, min(count, start + batch))
                )
            )
        return await client.stats()


def memory_check(children: Children, args: argparse.Namespace, workdir: Path) -> bool:
    capacity_mb: int = args.memory_capacity_mb
    size: int = args.memory_value_size
    count: int = args.memory_count
    node_log = open(workdir / "node.log", "wb")  # noqa: SIM115 - closed with the node
    try:
        node = start_node(children, capacity_mb, 16, node_log)
    finally:
        node_log.close()
    empty = memory_kib(node.pid)
    started = time.perf_counter()
    stats = run_on_uvloop(fill_node(node.port, count, size))
    elapsed = time.perf_counter() - started
    full = memory_kib(node.pid)
    goal_mb = 1.10 * capacity_mb + 40
    rss_mb = full["VmRSS"] / KIB
    hwm_mb = full["VmHWM"] / KIB
    print()
    print(
        f"Memory: node with --capacity-mb {capacity_mb}, {count} SETs of {format_size(size)} "
        f"({count * size / MIB:,.0f} MB written over the binary protocol in {elapsed:.1f} s)"
    )
    print(
        f"store: {stats.get('items')} items, {int(str(stats.get('bytes'))) / MIB:.1f} MB "
        f"counted of {capacity_mb} MB, {stats.get('evictions')} evictions"
    )
    print()
    header = f"{'':<28}{'MB':>9}  goal <= 1.10 x {capacity_mb} + 40 = {goal_mb:.1f} MB"
    print_table_header(header)
    print(f"{'VmRSS empty node':<28}{empty['VmRSS'] / KIB:>9.1f}")
    print(f"{'VmRSS after the fill':<28}{rss_mb:>9.1f}  {verdict(rss_mb <= goal_mb)}")
    print(f"{'VmHWM (peak RSS)':<28}{hwm_mb:>9.1f}  {verdict(hwm_mb <= goal_mb)}")
    for name in ("RssAnon", "RssFile", "VmSize"):
        if name in full:
            print(f"{name:<28}{full[name] / KIB:>9.1f}")
    print()
    return rss_mb <= goal_mb and hwm_mb <= goal_mb


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--memory", action="store_true", help="measure the node's RSS when full instead"
    )
    parser.add_argument(
        "--duration", type=float, default=3.0, help="seconds measured per cell and round"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of A B A B")
    parser.add_argument(
        "--sizes", type=parse_sizes, default=parse_sizes("1K,100K,1M"), help="value sizes"
    )
    parser.add_argument("--connections", type=int, default=16, help="connections per cell")
    parser.add_argument(
        "--depth",
        type=int,
        default=1,
        help="requests in flight per connection (default 1: memcached 1.6.18 answers "
        "pipelined text gets one reply per syscall, which flatters any rival)",
    )
    parser.add_argument(
        "--key-budget-mb",
        type=int,
        default=256,
        help="values per size: at most this many MB, 16 to 1000 keys",
    )
    parser.add_argument(
        "--memaslap-sizes",
        type=parse_sizes,
        default=parse_sizes("1K"),
        help="value sizes for the memcaslap runs",
    )
    parser.add_argument("--memaslap-seconds", type=int, default=5, help="seconds per memcaslap run")
    parser.add_argument("--no-memaslap", action="store_true", help="skip the memcaslap runs")
    parser.add_argument(
        "--memory-capacity-mb", type=int, default=256, help="--memory: the node's capacity"
    )
    parser.add_argument(
        "--memory-value-size", type=parse_size, default=100 * KIB, help="--memory: value size"
    )
    parser.add_argument("--memory-count", type=int, default=4000, help="--memory: values written")
    args = parser.parse_args(argv)
    if min(args.rounds, args.connections, args.depth, args.memaslap_seconds) < 1 or not (
        args.duration > 0
    ):
        parser.error("--rounds, --connections, --depth and the durations must be positive")

    args.pin = pin_load_generator(CLIENT_CORE, os.cpu_count() or 1)
    children = Children(args.pin)

    def work(directory: Path) -> int:
        if args.memory:
            return 0 if memory_check(children, args, directory) else 1
        benchmark(children, args, directory)
        return 0

    return run_guarded(
        work,
        prefix="bench-node-",
        cleanup=children.close,
        stopped="every server stopped",
        on_failure=lambda directory: show_log_tails(directory, "node.log"),
    )


if __name__ == "__main__":
    sys.exit(main())
