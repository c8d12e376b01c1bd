"""The local queue's policy upkeep task (`backends.local.queues.Queue.policy_upkeep`) waits for the
next wake-up, never for one in the past (#17): a delay that fell due stays in the dispatcher until a
poll of its group walks over it, and a group whose members' windows are full does not poll, so
counting that delay made every wake-up one in the past: the task spun, a core at 100%, starving
the deliveries (found by ``qserve chaos --policies``). In process, on trio's autojump clock: a
spinning task never lets the clock jump, so the test counts the task's rounds and fails at 1,000."""

from __future__ import annotations

import logging
import math

import trio

from qserve.core.events import QueueRef
from qserve.core.groups import Dispatcher
from qserve.core.policy import Policy

from ..helpers.inproc import next_frame, no_frame, running_server
from ..helpers.queue_files import SwitchIO
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


async def test_a_full_disk_during_the_upkeep_leaves_the_entry_deliverable_and_the_server_serving(
        tmp_path, autojump_clock, caplog):
    """A consumer's lease runs out (``delivery_timeout``) on its last allowed delivery while the disk
    is full: the move to the dead-letter queue cannot be written. The server says so once, keeps
    serving, hands the entry back to the group, and moves it once the disk has room again."""
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, max_deliveries=1, delivery_timeout=5.0) as srv, \
                trio.open_nursery() as nursery:
            c = await srv.client("full")
            assert (await c.call("POST", "", b"stuck"))[0] == 200
            ws = await srv.watch(nursery, "full", "_window_=1", user="w")
            assert (await next_frame(ws)).data == b"stuck"
            assert (await c.attrs(dlq=True))["stream.length"] == "0"   # the dead-letter queue is open
            io.full = True
            await trio.sleep(20)   # the lease ran out; the move failed, and failed again at each retry
            said = [r for r in caplog.records if "cannot move" in r.getMessage()]
            assert len(said) == 1 and "no space left" in said[0].getMessage(), [r.getMessage() for r in said]
            status, _ = await c.request("GET", "/healthz")
            assert status.status_code == 200
            assert (await c.attrs())["stream.length"] == "1"
            io.full = False
            await trio.sleep(20)
            assert (await c.attrs())["stream.length"] == "0"
            assert (await c.attrs(dlq=True))["stream.length"] == "1"
            nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if "Traceback" in r.getMessage() or r.exc_info]


async def test_delays_the_disk_refuses_are_said_once_and_written_when_it_has_room(tmp_path, autojump_clock, caplog):
    """A lease that runs out gives its entry a retry delay, which the upkeep records in the queue's
    log so that it holds across a restart. With the disk full that write fails: said once, the
    server serves on, and the upkeep writes the delay once the disk has room."""
    caplog.set_level(logging.INFO, "qserve")
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, delivery_timeout=5.0, retry_backoff=(30.0, 2.0, 60.0)) as srv, \
                trio.open_nursery() as nursery:
            c = await srv.client("later")
            assert (await c.call("POST", "", b"slow"))[0] == 200
            ws = await srv.watch(nursery, "later", "_window_=1", user="w")
            assert (await next_frame(ws)).data == b"slow"
            io.full = True
            await trio.sleep(10)   # the lease ran out at 5 s: the entry waits 30 s; recording that fails
            said = [r.getMessage() for r in caplog.records if "cannot record its delays" in r.getMessage()]
            assert len(said) == 1 and "no space left" in said[0], said
            assert (await c.attrs())["policy.delayed"] == "1"
            io.full = False
            await trio.sleep(2)
            assert [r for r in caplog.records if "delays work again" in r.getMessage()]
            assert any(k.startswith("delay:") for k in (await srv.server.queues.get(QueueRef("later"))).log.state)
            nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.exc_info]
