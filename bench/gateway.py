"""Benchmark the gateway's cache-hit path against nginx serving the same file (see bench/README.md).

Starts, on free loopback ports and in a temporary folder, one cache node
(``imagecache node``), the gateway (``imagecache gateway``, pointed at that
node) and nginx (one process, ``sendfile on``, ``tcp_nopush off``, no access
log) serving the same ~100 KB PNG from disk at the same kind of path. The
image is random noise, so it does not compress away; it is uploaded through
the gateway's API, which writes it through to the node, so every ``GET
/image/<key>`` is a cache hit. The node and the gateway (the system under
test) and nginx are pinned to core 0, wrk to core 1.

Then runs ``wrk -t1 -c16 --latency`` against both in turn (A B A B), reads
each server's CPU time from /proc, checks that the responses were 200s of the
right size and that the gateway's were cache hits (the node's counters), and
prints throughput, latency, CPU per 1,000 requests and the ratio
gateway / nginx beside the goal (at least 0.5x).

``--workers N`` (N > 1) runs the gateway as ``imagecache gateway --workers N``
(N processes on one port, SO_REUSEPORT) and nginx with a master and
``worker_processes N`` (``listen ... reuseport``), the servers of both on the
first N cores, and wrk on the next core or, when none is left, on those same
N cores. It prints each system's requests per second of server CPU (every
process: the gateway's supervisor, workers and node; nginx's master and
workers) and the ratio beside the goal for workers (at least 0.8x nginx's),
with the throughput; the gateway's counters are read from every worker.

``--py-spy PATH`` then profiles the gateway under the same load with that
py-spy binary (not a project dependency) and prints where its time goes.

Every process started here is stopped on the way out, also on an error,
Ctrl-C or SIGTERM (and, through PR_SET_PDEATHSIG, if this process is killed).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Final

from benchkit import (
    GATEWAY_WORKER,
    HOST,
    KIB,
    MIB,
    NODE_READY,
    Children,
    Cores,
    Server,
    child_pids,
    command_line,
    cpu_seconds,
    describe_cores,
    free_port,
    get_from_each,
    imagecache_command,
    machine_cpu,
    node_argv,
    noise_png,
    parse_size,
    pin_load_generator,
    print_table_header,
    progress,
    prometheus_values,
    ratio_of,
    read_ready_line,
    run_guarded,
    show_log_tails,
    verdict,
    wait_until_listening,
)

INSTALL_HINT: Final = "apt-get install -y nginx-light wrk"
IMAGE_WIDTH: Final = 185  # pixels; the height follows from the wanted file size
IMAGE_SEED: Final = 20240601
# Goal from the issue: the gateway serves cache hits at least at this share of
# nginx's rate for the same file on the same core.
GOAL_RATIO: Final = 0.5
# Goal from the issue for --workers N (N > 1): requests per second of server CPU
# at least this share of nginx's with N worker processes on the same N cores.
GOAL_PER_CPU: Final = 0.8
NGINX_WORKER: Final = "nginx: worker process"  # an nginx worker's title
START_TIMEOUT: Final = 30.0
# A server using less of its core than this was held back by something else.
SATURATED_CORES: Final = 0.8
PROFILE_TOP: Final = 22


# -- child processes -----------------------------------------------------------


def _binary(name: str, *fallbacks: str) -> str:
    found = shutil.which(name) or next(
        (path for path in fallbacks if os.access(path, os.X_OK)), None
    )
    if found is None:
        print(f"{name} is not installed; install it with:\n    {INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2)
    return found


def start_node(
    children: Children, workdir: Path, cores: Cores, capacity_mb: float = 256, name: str = "node"
) -> Server:
    """A node of ``capacity_mb``, its log in ``workdir/<name>.log``."""
    with open(workdir / f"{name}.log", "wb") as log:
        process = children.start(
            node_argv(0, capacity_mb),
            core=cores,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    match = read_ready_line(process, NODE_READY, f"the {name}", START_TIMEOUT)
    port = int(match.group(1))
    wait_until_listening(process, port, f"the {name}")
    return Server(name, port, process.pid)


def gateway_data_dir(workdir: Path, name: str) -> Path:
    """Where ``start_gateway`` keeps the metadata and blobs of the gateway ``name``."""
    return workdir / f"{name}-data"


def start_gateway(
    children: Children,
    workdir: Path,
    node: Server,
    workers: int,
    cores: Cores,
    name: str = "gateway",
    settings: Mapping[str, str] | None = None,
) -> tuple[Server, list[int]]:
    """The gateway, and its worker processes (none with one worker: it serves
    itself); ``settings``: ``IMAGECACHE_*`` variables beyond its own."""
    data_dir = gateway_data_dir(workdir, name)
    data_dir.mkdir()
    port = free_port()
    # Only this run's settings: no configuration file or variable of the caller's.
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGECACHE_")}
    env |= {
        "IMAGECACHE_DATA_DIR": str(data_dir),
        "IMAGECACHE_METADATA_URL": f"sqlite+aiosqlite:///{data_dir / 'imagecache.db'}",
        "IMAGECACHE_BLOB_FOLDER": str(data_dir / "blobs"),
        "IMAGECACHE_GATEWAY_HOST": HOST,
        "IMAGECACHE_GATEWAY_PORT": str(port),
        "IMAGECACHE_NODES": f"{HOST}:{node.port}",
        # Nothing listens there: no manager is needed for uploads and reads.
        "IMAGECACHE_MANAGER_URL": f"http://{HOST}:{free_port()}",
    } | dict(settings or {})
    with open(workdir / f"{name}.log", "wb") as log:
        process = children.start(
            [
                *imagecache_command(),
                "--log-level",
                "WARNING",
                "gateway",
                *(["--workers", str(workers)] if workers > 1 else []),
            ],
            core=cores,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
    # With workers, the parent says so once every worker listens.
    read_ready_line(process, rb"gateway on http://", f"the {name}", START_TIMEOUT)
    wait_until_listening(process, port, f"the {name}")
    worker_pids = workers_of(process.pid, GATEWAY_WORKER, workers) if workers > 1 else []
    return Server(name, port, process.pid), worker_pids


def workers_of(parent: int, marker: str, count: int) -> list[int]:
    """The ``count`` child processes of ``parent`` with ``marker`` in their command line."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        found = [pid for pid in child_pids(parent) if marker in " ".join(command_line(pid))]
        if len(found) == count:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {parent} has {len(found)} {marker!r}, not {count}")
        time.sleep(0.05)


