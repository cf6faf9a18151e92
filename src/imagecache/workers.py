"""Gateway workers: ``--workers N`` runs N gateway processes on one port, supervised.

Each worker is a whole gateway (its own event loop, application, fast path
and background loops) in a process of its own, ``python -m launcher
gateway-worker``. Every worker listens on the gateway's port with SO_REUSEPORT,
and the kernel spreads new connections over them. The parent process only
supervises (beside the manager, under ``imagecache up``):

- it checks that the port is free, starts the workers and returns once every
  one listens; a worker that fails to start stops them all (its log says why);
- a worker that exits on its own is started again, after 0.5 s, doubling up
  to 30 s while it keeps dying young, so a crash loop does not spin;
- stopping sends every worker SIGTERM, and SIGKILL to any still there after
  STOP_GRACE_SECONDS.

Parent and worker talk over a socket pair that is the worker's standard
input. The parent sends the worker's configuration (a pickled Config, so that
every worker, restarted ones too, runs exactly the parent's configuration and
made-up secrets); the worker answers ``ready`` once it listens; and the end of
the channel tells the worker that its parent is gone, even when the parent was
killed with SIGKILL: the worker then stops as on SIGTERM, so none outlives
its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import secrets
import signal
import socket
import stat
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import replace

from imagecache.config import Config, ConfigError

log = logging.getLogger(__name__)

MAX_DEFAULT_WORKERS = 4  # `up` shares the machine with the manager, the nodes and SQLite
START_SECONDS = 60.0  # a worker that does not listen by then failed to start
STOP_GRACE_SECONDS = 10.0  # a worker asked to stop is killed after this
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_SECONDS = 10.0  # a worker that ran this long is restarted after FIRST_RESTART_DELAY

READY = b"ready\n"
_LENGTH = struct.Struct("!Q")


class WorkerError(Exception):
    """A gateway worker failed to start; its own log says why."""


def default_workers() -> int:
    """``up``'s number of workers: one per core, at most MAX_DEFAULT_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


def restart_delay(previous: float | None, lived: float) -> float:
    """Seconds to wait before starting again a worker that exited after ``lived`` seconds.

    ``previous`` is the delay waited before its last start (None: none).
    """
    if previous is None or lived >= STABLE_SECONDS:
        return FIRST_RESTART_DELAY
    return min(previous * 2, MAX_RESTART_DELAY)


@contextlib.asynccontextmanager
async def running(config: Config, count: int) -> AsyncIterator[GatewayWorkers]:
    """``count`` gateway workers listening on ``config``'s gateway port for the block.

    Raises ConfigError when the port is taken and WorkerError when a worker
    fails to start (the others are stopped).
    """
    workers = GatewayWorkers(config, count)
    await workers.start()
    try:
        yield workers
    finally:
        await workers.stop()


