"""`qserve.server.syncpool.SyncPool`: the flushers' fsync threads. Real threads, so real time: nothing
sleeps, each test waits on a threading.Event it sets itself, under `trio.fail_after`."""

from __future__ import annotations

import threading

import pytest
import trio

from qserve.server.syncpool import SyncPool

LIMIT = 10


async def test_run_returns_the_result_and_raises_the_exception_from_a_pool_thread():
    with trio.fail_after(LIMIT):
        pool = SyncPool(threads=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve)
            assert (await pool.run(threading.current_thread)).name.startswith("qserve-sync-")
            assert await pool.run(lambda: 41 + 1) == 42
            with pytest.raises(OSError, match="disk"):
                await pool.run(lambda: (_ for _ in ()).throw(OSError("disk gone")))
            results = []

            async def one(i):
                results.append(await pool.run(lambda: i * i))
            async with trio.open_nursery() as many:
                for i in range(50):
                    many.start_soon(one, i)
            assert sorted(results) == [i * i for i in range(50)]
            nursery.cancel_scope.cancel()


async def test_a_cancelled_caller_still_waits_for_its_call_then_sees_the_cancellation():
    with trio.fail_after(LIMIT):
        pool = SyncPool(threads=1)
        release, started, finished = threading.Event(), threading.Event(), []

        def blocking():
            started.set()
            release.wait(LIMIT)
            finished.append(True)
            return "done"

        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve)
            with trio.CancelScope() as scope:
                async def cancel_when_started():
                    await trio.to_thread.run_sync(started.wait, LIMIT)
                    scope.cancel()
                    release.set()
                nursery.start_soon(cancel_when_started)
                await pool.run(blocking)
                pytest.fail("the cancellation was swallowed")
            assert scope.cancelled_caught and finished == [True]
            nursery.cancel_scope.cancel()


async def test_shutdown_waits_for_outstanding_calls_and_later_calls_still_run():
    with trio.fail_after(LIMIT):
        pool = SyncPool(threads=1)
        release, started = threading.Event(), threading.Event()
        answers = []

        def slow():
            started.set()
            release.wait(LIMIT)
            return "slow"

        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.serve)

                async def caller():
                    answers.append(await pool.run(slow))
                outer.start_soon(caller)
                await trio.to_thread.run_sync(started.wait, LIMIT)
                nursery.cancel_scope.cancel()     # the reaper is cancelled with a call outstanding
                release.set()
        assert answers == ["slow"]
        assert await pool.run(lambda: "after") == "after"   # falls back to trio.to_thread


def test_threads_must_be_positive():
    with pytest.raises(ValueError):
        SyncPool(threads=0)
