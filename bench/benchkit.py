"""What the benchmark scripts share: child processes pinned to cores, and /proc readings.

Imported by bench/node.py, bench/gateway.py and bench/resize.py (run as scripts,
so this folder is on sys.path).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Final

HOST: Final = "127.0.0.1"
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


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
    return [sys.executable, "-m", "imagecache"]


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