def nginx_config(prefix: Path, port: int, binary: str, workers: int = 1) -> str:
    """nginx serving ``prefix/html`` on ``port``, everything it writes in ``prefix``.

    One worker: one process (no master). More: a master and that many workers,
    each with its own listening socket (``reuseport``: the kernel spreads
    connections over them as over the gateway's workers).
    """
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False).stderr
    temp_paths = "".join(
        f"    {module}_temp_path {prefix / ('temp-' + module)};\n"
        for module in ("proxy", "fastcgi", "uwsgi", "scgi")
        if f"--without-http_{module}_module" not in built
    )
    if workers > 1:
        # Workers of a master run as root only if told (else "nobody", who may not read prefix).
        processes = (
            "user root;\n" if os.geteuid() == 0 else ""
        ) + f"worker_processes {workers};\ndaemon off;\nmaster_process on;\n"
        reuseport = " reuseport"
    else:
        processes = "worker_processes 1;\ndaemon off;\nmaster_process off;\n"
        reuseport = ""
    return f"""\
{processes}error_log {prefix / "error.log"} warn;
pid {prefix / "nginx.pid"};
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_requests 1000000;
    client_body_temp_path {prefix / "temp-body"};
{temp_paths}    server {{
        listen {HOST}:{port}{reuseport};
        root {prefix / "html"};
        location /image/ {{
            default_type image/png;
            add_header Cache-Control no-cache;
        }}
    }}
}}
"""


def start_nginx(
    children: Children, workdir: Path, key: str, image: bytes, workers: int, cores: Cores
) -> tuple[Server, list[int]]:
    """nginx serving ``image`` at ``/image/<key>``, and its worker processes
    (none with one worker: it serves itself)."""
    prefix = workdir / "nginx"
    (prefix / "html" / "image").mkdir(parents=True)
    (prefix / "html" / "image" / key).write_bytes(image)
    return start_nginx_on(children, prefix, workers, cores)


def start_nginx_on(
    children: Children, prefix: Path, workers: int, cores: Cores
) -> tuple[Server, list[int]]:
    """nginx serving the files under ``prefix/html``, and its worker processes."""
    binary = _binary("nginx", "/usr/sbin/nginx")
    port = free_port()
    config = prefix / "nginx.conf"
    config.write_text(nginx_config(prefix, port, binary, workers))
    with open(prefix / "stderr.log", "wb") as log:
        process = children.start(
            [binary, "-c", str(config), "-p", str(prefix), "-e", str(prefix / "error.log")],
            core=cores,
            stdout=log,
            stderr=log,
        )
    wait_until_listening(process, port, "nginx")
    worker_pids = workers_of(process.pid, NGINX_WORKER, workers) if workers > 1 else []
    return Server("nginx", port, process.pid), worker_pids


# -- /proc ----------------------------------------------------------------------


def children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for (wrk, once it ends)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the image and the HTTP checks -------------------------------------------------


