"""The local queue's policy upkeep task (`backends.local.queues.Queue.policy_upkeep`) waits for the
next wake-up, never for one in the past (#17): a delay that fell due stays in the dispatcher until a
poll of its group walks over it, and a group whose members' windows are full does not poll, so
counting that delay made every wake-up one in the past: the task spun, a core at 100%, starving
the deliveries (found by ``qserve chaos --policies``). In process, on trio's autojump clock: a
spinning task never lets the clock jump, so the test counts the task's rounds and fails at 1,000."""

from __future__ import annotations

import math

import trio

from qserve.core.groups import Dispatcher
from qserve.core.policy import Policy

from ..helpers.inproc import next_frame, no_frame, running_server
from ..helpers.sources import FakeSource

LIMIT = 60


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_next_wakeup_skips_delays_due_by_the_last_wake_up():
    clock = Clock()
    d = Dispatcher(FakeSource(), now=clock, policy=Policy(delivery_timeout=30.0))
    d.restore_delay(1, "g", 5.0)
    d.restore_delay(2, "g", 8.0)
    assert d.next_wakeup() == 5.0 == d.next_wakeup(after=-math.inf)
    clock.now = 6.0
    assert d.next_wakeup(after=6.0) == 8.0      # 5.0 was due when the watchers were last woken
    assert d.delay_of(1, "g") == 5.0            # ...and stays until a poll of its group walks over it
    assert d.next_wakeup(after=9.0) is None


async def test_a_due_delay_in_a_group_that_cannot_poll_does_not_spin_the_upkeep(tmp_path, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, delivery_timeout=60.0) as srv, trio.open_nursery() as nursery:
            c = await srv.client("svc")
            first = int((await c.call("POST", "", b"one"))[1])
            second = int((await c.call("POST", "", b"two"))[1])
            ws = await srv.watch(nursery, "svc", "_window_=1", user="w")
            assert (await next_frame(ws)).index == first
            assert (await c.call("PUT", f"_indexes_={first}&_negative_=true&_delay_=1s"))[0] == 200
            assert (await next_frame(ws)).index == second   # held: the window is full, no more polls
            [queue] = [q for ref, q in srv.server.queues._queues.items() if ref.service == "svc"
                       and not ref.dlq and ref.kind == "input"]
            rounds = []
            real = queue.dispatcher.next_wakeup

            def counted(*args, **kwargs):
                rounds.append(trio.current_time())
                if len(rounds) >= 1000:
                    raise RuntimeError("the policy upkeep spins")
                return real(*args, **kwargs)

            queue.dispatcher.next_wakeup = counted
            assert await no_frame(ws, 10)               # the delay fell due at 1 s; the window is still full
            assert len(rounds) < 10, rounds
            assert (await c.call("PUT", f"_indexes_={second}"))[0] == 200   # commit: a slot frees
            assert (await next_frame(ws)).index == first
            nursery.cancel_scope.cancel()
