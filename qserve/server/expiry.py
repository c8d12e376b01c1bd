"""Expiries: the deadlines of an edge's connections kept as plain numbers, enforced by one task.

Why: a connection moves its deadline three times per request (none while the handler runs, the
write's bound, then the keep-alive wait). Each move of a trio `CancelScope.deadline` re-registers
the scope in trio's deadline heap (a context manager, a heap push, stale entries to prune later):
9.2 us for the three against 0.4 us for three attribute writes (a loop of 200,000 in one trio task
on this project's 2-vCPU VM); in py-spy, 5.1% of the event loop under ``wrk -c16``. Here a
connection writes a float (`Expiries.set`) and one task per server (`Expiries.run`) cancels the
scope of every connection whose time has come.

Exactness: an expiry is acted on at the same instant as trio's own deadline would be. The task
sleeps until the earliest expiry it saw when it last looked, or ``horizon`` seconds after that look
if sooner (``next``); setting an expiry earlier than that wakes it at once (`Expiries.set`), so
whatever it has not seen is later than the time it wakes at. ``horizon`` is the shortest timeout
the connections count from the moment they set it (the server's request and keep-alive timeouts):
their usual expiries are then never earlier than ``next`` and wake nobody. (Without it, a write's
30 s expiry came before the keep-alive 60 s ones the task had seen, and every few requests woke
it: 1.4% of the event loop under wrk -c16.) A fired expiry resets to infinity (one cancellation
per setting).

Cost and bounds: one look is O(open connections) (``max_connections``, 2048 by default), and the
task looks when the earliest expiry comes or an earlier one is set, at most once per `GRAIN`
seconds: an expiry can be acted on up to `GRAIN` late when several come within that span.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import trio

__all__ = ["Expiries", "Expiring", "GRAIN"]

GRAIN = 0.005   # seconds: the task looks at most this often (bounds its CPU at thousands of connections)


class Expiring(Protocol):
    """What `Expiries` watches: a connection with an ``expiry`` (trio time; inf: none)."""

    expiry: float

    def expired(self) -> None:
        """Its time has come: cancel what the expiry bounds (called by `Expiries.run`)."""


class Expiries:
    """The deadlines of ``watched`` (a live collection the server keeps: added and removed as
    connections come and go). Task-safe within one trio run; `run` is its one task."""

    def __init__(self, watched: Iterable[Expiring], horizon: float = math.inf) -> None:
        self._watched = watched
        self._horizon = horizon
        self.next = math.inf          # the earliest expiry seen at the last look, or set since
        self._poked = trio.Event()
        self.looks = 0                # how often `run` looked (for tests and statistics)

    def set(self, item: Expiring, when: float) -> None:
        """``item`` expires at ``when`` (trio time; inf: never), instead of whenever it was to."""
        item.expiry = when
        if when < self.next:   # earlier than the task will look: it must look now
            self.next = when
            self._poked.set()

    async def run(self) -> None:
        """Act on every expiry as it comes, until cancelled."""
        while True:
            now = trio.current_time()
            earliest = math.inf
            for item in self._watched:
                when = item.expiry
                if when <= now:
                    item.expiry = math.inf
                    item.expired()
                elif when < earliest:
                    earliest = when
            self.looks += 1
            self.next = earliest = min(earliest, now + self._horizon)
            with trio.move_on_at(max(earliest, now + GRAIN)):
                await self._poked.wait()
            if self._poked.is_set():
                self._poked = trio.Event()
                await trio.sleep_until(now + GRAIN)