def upload(port: int, key: str, image: bytes) -> None:
    """POST /api/upload (multipart: key, file), as an API client would."""
    boundary = f"bench-{uuid.uuid4().hex}"
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="key"\r\n\r\n{key}\r\n'.encode(),
            f"--{boundary}\r\nContent-Disposition: form-data; "
            f'name="file"; filename="{key}.png"\r\nContent-Type: image/png\r\n\r\n'.encode(),
            image,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    request = urllib.request.Request(
        f"http://{HOST}:{port}/api/upload",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    if answer != {"success": "true", "key": key}:
        raise RuntimeError(f"the upload was refused: {answer}")


@dataclass(frozen=True)
class Fetched:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def response_bytes(self) -> int:
        """Bytes on the wire: status line, headers, blank line and body."""
        head = len("HTTP/1.1 200 OK\r\n") + sum(len(f"{n}: {v}\r\n") for n, v in self.headers)
        return head + len("\r\n") + len(self.body)

    def header(self, name: str) -> str:
        return next((v for n, v in self.headers if n.lower() == name.lower()), "")


def fetch(port: int, path: str) -> Fetched:
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return Fetched(response.status, response.getheaders(), response.read())
    finally:
        connection.close()


def check_response(server: Server, path: str, image: bytes) -> Fetched:
    """One GET that must return exactly the image; raises RuntimeError otherwise."""
    got = fetch(server.port, path)
    if got.status != 200 or got.body != image:
        raise RuntimeError(
            f"GET {path} from {server.name}: status {got.status}, {len(got.body)} bytes "
            f"{'equal to' if got.body == image else 'different from'} the {len(image)} uploaded"
        )
    if got.header("Content-Type") != "image/png":
        raise RuntimeError(f"{server.name} sent Content-Type {got.header('Content-Type')!r}")
    return got


def gateway_counters(port: int, pids: Sequence[int]) -> dict[int, dict[str, float]]:
    """Each gateway process's Prometheus counters and gauges (``GET /metrics``), by name.

    ``pids`` are the processes that serve the port: the gateway itself, or its
    workers, each with counters of its own, all of which are read.
    """
    answers = get_from_each(port, "/metrics", pids)
    missing = [pid for pid in pids if pid not in answers]
    if missing:
        raise RuntimeError(f"GET /metrics never reached gateway process(es) {missing}")
    return {pid: prometheus_values(answers[pid].decode()) for pid in pids}


def node_counters(port: int) -> dict[str, int]:
    """The node's memcached-style counters (text protocol ``stats``)."""
    with socket.create_connection((HOST, port), timeout=10) as connection:
        connection.sendall(b"stats\r\n")
        received = b""
        while not received.endswith(b"END\r\n"):
            chunk = connection.recv(65536)
            if not chunk:
                raise RuntimeError("the node closed the connection during stats")
            received += chunk
    counters: dict[str, int] = {}
    for line in received.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STAT" and parts[2].isdigit():
            counters[parts[1]] = int(parts[2])
    return counters


# -- wrk ------------------------------------------------------------------------

# wrk calls ``done`` once at the end (no per-request Lua, so no cost under load);
# it prints the exact counts that wrk's summary rounds (e.g. "2.09GB read").
WRK_SCRIPT: Final = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("bench: requests %d bytes %d duration_us %d errors %d %d %d %d %d\\n",
    summary.requests, summary.bytes, summary.duration,
    e.connect, e.read, e.write, e.timeout, e.status))
  for _, p in ipairs({50, 75, 90, 99, 99.9}) do
    io.write(string.format("bench: latency %g %d\\n", p, latency:percentile(p)))
  end
  io.write(string.format("bench: latency max %d\\n", latency.max))
end
"""
_BINARY_UNITS: Final = {"": 1, "K": KIB, "M": MIB, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
PERCENTILES: Final = (50.0, 75.0, 90.0, 99.0, 99.9)  # wrk reports these (WRK_SCRIPT)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    bytes_read: int
    requests_per_second: float  # as wrk prints it
    transfer_per_second: float  # bytes, as wrk prints it
    latency: dict[float, float]  # percentile (50 .. 99.9) -> seconds
    max_latency: float
    socket_errors: int  # connect, read, write errors and timeouts
    bad_status: int  # wrk's "Non-2xx or 3xx responses" (status 400 and above)


def parse_wrk(text: str) -> WrkResult:
    """The figures of ``wrk --latency -s WRK_SCRIPT``; raises ValueError when some are missing."""

    def needed(pattern: str) -> re.Match[str]:
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise ValueError(f"no match for {pattern!r} in wrk's output:\n{text}")
        return match

    exact = needed(
        r"^bench: requests (\d+) bytes (\d+) duration_us (\d+) "
        r"errors (\d+) (\d+) (\d+) (\d+) (\d+)$"
    )
    requests, bytes_read, duration_us, connect, read, write, timeout, status = map(
        int, exact.groups()
    )
    latency = {
        float(m.group(1)): int(m.group(2)) * 1e-6
        for m in re.finditer(r"^bench: latency ([0-9.]+) (\d+)$", text, re.MULTILINE)
    }
    if not set(PERCENTILES) <= latency.keys():
        raise ValueError(f"latency percentiles missing from wrk's output:\n{text}")
    rate = needed(r"^Requests/sec:\s+([0-9.]+)")
    transfer = needed(r"^Transfer/sec:\s+([0-9.]+)([KMGTP]?)B")
    return WrkResult(
        requests=requests,
        seconds=duration_us * 1e-6,
        bytes_read=bytes_read,
        requests_per_second=float(rate.group(1)),
        transfer_per_second=float(transfer.group(1)) * _BINARY_UNITS[transfer.group(2)],
        latency=latency,
        max_latency=int(needed(r"^bench: latency max (\d+)$").group(1)) * 1e-6,
        socket_errors=connect + read + write + timeout,
        bad_status=status,
    )


@dataclass(frozen=True)
class Wrk:
    """How wrk runs: the binary, the ``done`` script and the load's shape."""

    binary: str
    script: Path
    connections: int
    threads: int

    def argv(self, url: str, duration: float) -> list[str]:
        return [
            self.binary,
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{max(1, math.ceil(duration))}s",
            "--latency",
            "-s",
            str(self.script),
            url,
        ]


@dataclass(frozen=True)
class System:
    """What one side of the comparison is: where wrk points and whose CPU counts."""

    name: str
    port: int
    path: str
    pids: dict[str, int]  # process name -> pid; all count as the server's CPU
    expected_bytes: int  # one whole response on the wire
    parent: int = 0  # with workers: the process that started them
    workers: tuple[int, ...] = ()  # the worker processes (none: the server has none)
    worker_marker: str = ""  # in the workers' command lines

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.path}"

    def check_workers(self) -> None:
        """Raise RuntimeError when a worker exited (or was started again) meanwhile."""
        if not self.workers:
            return
        now = tuple(
            pid
            for pid in child_pids(self.parent)
            if self.worker_marker in " ".join(command_line(pid))
        )
        if now != self.workers:
            raise RuntimeError(
                f"{self.name}'s workers changed during the run ({self.workers} -> {now}): one "
                "exited or was started again (see its log); the CPU figures would be wrong"
            )


