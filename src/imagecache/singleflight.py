"""One load per key at a time, shared only by readers whose answer it can be.

A load asks the cache and the catalog in turns (a lease, a row read): each is
a *probe*. A reader that arrives while a load is under way may only take an
answer that was asked for after it arrived: an upload acknowledged before the
reader arrived has by then changed the catalog and invalidated every node,
so an answer asked for later reflects it, and one asked for earlier may not,
whichever gateway the upload went through. A reader that the load's answer
came too early for asks again: it joins the next load, or starts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Flight:
    """One load under way; the load calls ``probe`` before each question it asks."""

    def __init__(self) -> None:
        self.probes = 0  # questions asked so far
        self.answered_by = 0  # the probe whose answer the load returned (or raised)

    def probe(self) -> None:
        """Call right before asking something whose answer the load may return."""
        self.probes += 1
        self.answered_by = self.probes


class SingleFlight(Generic[T]):
    """At most one load per key at a time; concurrent callers share its result
    when it was asked for after they arrived."""

    def __init__(self) -> None:
        self._flights: dict[str, tuple[Flight, asyncio.Future[T]]] = {}

    def running(self, key: str) -> bool:
        """Whether a load of ``key`` is under way (a caller now would join it)."""
        entry = self._flights.get(key)
        return entry is not None and not entry[1].done()

    async def run(self, key: str, load: Callable[[Flight], Awaitable[T]]) -> T:
        while True:
            entry = self._flights.get(key)
            flight, task = entry if entry and not entry[1].done() else self._start(key, load)
            arrived_after = flight.probes
            try:
                # Shielded: one caller giving up must not cancel the others' load.
                result = await asyncio.shield(task)
            except Exception:
                if flight.answered_by > arrived_after:
                    raise
            else:
                if flight.answered_by > arrived_after:
                    return result

    def _start(
        self, key: str, load: Callable[[Flight], Awaitable[T]]
    ) -> tuple[Flight, asyncio.Future[T]]:
        flight = Flight()
        task = asyncio.ensure_future(load(flight))
        self._flights[key] = (flight, task)
        task.add_done_callback(lambda done: self._finished(key, done))
        return flight, task

    def _finished(self, key: str, task: asyncio.Future[T]) -> None:
        entry = self._flights.get(key)
        if entry is not None and entry[1] is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone
