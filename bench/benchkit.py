"""What the benchmark scripts share: child processes pinned to cores, /proc readings,
and the main() frame that stops every child on the way out.

Imported by every script in bench/ (run as scripts, so this folder is on sys.path);
each script keeps only what it measures and how it prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import http.client
import io
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, TypeVar

import uvloop
from PIL import Image

HOST: Final = "127.0.0.1"
KIB: Final = 1 << 10
MIB: Final = 1 << 20
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")

GATEWAY_WORKER: Final = "gateway-worker"  # in a gateway worker's command line
NODE_READY: Final = rb"cachenode listening on [0-9.]+:(\d+)"  # its port, when given 0
UP_BANNER: Final = "imagecache is up"
UP_START_TIMEOUT: Final = 60.0
UP_STOP_TIMEOUT: Final = 30.0
UP_PORT_SPAN: Final = 40  # free ports wanted from imagecache up's first node port up

T = TypeVar("T")


def _load_prctl() -> Callable[[int, int], int] | None:
    """libc's prctl, looked up before any fork (a forked child should only call it)."""
    try:
        function: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return function


_PRCTL: Final = _load_prctl()
PR_SET_PDEATHSIG: Final = 1


def die_with_parent() -> None:
    """Between fork and exec: SIGTERM to the child when this process dies."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


Cores = int | Collection[int]  # one core, or a set of them


def core_set(cores: Cores) -> set[int]:
    return {cores} if isinstance(cores, int) else set(cores)


def describe_cores(cores: Cores) -> str:
    """``core 0``, ``cores 0-1``, ``cores 0,2``."""
    ordered = sorted(core_set(cores))
    if len(ordered) == 1:
        return f"core {ordered[0]}"
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"cores {ordered[0]}-{ordered[-1]}"
    return "cores " + ",".join(map(str, ordered))


def child_setup(core: Cores | None) -> Callable[[], None]:
    """What a child runs between fork and exec: its CPUs, and death with this process."""
    cpus = None if core is None else core_set(core)

    def setup() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def imagecache_command() -> list[str]:
    script = Path(sys.executable).with_name("imagecache")
    if script.exists():
        return [str(script)]
    found = shutil.which("imagecache")
    if found is not None:
        return [found]
    return [sys.executable, "-m", "launcher"]


def node_argv(
    port: int, capacity_mb: float, *options: str, log_level: str = "WARNING"
) -> list[str]:
    """``imagecache node`` on HOST:``port`` (0: it picks one and says so: ``NODE_READY``)."""
    return [
        *imagecache_command(),
        "--log-level",
        log_level,
        "node",
        "--host",
        HOST,
        "--port",
        str(port),
        "--capacity-mb",
        f"{capacity_mb:g}",
        *options,
    ]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read()
    fields = text[text.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (a scan of /proc), in pid order."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                text = stat.read()
        except OSError:  # gone meanwhile
            continue
        if int(text[text.rindex(b")") + 2 :].split()[1]) == parent:
            found.append(int(entry))
    return sorted(found)


def command_line(pid: int) -> list[str]:
    """A process's argv (empty when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return [part.decode(errors="replace") for part in cmdline.read().split(b"\0") if part]
    except OSError:
        return []


def _socket_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the established TCP socket local_port <-> remote_port (/proc/net/tcp*)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)  # the header
                for row in rows:
                    fields = row.split()
                    local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                    if (
                        state == "01"  # ESTABLISHED
                        and int(local.rpartition(":")[2], 16) == local_port
                        and int(remote.rpartition(":")[2], 16) == remote_port
                    ):
                        return int(inode)
        except FileNotFoundError:
            continue
    return None


def socket_owner(local_port: int, remote_port: int, pids: Iterable[int]) -> int | None:
    """Which of ``pids`` holds the connection accepted on ``local_port`` from ``remote_port``.

    How to tell which of several processes listening on one port (SO_REUSEPORT)
    accepted a connection: its socket's inode, among their open files.
    """
    inode = _socket_inode(local_port, remote_port)
    if inode is None:
        return None
    link = f"socket:[{inode}]"
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(f"/proc/{pid}/fd/{descriptor}") == link:
                    return pid
            except OSError:
                continue
    return None