@dataclass(frozen=True)
class Sample:
    """One wrk run against one system."""

    wrk: WrkResult
    wall_seconds: float
    server_cpu: dict[str, float]  # process name -> CPU seconds during the run
    wrk_cpu: float
    other_cores: float
    steal_cores: float

    @property
    def cpu_total(self) -> float:
        return sum(self.server_cpu.values())

    @property
    def cpu_per_kilo(self) -> float:
        requests = self.wrk.requests
        return self.cpu_total / requests * 1000 if requests else math.nan


def run_wrk(children: Children, wrk: Wrk, system: System, duration: float, cores: Cores) -> Sample:
    """One wrk run (on ``cores``) against ``system``, with the CPU its processes used meanwhile."""
    argv = wrk.argv(system.url, duration)
    cpu_before = {name: cpu_seconds(pid) for name, pid in system.pids.items()}
    busy_before, steal_before = machine_cpu()
    children_before = children_cpu()
    started = time.perf_counter()
    process = children.start(argv, core=cores, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=duration + 60)
    finally:
        children.stop(process)
    wall = time.perf_counter() - started
    system.check_workers()
    cpu_after = {name: cpu_seconds(pid) for name, pid in system.pids.items()}
    busy_after, steal_after = machine_cpu()
    wrk_cpu = children_cpu() - children_before
    text = output.decode("utf-8", "replace")
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed (status {process.returncode}):\n{text[-2000:]}")
    server_cpu = {name: cpu_after[name] - cpu_before[name] for name in system.pids}
    busy = busy_after - busy_before - sum(server_cpu.values()) - wrk_cpu
    return Sample(
        wrk=parse_wrk(text),
        wall_seconds=wall,
        server_cpu=server_cpu,
        wrk_cpu=wrk_cpu,
        other_cores=max(0.0, busy) / wall,
        steal_cores=(steal_after - steal_before) / wall,
    )


@dataclass
class Cell:
    """Every measured run of one system."""

    system: System
    samples: list[Sample] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(s.wrk.requests for s in self.samples)

    @property
    def seconds(self) -> float:
        return sum(s.wrk.seconds for s in self.samples)

    @property
    def wall_seconds(self) -> float:
        return sum(s.wall_seconds for s in self.samples)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def transfer(self) -> float:
        seconds = self.seconds
        return sum(s.wrk.bytes_read for s in self.samples) / seconds if seconds else 0.0

    def cpu(self, name: str | None = None) -> float:
        """Server CPU seconds over every run, of all processes, one, or those named ``name*``."""
        if name is None:
            return sum(s.cpu_total for s in self.samples)
        if name in self.system.pids:
            return sum(s.server_cpu[name] for s in self.samples)
        return sum(
            cpu
            for s in self.samples
            for process, cpu in s.server_cpu.items()
            if process.startswith(name)
        )

    def cpu_per_kilo(self, name: str | None = None) -> float:
        requests = self.requests
        return self.cpu(name) / requests * 1000 if requests else math.nan

    def requests_per_cpu_second(self) -> float:
        cpu = self.cpu()
        return self.requests / cpu if cpu else math.nan

    def cores(self, name: str | None = None) -> float:
        wall = self.wall_seconds
        return self.cpu(name) / wall if wall else 0.0

    @property
    def wrk_load(self) -> float:
        wall = self.wall_seconds
        return sum(s.wrk_cpu for s in self.samples) / wall if wall else 0.0

    @property
    def other_cores(self) -> float:
        wall = self.wall_seconds
        return sum(s.other_cores * s.wall_seconds for s in self.samples) / wall if wall else 0.0

    @property
    def steal_cores(self) -> float:
        wall = self.wall_seconds
        return sum(s.steal_cores * s.wall_seconds for s in self.samples) / wall if wall else 0.0

    def latency_ms(self, percentile: float, combine: Callable[[list[float]], float]) -> float:
        values = [s.wrk.latency[percentile] * 1000 for s in self.samples]
        return combine(values) if values else math.nan

    @property
    def bytes_per_response(self) -> float:
        requests = self.requests
        return sum(s.wrk.bytes_read for s in self.samples) / requests if requests else math.nan

    @property
    def bad_status(self) -> int:
        return sum(s.wrk.bad_status for s in self.samples)

    @property
    def socket_errors(self) -> int:
        return sum(s.wrk.socket_errors for s in self.samples)

    def size_ok(self, connections: int) -> bool:
        """Whether wrk read whole responses of the expected size, and nothing else.

        wrk counts every byte it read, also of the (at most one per connection)
        responses still arriving when a run stopped, so the bytes read lie
        between requests x expected and that plus one response per connection.
        """
        expected = self.system.expected_bytes
        least = self.requests * expected
        most = least + connections * len(self.samples) * expected
        read = sum(s.wrk.bytes_read for s in self.samples)
        return self.requests > 0 and least <= read <= most


# -- py-spy ---------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    samples: int
    rate: int
    seconds: float
    requests: int
    self_counts: Counter[str]
    inclusive_counts: Counter[str]


def _frame_name(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``func (path/file.py)``: line numbers merged."""
    return re.sub(r":\d+\)$", ")", frame)


def _is_python(frame: str) -> bool:
    return frame.endswith(".py)")


def read_collapsed(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    """Samples, and per frame its self and inclusive samples, from py-spy's raw output.

    A native innermost frame (a libc or C-extension function) is shown with
    the nearest Python frame that led to it, which says what it was for.
    """
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";")]
        total += count
        leaf = frames[-1]
        if not _is_python(leaf):
            caller = next((f for f in reversed(frames) if _is_python(f)), "")
            if caller:
                leaf = f"{leaf}  <- {caller}"
        own[leaf] += count
        for frame in set(frames):
            inclusive[frame] += count
    return total, own, inclusive


def profile_gateway(
    children: Children,
    py_spy: str,
    wrk: Wrk,
    gateway: System,
    args: argparse.Namespace,
    workdir: Path,
) -> Profile:
    """Sample the gateway with py-spy while wrk loads it as in the comparison."""
    seconds = math.ceil(args.profile_seconds)
    rate: int = args.profile_rate
    lead = 1  # wrk runs this long before and after the sampling
    output = workdir / "gateway.py-spy.txt"
    load = children.start(
        wrk.argv(gateway.url, seconds + 2 * lead),
        core=args.client_cores,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(lead)
        spy = children.start(
            [
                py_spy,
                "record",
                "--pid",
                # With workers: the supervisor, and (--subprocesses) every worker.
                str(gateway.parent or gateway.pids["gateway"]),
                *(["--subprocesses"] if gateway.workers else []),
                "--duration",
                str(seconds),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--function",
                "--gil",
                "--native",
                "--output",
                str(output),
            ],
            core=args.client_cores,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            spy_output, _ = spy.communicate(timeout=seconds + 60)
        finally:
            children.stop(spy)
        wrk_output, _ = load.communicate(timeout=seconds + 60)
    finally:
        children.stop(load)
    if spy.returncode != 0 or not output.exists():
        raise RuntimeError(
            f"py-spy failed (status {spy.returncode}): "
            f"{spy_output.decode('utf-8', 'replace')[-2000:]}"
        )
    result = parse_wrk(wrk_output.decode("utf-8", "replace"))
    total, own, inclusive = read_collapsed(output)
    return Profile(
        samples=total,
        rate=rate,
        seconds=seconds,
        requests=round(result.requests / result.seconds * seconds) if result.seconds else 0,
        self_counts=own,
        inclusive_counts=inclusive,
    )


def print_profile(profile: Profile, gateway: Cell, args: argparse.Namespace) -> None:
    workers = (
        f" ({args.workers} workers and their supervisor: py-spy --subprocesses)"
        if args.workers > 1
        else ""
    )
    print(
        f"Profile of the gateway{workers} under the same load (py-spy --gil --native, "
        f"{profile.rate} samples/s for {profile.seconds:g} s, ~{profile.requests:,} requests): "
        f"{profile.samples:,} samples holding the GIL"
    )
    print(
        "py-spy samples wall-clock time. The gateway shares "
        f"{describe_cores(args.server_cores)} with the node, so time it "
        "spends preempted (mostly\ninside the write() that wakes the node) counts where it was; "
        "us/req = samples / rate / requests. Line numbers merged.\n"
        f"py-spy pauses the gateway to sample it: {profile.requests / profile.seconds:,.0f} req/s "
        f"while sampled against {gateway.throughput:,.0f} without, so us/req runs high; "
        "the shares hold."
    )
    if not profile.samples or not profile.requests:
        print("(no samples)")
        return
    scale = 1e6 / profile.rate / profile.requests

    def table(title: str, counts: Counter[str]) -> None:
        print()
        header = f"{'share':>7}{'us/req':>8}  {title}"
        print(header)
        print("-" * max(len(header), 60))
        for frame, count in counts.most_common(PROFILE_TOP):
            print(f"{count / profile.samples:>7.1%}{count * scale:>8.1f}  {frame}")

    table("self (innermost frame)", profile.self_counts)
    # Inclusive: frames of the event loop itself hold ~100% and say nothing; keep Python code.
    python_frames = Counter(
        {
            frame: count
            for frame, count in profile.inclusive_counts.items()
            if ".py)" in frame and count < 0.95 * profile.samples
        }
    )
    table("inclusive (Python frames with their callees)", python_frames)
    print()
    print(
        f"for scale: the comparison measured {gateway.cpu_per_kilo('gateway') * 1000:.0f} us of "
        f"gateway CPU and {gateway.cpu_per_kilo('node') * 1000:.0f} us of node CPU per request"
    )
    print()


# -- output ---------------------------------------------------------------------


def print_results(
    cells: dict[str, Cell],
    args: argparse.Namespace,
    image_text: str,
    wrk_version: str,
) -> None:
    ours, theirs = cells["imagecache"], cells["nginx"]
    print()
    print(
        f"Gateway cache hits against nginx: GET /image/<key> of {image_text}; "
        f"{wrk_version} -t{args.threads} -c{args.connections} --latency"
    )
    server_cores = describe_cores(args.server_cores)
    if args.workers > 1:
        shared = set(args.server_cores) == set(args.client_cores)
        placement = (
            f"servers on {server_cores} (imagecache = {args.workers} gateway workers, their "
            f"supervisor and the cache node;\nnginx = its master and {args.workers} workers, "
            f"listen reuseport), wrk on {describe_cores(args.client_cores)}"
            + (" too (no core is left for it alone)" if shared else "")
        )
    else:
        placement = (
            f"servers on {server_cores} (imagecache = gateway + its cache node), "
            f"wrk on {describe_cores(args.client_cores)}"
        )
    print(
        f"{args.rounds} rounds of {args.duration:g} s per system, systems in turn (A B A B), "
        f"after a {args.warmup:g} s warm-up each; "
        + (placement if args.pin else "NOTHING PINNED (fewer than 2 cores)")
    )
    print(
        "CPU s/1k = the server's utime+stime (/proc/PID/stat, all threads) per 1,000 responses; "
        f"cores = the same per second\n({len(args.server_cores):.2f}: {server_cores} saturated);"
        " wrk = wrk's CPU share of its "
        "core (near 100%: wrk-bound); other = cores busy with other\nprocesses meanwhile, "
        "steal = cores taken by the hypervisor (both near 0 on a quiet machine); "
        "B/resp = bytes read per response"
    )
    print()
    header = (
        f"{'run':<9}{'system':<12}{'req/s':>9}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}"
        f"{'p99.9':>8}{'max ms':>8}{'MB/s':>8}{'CPU s/1k':>10}{'cores':>7}{'wrk':>6}"
        f"{'other':>7}{'steal':>7}{'B/resp':>9}  errors"
    )
    print_table_header(header)
    for number in range(args.rounds):
        for name in ("imagecache", "nginx"):
            sample = cells[name].samples[number]
            result = sample.wrk
            errors = result.bad_status + result.socket_errors
            print(
                f"{f'round {number + 1}':<9}{name:<12}{result.requests_per_second:>9,.0f}"
                + "".join(f"{result.latency[p] * 1000:>8.2f}" for p in (50, 90, 99, 99.9))
                + f"{result.max_latency * 1000:>8.2f}"
                + f"{result.transfer_per_second / MIB:>8,.0f}{sample.cpu_per_kilo:>10.4f}"
                f"{sample.cpu_total / sample.wall_seconds:>7.2f}"
                f"{sample.wrk_cpu / sample.wall_seconds:>6.0%}{sample.other_cores:>7.2f}"
                f"{sample.steal_cores:>7.2f}"
                f"{result.bytes_read / max(result.requests, 1):>9,.0f}  {errors}"
            )
    print()
    header = (
        f"{'all rounds':<21}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'MB/s':>8}{'CPU s/1k':>10}"
        f"{'us/req':>8}{'cores':>7}{'wrk':>6}{'other':>7}{'B/resp':>9}{'expected':>10}  checks"
    )
    print_table_header(header)
    for name, cell in cells.items():
        checks = [
            f"{cell.bad_status} non-2xx/3xx",
            f"{cell.socket_errors} socket errors",
            f"size {'ok' if cell.size_ok(args.connections) else 'WRONG'}",
        ]
        print(
            f"{name:<21}{cell.throughput:>9,.0f}{cell.latency_ms(50, median):>8.2f}"
            f"{cell.latency_ms(99, max):>8.2f}{cell.transfer / MIB:>8,.0f}"
            f"{cell.cpu_per_kilo():>10.4f}{cell.cpu_per_kilo() * 1000:>8.1f}{cell.cores():>7.2f}"
            f"{cell.wrk_load:>6.0%}{cell.other_cores:>7.2f}{cell.bytes_per_response:>9,.0f}"
            f"{cell.system.expected_bytes:>10,}  {', '.join(checks)}"
        )
        if len(cell.system.pids) > 1:
            parts = list(cell.system.pids)
            if cell.system.workers and name == "imagecache":
                parts.insert(0, "gateway, in all")
            for process in parts:
                part = "gateway" if process == "gateway, in all" else process
                print(
                    f"  {process:<19}{'':>9}{'':>8}{'':>8}{'':>8}"
                    f"{cell.cpu_per_kilo(part):>10.4f}{cell.cpu_per_kilo(part) * 1000:>8.1f}"
                    f"{cell.cores(part):>7.2f}"
                )
    print("(p50: median of the rounds' p50; p99: the worst round's p99)")
    print()
    if args.workers > 1:
        print(
            "requests per second of server CPU (responses / CPU seconds of every server "
            "process above, over all rounds):"
        )
        for name, cell in cells.items():
            print(
                f"  {name:<19}{cell.requests_per_cpu_second():>9,.0f}  "
                f"({cell.requests:,} responses / {cell.cpu():.2f} CPU s of "
                f"{', '.join(cell.system.pids)})"
            )
        print()

    throughput = ratio_of(ours.throughput, theirs.throughput)
    per_cpu = ratio_of(theirs.cpu_per_kilo(), ours.cpu_per_kilo())
    if args.workers > 1:
        print(
            f"Ratio imagecache / nginx, {args.workers} workers each (goal: requests per second "
            f"of server CPU at least {GOAL_PER_CPU:g}x nginx's)"
        )
        throughput_goal = ""
        per_cpu_goal = f">= {GOAL_PER_CPU:g}x  {verdict(per_cpu >= GOAL_PER_CPU)}"
    else:
        print(f"Ratio imagecache / nginx (goal: throughput at least {GOAL_RATIO:g}x nginx's)")
        throughput_goal = f">= {GOAL_RATIO:g}x  {verdict(throughput >= GOAL_RATIO)}"
        per_cpu_goal = (
            f"(>= {GOAL_RATIO:g}x  {verdict(per_cpu >= GOAL_RATIO)} at one saturated core)"
        )
    print()
    header = f"{'':<26}{'all rounds':>11}{'per round':>20}  goal"
    print_table_header(header)
    rows: list[tuple[str, float, Callable[[Sample], float], str]] = [
        (
            "throughput (req/s)",
            throughput,
            lambda s: s.wrk.requests_per_second,
            throughput_goal,
        ),
        (
            "requests per server CPU s",
            per_cpu,
            lambda s: 1 / s.cpu_per_kilo,
            per_cpu_goal,
        ),
        (
            "server CPU per request",
            ratio_of(ours.cpu_per_kilo(), theirs.cpu_per_kilo()),
            lambda s: s.cpu_per_kilo,
            "",
        ),
        (
            "p50 latency",
            ratio_of(ours.latency_ms(50, median), theirs.latency_ms(50, median)),
            lambda s: s.wrk.latency[50],
            "",
        ),
        (
            "p99 latency",
            ratio_of(ours.latency_ms(99, max), theirs.latency_ms(99, max)),
            lambda s: s.wrk.latency[99],
            "",
        ),
    ]
    for label, overall, figure, goal in rows:
        per_round = " ".join(
            f"{ratio_of(figure(a), figure(b)):.2f}"
            for a, b in zip(ours.samples, theirs.samples, strict=True)
        )
        print(f"{label:<26}{overall:>10.2f}x{per_round:>20}  {goal}")
    saturated = SATURATED_CORES * len(args.server_cores)
    unsaturated = [name for name, cell in cells.items() if cell.cores() < saturated]
    if unsaturated:
        print(
            f"NOTE: {' and '.join(unsaturated)} used less than {SATURATED_CORES:.0%} of "
            f"{server_cores}: something else (wrk, other processes: see the wrk and other\n"
            "columns) held the throughput back, so the throughput ratio is not one of the "
            "servers' capacities. Requests per server CPU second\n(what each would serve with "
            f"the {'cores' if len(args.server_cores) > 1 else 'core'} to itself) compare them "
            "better."
        )
    print()


# -- the benchmark ------------------------------------------------------------------


def benchmark(children: Children, args: argparse.Namespace, workdir: Path) -> bool:
    """Run the comparison and print it; False when a response was wrong."""
    wrk_binary = _binary("wrk")
    _binary("nginx", "/usr/sbin/nginx")
    key = f"bench-{args.size // KIB}k" if args.size % KIB == 0 else f"bench-{args.size}"
    path = f"/image/{key}"
    image, (width, height) = noise_png(args.size, IMAGE_SEED, IMAGE_WIDTH)
    image_text = f"a {len(image):,} B PNG ({width}x{height} random pixels)"

    cores = args.server_cores
    node = start_node(children, workdir, cores)
    gateway, gateway_workers = start_gateway(children, workdir, node, args.workers, cores)
    nginx, nginx_workers = start_nginx(children, workdir, key, image, args.workers, cores)
    progress(
        f"node (pid {node.pid}) on port {node.port}; gateway (pid {gateway.pid}) on port "
        f"{gateway.port}; nginx (pid {nginx.pid}) on port {nginx.port}; files in {workdir}"
    )
    if args.workers > 1:
        progress(
            f"gateway workers: pids {', '.join(map(str, gateway_workers))}; "
            f"nginx workers: pids {', '.join(map(str, nginx_workers))}"
        )
    # The processes that answer on the gateway's port, each with counters of its own.
    gateway_servers = gateway_workers or [gateway.pid]

    upload(gateway.port, key, image)
    first = node_counters(node.port)
    gateway_response = check_response(gateway, path, image)
    nginx_response = check_response(nginx, path, image)
    after_check = node_counters(node.port)
    gateway_before = gateway_counters(gateway.port, gateway_servers)
    if after_check.get("get_hits", 0) - first.get("get_hits", 0) != 1:
        raise RuntimeError(f"the first GET after the upload was not a cache hit: {after_check}")
    for server, response in ((gateway, gateway_response), (nginx, nginx_response)):
        progress(
            f"GET {path} from {server.name}: {response.status}, {len(response.body):,} B equal to "
            f"the upload, {response.response_bytes:,} B on the wire; "
            + ", ".join(f"{n}: {v}" for n, v in response.headers if n.lower() != "date")
        )

    if gateway_workers:
        gateway_pids = {"gateway supervisor": gateway.pid} | {
            f"gateway worker {number}": pid for number, pid in enumerate(gateway_workers, 1)
        }
        nginx_pids = {"nginx master": nginx.pid} | {
            f"nginx worker {number}": pid for number, pid in enumerate(nginx_workers, 1)
        }
    else:
        gateway_pids, nginx_pids = {"gateway": gateway.pid}, {"nginx": nginx.pid}
    systems = {
        "imagecache": System(
            "imagecache",
            gateway.port,
            path,
            gateway_pids | {"node": node.pid},
            gateway_response.response_bytes,
            gateway.pid,
            tuple(gateway_workers),
            GATEWAY_WORKER,
        ),
        "nginx": System(
            "nginx",
            nginx.port,
            path,
            nginx_pids,
            nginx_response.response_bytes,
            nginx.pid,
            tuple(nginx_workers),
            NGINX_WORKER,
        ),
    }
    wrk_version = subprocess.run(
        [wrk_binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.split(" [")[0]
    script = workdir / "done.lua"
    script.write_text(WRK_SCRIPT)
    wrk = Wrk(wrk_binary, script, args.connections, args.threads)

    gateway_requests = 0
    if args.warmup > 0:
        for system in systems.values():
            sample = run_wrk(children, wrk, system, args.warmup, args.client_cores)
            if system.name == "imagecache":
                gateway_requests += sample.wrk.requests
            progress(f"warm-up  {system.name:<11} {sample.wrk.requests_per_second:>9,.0f} req/s")

    cells = {name: Cell(system) for name, system in systems.items()}
    for number in range(1, args.rounds + 1):
        for name, system in systems.items():  # A B A B: the systems take turns
            sample = run_wrk(children, wrk, system, args.duration, args.client_cores)
            cells[name].samples.append(sample)
            if name == "imagecache":
                gateway_requests += sample.wrk.requests
            errors = sample.wrk.bad_status + sample.wrk.socket_errors
            progress(
                f"round {number}/{args.rounds}  {name:<11} {sample.wrk.requests_per_second:>9,.0f}"
                f" req/s  p99 {sample.wrk.latency[99] * 1000:.2f} ms"
                f"  {sample.cpu_per_kilo:.4f} CPU s/1k"
                f"  wrk {sample.wrk_cpu / sample.wall_seconds:.0%}"
                f"  other {sample.other_cores:.2f} cores" + (f"  ERRORS {errors}" if errors else "")
            )
    last = node_counters(node.port)
    gateway_after = gateway_counters(gateway.port, gateway_servers)

    print_results(cells, args, image_text, wrk_version)

    def gateway_delta(name: str, pid: int | None = None) -> int:
        """A counter's growth over the runs, in one gateway process or summed over all."""
        name = f"imagecache_gateway_{name}_total"
        return round(
            sum(
                gateway_after[server].get(name, 0) - gateway_before[server].get(name, 0)
                for server in gateway_servers
                if pid in (None, server)
            )
        )

    # The gateway counts a hit per request; the node counts one per lookup,
    # and hot keys' requests share their version CHECKs (src/imagecache/fastpath.py).
    hits, misses = gateway_delta("cache_hits"), gateway_delta("cache_misses")
    served, checks = gateway_delta("fast_path_served"), gateway_delta("version_checks")
    node_misses = last.get("get_misses", 0) - after_check.get("get_misses", 0)
    node_lookups = last.get("cmd_get", 0) - after_check.get("cmd_get", 0)
    # wrk leaves up to one request per connection unanswered at the end of a run.
    all_hits = misses == 0 and node_misses == 0 and hits >= gateway_requests
    responses_ok = all(
        cell.bad_status == 0 and cell.socket_errors == 0 and cell.size_ok(args.connections)
        for cell in cells.values()
    )
    print(
        f"checks: a GET of {path} returned the uploaded {len(image):,} bytes from both "
        "(status 200, image/png); during the runs wrk saw "
        + (
            "only whole responses of the expected size, no error status, no socket error"
            if responses_ok
            else "WRONG RESPONSES (see the table)"
        )
    )
    print(
        f"        the gateway counted {hits:,} cache hits and {misses:,} misses for wrk's "
        f"{gateway_requests:,} completed requests (the node: {node_misses:,} misses): "
        + ("every one was a cache hit" if all_hits else "NOT ALL CACHE HITS")
    )
    print(
        f"        {served:,} answered by the fast path from the gateway's kept copy, after "
        f"{checks:,} version CHECKs with the node ({node_lookups:,} node lookups in all)"
    )
    if gateway_workers:
        # The kernel spreads connections over the workers (by a hash of their addresses),
        # so wrk's 16 connections need not split evenly.
        print(
            "        (summed over the gateway's workers, each read apart with GET /metrics) "
            "per worker:"
        )
        for number, pid in enumerate(gateway_workers, 1):
            worker_hits = gateway_delta("cache_hits", pid)
            print(
                f"          worker {number} (pid {pid}): {worker_hits:,} cache hits "
                f"({ratio_of(worker_hits, hits):.0%}), {gateway_delta('fast_path_served', pid):,}"
                f" by the fast path, {gateway_delta('version_checks', pid):,} CHECKs, "
                f"{gateway_delta('fast_path_handed_over', pid):,} connections handed to aiohttp"
            )
    print()
    sys.stdout.flush()

    if args.py_spy:
        progress(f"profiling the gateway for {args.profile_seconds:g} s with {args.py_spy}")
        try:
            profile = profile_gateway(
                children, args.py_spy, wrk, systems["imagecache"], args, workdir
            )
        except (RuntimeError, ValueError) as error:
            progress(f"profile abandoned: {error}")
        else:
            print_profile(profile, cells["imagecache"], args)
    return responses_ok and all_hits


def place_on_cores(args: argparse.Namespace, servers: int) -> Children:
    """Children pinned as the comparisons run: the servers on the first
    ``servers`` usable cores, wrk on the next one or, when none is left, on
    those same cores (the fairest left: both systems share them with wrk
    alike; bench/README.md). Sets ``args.server_cores``, ``client_cores``, ``pin``."""
    available = sorted(os.sched_getaffinity(0))
    args.server_cores = tuple(available[:servers])
    args.client_cores = (available[servers],) if len(available) > servers else args.server_cores
    args.pin = pin_load_generator(args.client_cores, len(available))
    return Children(args.pin)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of A B (2)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway workers (imagecache gateway --workers N) and nginx worker_processes, "
        "both on the first N cores (1)",
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of unmeasured wrk per system first (2)"
    )
    parser.add_argument(
        "--size", type=parse_size, default=100 * KIB, help="image file size, about (100K)"
    )
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="afterwards, profile the gateway under the same load with this py-spy binary",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=10.0, help="--py-spy: seconds sampled (10)"
    )
    parser.add_argument(
        "--profile-rate", type=int, default=100, help="--py-spy: samples per second (100)"
    )
    args = parser.parse_args(argv)
    if min(args.rounds, args.connections, args.threads, args.profile_rate) < 1 or not (
        args.duration >= 1 and args.warmup >= 0 and args.profile_seconds >= 1
    ):
        parser.error("--rounds, --connections, --threads must be positive, durations at least 1 s")
    if args.threads > args.connections:
        parser.error("wrk needs at least one connection per thread")

    usable = len(os.sched_getaffinity(0))
    if not 1 <= args.workers <= max(1, usable):
        parser.error(f"--workers must be from 1 to the number of usable cores ({usable})")
    children = place_on_cores(args, args.workers)
    return run_guarded(
        lambda directory: 0 if benchmark(children, args, directory) else 1,
        prefix="bench-gateway-",
        cleanup=children.close,
        stopped="every server stopped",
        on_failure=lambda directory: show_log_tails(
            directory, "node.log", "gateway.log", "nginx/error.log"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
