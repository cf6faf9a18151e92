"""What the benchmark scripts share: child processes pinned to cores, and /proc readings.

Imported by bench/node.py, bench/gateway.py and bench/resize.py (run as scripts,
so this folder is on sys.path).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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


def child_setup(core: int | None) -> Callable[[], None]:
    """What a child runs between fork and exec: its CPU, and death with this process."""

    def setup() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})
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
        core: int,
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