class GatewayWorkers:
    """``count`` worker processes of the gateway of ``config``, kept running until stopped."""

    def __init__(self, config: Config, count: int) -> None:
        if not config.gateway.secret_key:
            # One key for all of them: a flash cookie set by one worker is read by another.
            gateway = replace(config.gateway, secret_key=secrets.token_urlsafe(32))
            config = replace(config, gateway=gateway)
        self._config = config
        self.count = count
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start every worker; return once all of them listen."""
        gateway = self._config.gateway
        check_port_free(gateway.host, gateway.port)
        loop = asyncio.get_running_loop()
        listening = [loop.create_future() for _ in range(self.count)]
        self._tasks = [
            asyncio.create_task(self._keep_running(index, first_start))
            for index, first_start in enumerate(listening, start=1)
        ]
        try:
            await asyncio.gather(*listening)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every worker (SIGTERM, SIGKILL after the grace period); return once all exited."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _keep_running(self, index: int, first_start: asyncio.Future[None]) -> None:
        """Run worker ``index``, and again whenever it exits, until cancelled."""
        loop = asyncio.get_running_loop()
        delay: float | None = None
        while True:
            started = loop.time()
            worker = await _Worker.start(self._config)
            try:
                listening = await worker.listening()
                if listening:
                    if not first_start.done():
                        first_start.set_result(None)
                    log.info("gateway worker %d listening (pid %d)", index, worker.pid)
                    await worker.process.wait()
            finally:
                await worker.stop()
            if listening:
                how = worker.end()
            elif worker.late:
                how = f"did not listen within {START_SECONDS:g} s"
            else:
                how = f"did not start ({worker.end()})"
            if not first_start.done():
                first_start.set_exception(
                    WorkerError(f"gateway worker {index} of {self.count} {how}; see its log")
                )
                return
            lived = loop.time() - started
            delay = restart_delay(delay, lived)
            log.warning(
                "gateway worker %d (pid %d) %s after %.1f s; starting it again in %g s",
                index,
                worker.pid,
                how,
                lived,
                delay,
            )
            await asyncio.sleep(delay)


class _Worker:
    """One worker process and the parent's end of its channel."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.process = process
        self.pid = process.pid
        self._reader = reader
        self._writer = writer
        self.late = False  # it did not listen within START_SECONDS

    @classmethod
    async def start(cls, config: Config) -> _Worker:
        """A new worker process, sent its configuration."""
        parent_end, worker_end = socket.socketpair()
        with worker_end:
            try:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "launcher",
                    "--log-level",
                    logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                    "gateway-worker",
                    stdin=worker_end.fileno(),
                )
            except BaseException:
                parent_end.close()
                raise
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent_end)
        except BaseException:
            parent_end.close()
            with contextlib.suppress(ProcessLookupError):
                process.kill()  # its channel ended, so it stops anyway
            raise
        worker = cls(process, reader, writer)
        payload = pickle.dumps(config)
        writer.write(_LENGTH.pack(len(payload)) + payload)
        return worker

    async def listening(self) -> bool:
        """Whether the worker said it listens (False: it exited, or not within START_SECONDS)."""
        try:
            line = await asyncio.wait_for(self._reader.readline(), START_SECONDS)
        except TimeoutError:
            self.late = True
            return False
        except OSError:
            return False
        return line == READY

    def end(self) -> str:
        """How the process ended, for the log."""
        code = self.process.returncode
        if code is None:
            return "still running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    async def stop(self) -> None:
        """SIGTERM, and SIGKILL after STOP_GRACE_SECONDS; return once the process exited."""
        try:
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.terminate()
                try:
                    await asyncio.wait_for(self.process.wait(), STOP_GRACE_SECONDS)
                except TimeoutError:
                    log.warning(
                        "gateway worker (pid %d) still running %g s after SIGTERM; killing it",
                        self.pid,
                        STOP_GRACE_SECONDS,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        self.process.kill()
                    await self.process.wait()
        except asyncio.CancelledError:  # no time left to wait: never leave it running
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            raise
        finally:
            self._writer.close()


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError unless nothing listens on host:port.

    SO_REUSEPORT would let the workers join a port that another gateway with
    workers already listens on; so the parent tries it without, first.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            # As the workers bind: a port that only closed connections hold is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as error:
                raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from error


class ParentLink:
    """A worker's end of its channel to the parent: its standard input."""

    def __init__(self, channel: socket.socket) -> None:
        self._channel = channel

    @classmethod
    def from_stdin(cls) -> ParentLink:
        """The channel; raises ConfigError when standard input is not one (run by hand)."""
        try:
            is_socket = stat.S_ISSOCK(os.fstat(0).st_mode)
        except OSError:
            is_socket = False
        if not is_socket:
            raise ConfigError(
                "gateway-worker is started by `imagecache gateway --workers N` or `imagecache up`"
            )
        return cls(socket.socket(fileno=0))

    def receive_config(self) -> Config:
        """The configuration the parent sent (blocking: call it before the event loop runs)."""
        length = _LENGTH.unpack(self._receive_exactly(_LENGTH.size))[0]
        config = pickle.loads(self._receive_exactly(length))
        if not isinstance(config, Config):
            raise ConfigError("the parent sent no configuration")
        return config

    def _receive_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self._channel.recv(size - len(data))
            if not chunk:
                raise ConfigError("the parent closed the channel before sending the configuration")
            data += chunk
        return bytes(data)

    async def say_listening(self) -> None:
        """Tell the parent this worker listens (nothing if the parent is gone)."""
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(self._channel, READY)

    @contextlib.asynccontextmanager
    async def stop_requests(self) -> AsyncIterator[asyncio.Event]:
        """An event set at SIGINT, SIGTERM or the parent's end, for the duration of the block.

        Once it is set, the worker has STOP_GRACE_SECONDS to exit before SIGALRM
        ends it, so that nothing can keep an orphan alive.
        """
        loop = asyncio.get_running_loop()
        self._channel.setblocking(False)
        stopping = asyncio.Event()

        def stop() -> None:
            if not stopping.is_set():
                stopping.set()
                signal.alarm(math.ceil(STOP_GRACE_SECONDS))

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop)
        watcher = asyncio.create_task(self._until_parent_gone())
        watcher.add_done_callback(lambda task: None if task.cancelled() else stop())
        try:
            yield stopping
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self._channel.close()

    async def _until_parent_gone(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not await loop.sock_recv(self._channel, 4096):
                    break
            except OSError:
                break
        log.warning("the supervising process is gone; stopping")