def get_from_each(
    port: int, path: str, pids: Collection[int], attempts: int = 0, timeout: float = 10.0
) -> dict[int, bytes]:
    """``GET path`` answered by each of ``pids``, processes that share ``port`` (SO_REUSEPORT).

    The kernel picks the process for each new connection (by a hash of its
    addresses), so this opens connections until every process has answered
    one, or ``attempts`` (default: 32 per process) are spent; each answer is
    told apart by the process that holds the connection's socket. Returns
    pid -> response body (status 200 only) for the processes reached.
    """
    answers: dict[int, bytes] = {}
    for _ in range(attempts or 32 * len(pids)):
        if len(answers) == len(pids):
            break
        connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
        try:
            connection.connect()
            assert connection.sock is not None
            client_port: int = connection.sock.getsockname()[1]
            connection.request("GET", path)  # HTTP/1.1: the connection stays open after it
            response = connection.getresponse()
            body = response.read()
            # Accepted (it answered) and still open: the owner holds its socket.
            owner = socket_owner(port, client_port, pids)
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"GET {path} answered {response.status}")
        if owner is not None and owner not in answers:
            answers[owner] = body
    return answers


def prometheus_values(text: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition, by name (labels included)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def machine_cpu() -> tuple[float, float]:
    """All cores' user+nice+system seconds and steal seconds since boot (/proc/stat)."""
    with open("/proc/stat", "rb") as stat:
        fields = stat.readline().split()
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(int, fields[1:9])
    return (user + nice + system) / CLOCK_TICKS, steal / CLOCK_TICKS


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_table_header(header: str) -> None:
    """A results table's column titles, underlined to their width."""
    print(header)
    print("-" * len(header))


def ratio_of(value: float, reference: float) -> float:
    if not reference or math.isnan(reference) or math.isnan(value):
        return math.nan
    return value / reference


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


class Terminated(SystemExit):
    """SIGTERM arrived: stop everything and exit with 143."""


def terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(128 + signum)


class Children:
    """Every process started through ``start``; ``close`` stops them all, newest first."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        core: Cores,
        stdout: int | IO[bytes] | None = None,
        stderr: int | IO[bytes] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            preexec_fn=child_setup(core if self.pin else None),
        )
        self._processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        if process in self._processes:
            self._processes.remove(process)

    def close(self) -> None:
        for process in reversed(list(self._processes)):
            self.stop(process)


@dataclass(frozen=True)
class Server:
    """A server under test: its name in the results, its port and its process id."""

    name: str
    port: int
    pid: int


def wait_until_listening(
    process: subprocess.Popen[bytes], port: int, what: str, timeout: float = 30.0
) -> None:
    """Return once ``process`` accepts connections on ``port``; raise if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} while starting")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} does not accept connections on port {port}") from None
            time.sleep(0.05)


def read_ready_line(
    process: subprocess.Popen[bytes], pattern: bytes, what: str, timeout: float = 30.0
) -> re.Match[bytes]:
    """Read the child's stdout until a line matches ``pattern`` (its "ready" line)."""
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        match = re.search(pattern, received)
        if match is not None:
            return match
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"{what} did not say it was ready within {timeout:g} s")
        readable, _, _ = select.select([descriptor], [], [], remaining)
        if readable:
            chunk = os.read(descriptor, 4096)
            if not chunk:
                process.wait(timeout=5)
                raise RuntimeError(f"{what} exited with status {process.returncode}")
            received += chunk


MEMCACHED_INSTALL_HINT: Final = "apt-get install -y memcached libmemcached-tools"


