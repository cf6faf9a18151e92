"""A child process that stops when its parent is gone, however the parent ended.

The parent (the manager's local pool) keeps the write end of a pipe on the
child's standard input and never writes to it. When the parent exits, even
by SIGKILL, the kernel closes that end and the child reads the end of the
file; it then stops as if it were sent SIGTERM. Unlike PR_SET_PDEATHSIG this
has no race with a parent that dies before the child has started watching,
and it is not tied to the thread that started the child.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)


class _EndWatcher(asyncio.Protocol):
    def __init__(self, ended: asyncio.Future[None]) -> None:
        self._ended = ended

    def data_received(self, data: bytes) -> None:
        pass  # the parent writes nothing; anything written changes nothing

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._ended.done():
            self._ended.set_result(None)


async def stop_when_stdin_ends() -> None:
    """Wait for the end of standard input, then SIGTERM this process."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.connect_read_pipe(lambda: _EndWatcher(ended), sys.stdin)
    try:
        await ended
    finally:
        transport.close()
    log.warning("the parent process is gone (standard input ended): stopping")
    os.kill(os.getpid(), signal.SIGTERM)
