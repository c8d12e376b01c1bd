"""`server.idlepoll.IdlePoll`'s hooks on a fake clock and a fake epoll fd: the window grows while
waits end within the cap and shrinks when they do not, a poll that sees readiness ends the wait
without a sleep, and a deadline due inside the window means no poll (the timer is not delayed).
The hooks on a real trio loop and in a real server: tests/server/test_idlepoll_live.py."""

from __future__ import annotations

import pytest

from qserve.server.idlepoll import GROW_START, IdlePoll

CAP = 1e-3
STEP = 10e-6   # each pause between two looks moves the fake clock this far


class FakeLoop:
    """The clock, the pause and the epoll fd's `poll(0)` an `IdlePoll` sees, and trio's wait
    around its hooks; ``arrival`` is when the epoll set next becomes ready (None: nothing comes)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.arrival: float | None = None
        self.sleeps = 0   # waits that went on to trio's epoll_wait and slept there

    def clock(self) -> float:
        return self.t

    def pause(self) -> None:
        self.t += STEP

    def look(self, timeout_ms: float) -> list:
        assert timeout_ms == 0, "the hook only looks; trio's epoll_wait sleeps"
        return [(3, 1)] if self.arrival is not None and self.t >= self.arrival else []

    def poller(self, cap: float = CAP) -> IdlePoll:
        idle = IdlePoll(cap, clock=self.clock, pause=self.pause)
        idle._look = self.look   # what `install` takes from the running loop
        return idle

    def wait(self, idle: IdlePoll, gap: float | None, timeout: float = 10.0) -> None:
        """One pass of trio's loop that blocks: the next arrival comes ``gap`` from now (None:
        none, the timeout ends the wait)."""
        self.arrival = None if gap is None else self.t + gap
        idle.before_io_wait(timeout)
        ready = self.look(0)
        if not ready:   # epoll_wait sleeps until the arrival or the timeout
            self.sleeps += 1
            self.t = self.arrival if self.arrival is not None else self.t + timeout
        idle.after_io_wait(timeout)


def test_waits_shorter_than_the_cap_grow_the_window_until_the_poll_catches_them():
    loop = FakeLoop()
    idle = loop.poller()
    windows = []
    for _ in range(6):
        loop.wait(idle, 300e-6)
        windows.append(idle.window)
    # slept through the first four (0, 50, 100, 200 us polled), each within the cap: doubled;
    # the fifth and sixth were caught by a 400 us poll, which leaves the window as it is
    assert windows == pytest.approx([GROW_START, 100e-6, 200e-6, 400e-6, 400e-6, 400e-6])
    assert (idle.polls, idle.hits, loop.sleeps) == (5, 2, 4)
    assert idle.seconds == pytest.approx(50e-6 + 100e-6 + 200e-6 + 2 * 300e-6, abs=4 * STEP)


def test_the_window_never_exceeds_the_cap():
    loop = FakeLoop()
    idle = loop.poller()
    for _ in range(12):
        loop.wait(idle, 990e-6)
    assert idle.window == CAP and idle.hits > 0


def test_waits_longer_than_the_cap_halve_the_window_down_to_zero():
    loop = FakeLoop()
    idle = loop.poller()
    idle.window = CAP
    windows = []
    for _ in range(6):
        loop.wait(idle, 5e-3)
        windows.append(idle.window)
    assert windows == pytest.approx([500e-6, 250e-6, 125e-6, 62.5e-6, 0.0, 0.0])
    assert idle.hits == 0 and idle.polls == 5   # the sixth wait slept at once
    assert idle.seconds == pytest.approx(CAP + 500e-6 + 250e-6 + 125e-6 + 62.5e-6, abs=5 * STEP)


def test_a_deadline_due_inside_the_window_means_no_poll():
    loop = FakeLoop()
    idle = loop.poller()
    idle.window = CAP
    loop.wait(idle, None, timeout=200e-6)   # a timer due in 200 us, nothing arrives
    assert idle.polls == 0 and loop.t == pytest.approx(200e-6)   # the timer fired on time
    assert idle.window == CAP   # a 200 us wait is within the cap


def test_a_timer_beyond_the_window_is_late_by_the_window_at_most():
    loop = FakeLoop()
    idle = loop.poller()
    idle.window = 100e-6
    loop.wait(idle, None, timeout=2e-3)   # polls 100 us, then epoll_wait sleeps its whole 2 ms
    assert idle.polls == 1 and idle.hits == 0
    assert loop.t == pytest.approx(2e-3 + 100e-6, abs=STEP)
    assert idle.window == pytest.approx(GROW_START)   # a 2.1 ms wait, beyond the cap: halved


def test_no_wait_no_poll():
    loop = FakeLoop()
    idle = loop.poller()
    idle.window = CAP
    idle.before_io_wait(0.0)   # tasks are runnable: the loop only looks for events
    idle.after_io_wait(0.0)
    assert (loop.t, idle.polls, idle.window) == (0.0, 0, CAP)


def test_the_cap_must_be_positive():
    with pytest.raises(ValueError):
        IdlePoll(0.0)
