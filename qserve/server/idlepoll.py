"""IdlePoll: before trio's loop sleeps in ``epoll_wait``, it polls for readiness for a short,
adaptive while.

Why: a VM that halts an idle vCPU at once (a guest with ``cpuidle-haltpoll`` and
``guest_halt_poll_ns=0``, as the 2-vCPU VM of the README's figures) takes ~50 us to wake it for a
packet or a disk interrupt from the other CPU. A 1-byte TCP ping-pong over loopback between two
pinned processes took p50 77 us with the answering side asleep in ``recv`` and 24 us with it
polling a non-blocking socket (20,000 round trips each, twice). A consumer that commits what it
was sent comes back within ~0.5 ms; a put arrives while the previous one's fsync is running: the
loop would sleep and pay for the wake-up each time.

How: an instrument's ``before_io_wait`` runs right before the loop blocks. It polls trio's epoll fd
with `select.poll` (readable when the epoll set has events; polling it consumes none, so trio's
own ``epoll_wait`` then returns them at once), calling ``os.sched_yield`` between looks: any other
runnable thread of this CPU (the kernel's worker for an AIO fsync, another process) runs first, so
the poll spends CPU time nothing else here wants. ``after_io_wait`` measures the wait. (Sleeping in
the hook itself, to spare that second call, would need the loop woken at a deadline, and trio reads
a wait that returned events as "the timeout did not expire": an autojump clock stops jumping.)

Adaptive, like the guest kernel's haltpoll governor (Documentation/virt/guest-halt-polling.rst):
the window starts at 0; after each sleep the idle time (the poll plus the sleep) decides: within
``cap`` the window doubles (from `GROW_START`), beyond it the window halves (to 0 below
`GROW_START`). Arrivals spaced closer than ``cap`` are caught by the poll; a server whose gaps are
longer (an idle one, a consumer that works for milliseconds) stops polling after a few sleeps.

Bounds: the window never exceeds ``cap`` (``Config.idle_poll_us``, ``--idle-poll-us``; 0 never
polls). A deadline due inside the window means no poll (the loop sleeps to it as usual); otherwise,
when the window passes with nothing, trio's ``epoll_wait`` still sleeps its whole timeout after it,
so a timer can fire up to one window (at most ``cap``) late. Only with trio's epoll I/O manager
(Linux); elsewhere the instrument does nothing.
"""

from __future__ import annotations

import os
import select
import time
from typing import Callable

import trio

__all__ = ["IdlePoll", "GROW_START"]

GROW_START = 50e-6   # seconds: the window's first step up from 0 (haltpoll's guest_halt_poll_grow_start)


class IdlePoll(trio.abc.Instrument):
    """The instrument; `install` adds it to the running loop, `uninstall` removes it.

    Args:
        cap: the largest window, in seconds (> 0).
        clock: seconds, monotonic (tests pass a fake one).
        pause: called between two looks (``os.sched_yield``).

    Statistics: ``polls`` (polls begun), ``hits`` (ended by readiness), ``seconds`` (spent polling),
    ``window`` (the current one, seconds).
    """

    def __init__(self, cap: float, *, clock: Callable[[], float] = time.perf_counter,
                 pause: Callable[[], None] = getattr(os, "sched_yield", lambda: None)) -> None:
        if not cap > 0:
            raise ValueError("IdlePoll cap must be > 0")
        self.cap = cap
        self.window = 0.0
        self.polls = 0
        self.hits = 0
        self.seconds = 0.0
        self._clock = clock
        self._pause = pause
        self._look: Callable[[int], list] | None = None   # select.poll().poll over trio's epoll fd
        self._idle_from: float | None = None   # when the current wait began (None: not measured)

    def install(self) -> bool:
        """Watch the running loop's epoll set and add the instrument (call inside `trio.run`).
        Returns False, adding nothing, where the loop has no epoll fd or already has an `IdlePoll`
        (two servers in one run share the first one's)."""
        from trio._core import _run   # trio's runner: where its I/O manager keeps the epoll object

        runner = getattr(_run.GLOBAL_RUN_CONTEXT, "runner", None)
        epoll = getattr(getattr(runner, "io_manager", None), "_epoll", None)
        if epoll is None or any(isinstance(i, IdlePoll) for i in runner.instruments.get("before_io_wait", ())):
            return False
        poller = select.poll()
        poller.register(epoll.fileno(), select.POLLIN)
        self._look = poller.poll
        trio.lowlevel.add_instrument(self)
        return True

    def uninstall(self) -> None:
        try:
            trio.lowlevel.remove_instrument(self)
        except KeyError:
            pass

    def statistics(self) -> dict:
        return {"polls": self.polls, "hits": self.hits, "seconds": self.seconds, "window": self.window}

    # -- the instrument's hooks (the loop's thread) ----------------------------------------------

    def before_io_wait(self, timeout: float) -> None:
        if timeout <= 0 or self._look is None:   # runnable tasks: the loop only looks for events
            return
        clock = self._clock
        start = self._idle_from = clock()
        span = self.window
        if span <= 0 or span >= timeout:   # no window, or a deadline due inside it: sleep at once
            return
        self.polls += 1
        look, pause = self._look, self._pause
        end = start + span
        while True:
            if look(0):
                self.hits += 1
                self._idle_from = None   # caught: the window was long enough
                self.seconds += clock() - start
                return
            now = clock()
            if now >= end:
                break
            pause()
        self.seconds += now - start

    def after_io_wait(self, timeout: float) -> None:
        start = self._idle_from
        if start is None:
            return
        self._idle_from = None
        idle = self._clock() - start   # the poll and the sleep after it
        if idle <= self.cap:
            self.window = min(self.cap, max(GROW_START, self.window * 2))
        else:
            half = self.window / 2
            self.window = half if half >= GROW_START else 0.0
