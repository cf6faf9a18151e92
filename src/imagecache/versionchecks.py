"""Whether a kept copy may be served: its node's word on the key's version.

The fast path (``fastpath``) serves a kept copy (``keptcopies``) only while
the key's cache node vouches for the copy's version: under a read lease the
node granted, or else once a CHECK sent after the request arrived confirms
it. This module holds the leases and the CHECKs, shared by the requests that
may share them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cachenode.client import read_lease_of
from cachenode.protocol import Frame
from cachenode.status import Status
from imagecache.cachepool import LEASE_CLOCK_SHARE, CachePool, PoolMember

if TYPE_CHECKING:  # fastpath imports this module
    from imagecache.fastpath import FastPathCounters

log = logging.getLogger(__name__)

# What a CHECK told: the node's version of the key, None when it holds no
# item, or NO_ANSWER when the node failed or did not answer in time.
NO_ANSWER = -1
VersionCallback = Callable[[int | None], None]
# A request waiting for a CHECK: the version of the copy it would be served, and who to tell.
Waiter = tuple[int, VersionCallback]
# Reads served under read leases are reported to their nodes (as CHECK's
# count of reads), so that the nodes' hit rates stay true, at least this often.
REPORT_SECONDS = 1.0


@dataclass(slots=True)
class ReadLease:
    """A node's word that ``version`` of a key stays its current one until
    ``until`` (on this process's monotonic clock, with the margin taken)."""

    version: int
    node: PoolMember  # the node that granted it
    view: int  # the pool's view generation when it was asked for
    until: float
    reads: int = 0  # served under it and not yet reported to the node


class VersionChecks:
    """CHECKs of keys' versions with their nodes, shared by requests that may share them.

    A request may rely on a read lease (cachenode.readleases) that still
    holds, or else on a CHECK sent after it arrived. So per key, one CHECK is
    in flight for the requests that came before it was sent; those arriving
    meanwhile wait for the next one, sent when it returns (when none can be
    sent then, they get NO_ANSWER, never the earlier one's). Each CHECK asks for
    a read lease, under which the key's requests are answered at once: a hot
    key costs one round trip per lease, whatever its request rate.

    Why a lease is never stale: the node counts it from when it answered the
    CHECK, this side from before it sent it, for ``LEASE_CLOCK_SHARE`` of its
    time; whoever invalidates the key waits out what the node reports before
    acknowledging (``CachePool.invalidate``). A lease taken under another view
    of the pool (a membership change, a node marked dirty) or from a node that
    no longer serves the key is not used.
    """

    def __init__(
        self,
        pool: CachePool,
        timeout: float,
        counters: FastPathCounters,
        read_lease_seconds: float = 0.0,
    ) -> None:
        # Kept: asyncio.get_running_loop() costs a getpid() system call each time.
        self._loop = asyncio.get_running_loop()
        self._pool = pool
        self._timeout = timeout
        self._counters = counters
        self._lease_ms = round(read_lease_seconds * 1000)
        # key -> who waits for the CHECK in flight, which names the last one's
        # copy (the newest: a request finds the copy kept when it arrives)
        self._in_flight: dict[str, list[Waiter]] = {}
        self._next: dict[str, list[Waiter]] = {}  # key -> who waits for the next
        self._leases: dict[str, ReadLease] = {}
        self._report_timer: asyncio.TimerHandle | None = None

    def leased(self, key: str, version: int) -> bool:
        """Whether a read of ``version`` of ``key`` may be answered now, under a read lease."""
        lease = self._leases.get(key)
        if lease is None or lease.version != version:
            return False
        now = time.monotonic()
        # Under the same view, the node that granted the lease still owns the key.
        if (
            now >= lease.until
            or lease.view != self._pool.view_generation
            or not self._pool.may_read(lease.node, now)
        ):
            return False
        lease.reads += 1
        return True

    def ask(self, key: str, version: int, callback: VersionCallback) -> bool:
        """Call ``callback`` with what a CHECK of ``key`` sent from now on tells
        of the copy of ``version``; False when no node can be asked without
        waiting (then it is never called)."""
        if key in self._in_flight:
            self._next.setdefault(key, []).append((version, callback))
            return True
        if not self._send(key, version, 1):
            return False
        self._in_flight[key] = [(version, callback)]
        return True

    def close(self) -> None:
        """Report the reads served under leases, and stop."""
        self._report()
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None

    def _send(self, key: str, version: int, requests: int) -> bool:
        """A CHECK of ``key`` for ``requests`` reads of its copy of ``version``.

        The reads already served under a lease are reported apart
        (``_report``): this CHECK counts as hits only if the node still holds
        that version, and those were hits whatever it holds now.
        """
        node = self._pool.usable_owner(key)
        if node is None:
            return False
        sent_at = time.monotonic()
        view = self._pool.view_generation
        check = node.client.check_soon(key.encode(), requests, self._lease_ms, version)
        if check is None:
            return False
        self._counters.checks += 1
        timeout = self._loop.call_later(self._timeout, check.cancel)
        check.add_done_callback(
            lambda done: self._answered(key, done, timeout, node, view, sent_at)
        )
        return True

    def _answered(
        self,
        key: str,
        check: asyncio.Future[Frame],
        timeout: asyncio.TimerHandle,
        node: PoolMember,
        view: int,
        sent_at: float,
    ) -> None:
        timeout.cancel()
        version: int | None = NO_ANSWER
        if not check.cancelled() and check.exception() is None:
            reply = check.result()
            version = reply.version if reply.status == Status.OK else None
            self._take_lease(key, reply, node, view, sent_at)
        answered = self._in_flight.pop(key)
        if version not in (None, NO_ANSWER, answered[-1][0]):
            # Requests for a copy kept meanwhile, of the version the node holds:
            # served, but this CHECK (naming another) did not count them.
            self._report_reads(node, key, sum(1 for v, _ in answered if v == version))
        waiting = self._next.pop(key, None) or []
        # After a failure the waiting requests go the full way at once, which
        # reads around the node, rather than waiting on it once more.
        if waiting and version != NO_ANSWER:
            newest = waiting[-1][0]
            if self._send(key, newest, sum(1 for v, _ in waiting if v == newest)):
                self._in_flight[key] = waiting
                waiting = []
        # Requests still waiting arrived after this CHECK was sent, so its
        # answer cannot vouch for them (an upload acknowledged meanwhile may
        # have outdated it): with no CHECK of their own, they get no word.
        told = [(callback, version) for _, callback in answered]
        told += [(callback, NO_ANSWER) for _, callback in waiting]
        for callback, word in told:
            try:
                callback(word)
            except Exception:  # one connection's failure must not strand the others
                log.exception("fast path: answering a request failed")

    def _take_lease(
        self, key: str, reply: Frame, node: PoolMember, view: int, sent_at: float
    ) -> None:
        granted = read_lease_of(reply) if reply.status == Status.OK else 0.0
        if granted <= 0:
            self._leases.pop(key, None)
            return
        previous = self._leases.get(key)
        self._leases[key] = ReadLease(
            reply.version,
            node,
            view,
            sent_at + granted * LEASE_CLOCK_SHARE,
            previous.reads if previous is not None else 0,
        )
        if self._report_timer is None:
            self._report_timer = self._loop.call_later(REPORT_SECONDS, self._report_and_again)

    def _report_and_again(self) -> None:
        self._report()
        self._report_timer = (
            self._loop.call_later(REPORT_SECONDS, self._report_and_again) if self._leases else None
        )

    def _report(self) -> None:
        """Tell nodes the reads served under their leases (as lookups that hit,
        best effort), and forget leases that have ended."""
        now = time.monotonic()
        for key, lease in list(self._leases.items()):
            if lease.reads and self._report_reads(lease.node, key, lease.reads):
                lease.reads = 0
            if lease.until <= now and (not lease.reads or lease.view != self._pool.view_generation):
                del self._leases[key]

    def _report_reads(self, node: PoolMember, key: str, reads: int) -> bool:
        """Tell ``node`` of ``reads`` hits of ``key`` served without its count
        (a CHECK naming no version); False when it could not be sent now."""
        if not reads:
            return True
        report = node.client.check_soon(key.encode(), reads)
        if report is None:
            return False
        timeout = self._loop.call_later(self._timeout, report.cancel)
        report.add_done_callback(functools.partial(_settled, timeout))
        return True


def _settled(timeout: asyncio.TimerHandle, report: asyncio.Future[Frame]) -> None:
    """A report's reply (or failure, which changes nothing) has come."""
    timeout.cancel()
    if not report.cancelled():
        report.exception()  # retrieved: a failed report is not worth a log line