def memcached_binary() -> str:
    found = shutil.which("memcached")
    if found is None:
        print(
            f"memcached is not installed; install it with:\n    {MEMCACHED_INSTALL_HINT}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return found


def start_memcached(
    children: Children,
    memory_mb: int,
    largest_value: int,
    core: Cores,
    *,
    smallest_item_limit: int = 2 * MIB,
) -> Server:
    """``memcached -t 1`` on ``core`` and a free port of 127.0.0.1.

    Its item size limit (-I) must hold the largest value with its key and
    header: the first power of two from ``smallest_item_limit`` that does.
    memcached refuses a limit over half its memory, so ``memory_mb`` grows to
    twice the limit where it is less.
    """
    binary = memcached_binary()
    item_limit = smallest_item_limit
    while item_limit < largest_value + 64 * KIB:
        item_limit *= 2
    memory_mb = max(memory_mb, math.ceil(2 * item_limit / MIB))
    port = free_port()
    argv = [binary, "-l", HOST, "-p", str(port), "-U", "0", "-t", "1", "-c", "1024"]
    argv += ["-m", str(memory_mb), "-I", f"{item_limit // KIB}k"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    process = children.start(argv, core=core, stdout=subprocess.DEVNULL)
    wait_until_listening(process, port, "memcached", timeout=10)
    return Server("memcached", port, process.pid)


def pin_load_generator(cores: Cores, usable_cores: int) -> bool:
    """Pin this process (the load generator) to ``cores`` when 2 or more cores are usable.

    Returns whether the servers are to be pinned too (``Children(pin=...)``).
    """
    if usable_cores < 2:
        progress("fewer than 2 cores: nothing is pinned, figures are not comparable")
        return False
    os.sched_setaffinity(0, core_set(cores))
    return True


def parse_size(text: str) -> int:
    """An argparse type: ``100K``, ``1M``, ``512`` (bytes)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)[bB]?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1K, 100K, 1M)")
    size = int(match.group(1)) * {"": 1, "K": KIB, "M": MIB}[match.group(2).upper()]
    if size < 1:
        raise argparse.ArgumentTypeError("sizes must be positive")
    return size


def noise_png(size: int, seed: int, width: int) -> tuple[bytes, tuple[int, int]]:
    """A PNG of random pixels of about ``size`` bytes (noise does not compress), its dimensions."""
    # Each row is 3 bytes a pixel and a filter byte; the rest is a few chunk headers.
    height = max(1, round(size / (3 * width + 1)))
    pixels = random.Random(seed).randbytes(width * height * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buffer, format="PNG")
    return buffer.getvalue(), (width, height)


def run_on_uvloop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop; SIGTERM (like Ctrl-C) cancels the work cleanly instead of
    landing as an exception inside some protocol callback."""

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coroutine
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return uvloop.run(guarded())
    except asyncio.CancelledError:
        raise Terminated(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, terminate)


def show_tail(label: str, text: str, lines: int = 20) -> None:
    """The last ``lines`` lines of a child's output, on stderr, after a failure."""
    progress(f"{label} (last lines):")
    progress("\n".join(text.splitlines()[-lines:]))


def show_log_tails(directory: Path, *logs: str) -> None:
    """``show_tail`` of each of the files ``logs`` under ``directory`` that is not empty."""
    for log in logs:
        path = directory / log
        if path.exists() and path.stat().st_size:
            show_tail(log, path.read_text(errors="replace"))


def run_guarded(
    work: Callable[[Path], int],
    *,
    prefix: str,
    cleanup: Callable[[], None],
    stopped: str,
    on_failure: Callable[[Path], None] = lambda directory: None,
) -> int:
    """A benchmark's main frame: ``work(a temporary folder)``, its exit status.

    SIGTERM raises ``Terminated`` (exit 143) and Ctrl-C returns 130, also where the
    script was started ignoring SIGINT; an error runs ``on_failure`` (to show the
    children's logs) before it propagates; ``cleanup`` (stop every child) runs in
    every case, and a last line on stderr says the total time and ``stopped``.
    """
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started ignoring it
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as name:
            directory = Path(name)
            try:
                return work(directory)
            except KeyboardInterrupt:
                progress("interrupted")
                return 130
            except Terminated:
                progress("terminated")
                raise
            except SystemExit:
                raise
            except BaseException:
                on_failure(directory)
                raise
            finally:
                cleanup()
    finally:
        progress(f"total time {time.perf_counter() - started:.0f} s; {stopped}")


# -- imagecache up (bench/resize.py, bench/login_flood.py) -----------------------


def free_port_range(span: int, avoid: Sequence[int]) -> int:
    """A first port with ``span`` bindable ports after it (probed, best effort)."""
    for _ in range(100):
        first = free_port()
        if first + span >= 65000 or any(first <= p < first + span for p in avoid):
            continue
        ports = range(first, first + span)
        if all(can_bind(port) for port in ports):
            return first
    raise RuntimeError(f"no {span} free ports in a row on {HOST}")


def can_bind(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclass
class Up:
    """``imagecache up`` running in ``workdir``, its output in ``log``."""

    process: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    gateway_port: int
    manager_port: int
    first_node_port: int
    workers: int  # gateway processes; with one, the gateway runs in the up process itself

    @property
    def gateway(self) -> str:
        return f"http://{HOST}:{self.gateway_port}"

    @property
    def database(self) -> Path:
        return self.workdir / "imagecache-data" / "imagecache.db"

    def output(self, offset: int = 0) -> str:
        with open(self.log, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def output_size(self) -> int:
        return self.log.stat().st_size

    def gateway_processes(self) -> tuple[int, ...]:
        """The processes that serve the gateway's port, each with counters of its own."""
        if self.workers == 1:
            return (self.process.pid,)
        return tuple(
            pid
            for pid in child_pids(self.process.pid)
            if GATEWAY_WORKER in " ".join(command_line(pid))
        )


def start_up(workdir: Path, log_level: str, workers: int) -> Up:
    """Start ``imagecache up`` in ``workdir`` (its own process group) and wait for its banner."""
    gateway_port = free_port()
    manager_port = free_port()
    first_node_port = free_port_range(UP_PORT_SPAN, (gateway_port, manager_port))
    # Only this run's settings: no configuration file or variable of the caller's.
    env = {name: value for name, value in os.environ.items() if not name.startswith("IMAGECACHE_")}
    env |= {
        "PYTHONUNBUFFERED": "1",
        "IMAGECACHE_GATEWAY_HOST": HOST,
        "IMAGECACHE_GATEWAY_PORT": str(gateway_port),
        "IMAGECACHE_MANAGER_HOST": HOST,
        "IMAGECACHE_MANAGER_PORT": str(manager_port),
        "IMAGECACHE_FIRST_NODE_PORT": str(first_node_port),
        "IMAGECACHE_MANAGER_URL": f"http://{HOST}:{manager_port}",
    }
    log_path = workdir / "up.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*imagecache_command(), "--log-level", log_level, "up", "--workers", str(workers)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own process group: the nodes it starts can be found and stopped with it.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    up = Up(process, workdir, log_path, gateway_port, manager_port, first_node_port, workers)
    deadline = time.monotonic() + UP_START_TIMEOUT
    while UP_BANNER not in up.output():
        if process.poll() is not None:
            raise RuntimeError(f"imagecache up exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"imagecache up did not say {UP_BANNER!r} within {UP_START_TIMEOUT:g} s"
            )
        time.sleep(0.1)
    return up


class UpSlot:
    """``imagecache up`` once a benchmark's work started it: what ``run_guarded``'s
    ``cleanup`` stops and its ``on_failure`` shows."""

    def __init__(self) -> None:
        self.up: Up | None = None

    def start(self, workdir: Path, log_level: str, workers: int) -> Up:
        self.up = start_up(workdir, log_level, workers)
        return self.up

    def show_output(self, directory: Path) -> None:
        """After a failure: the last lines of what imagecache up said, if it was started."""
        if self.up is not None:
            show_tail("imagecache up", self.up.output(), lines=30)

    def stop(self) -> None:
        if self.up is not None:
            stop_up(self.up)


def stop_up(up: Up) -> None:
    """SIGTERM (it stops its nodes), then SIGKILL to its whole process group if need be."""
    if up.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            up.process.terminate()
        try:
            up.process.wait(timeout=UP_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            progress(f"imagecache up did not stop within {UP_STOP_TIMEOUT:g} s: killing it")
    # Its process group is its own (start_new_session): this reaches any node left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(up.process.pid, signal.SIGKILL)
    up.process.wait()
