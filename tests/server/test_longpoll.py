"""Long-poll gets under trio's clock: woken at once by a put, answered a little before the timeout;
on every queue backend (the `backend` fixture)."""

import json

import pytest
import trio
import trio.testing

from ..helpers.inproc import running_server


@pytest.fixture
def limit():
    return trio.fail_after(60)


async def test_long_poll_woken_by_a_put_from_another_connection(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv:
            waiter, putter = await srv.client("lp"), await srv.client("lp")
            result = {}

            async def wait_get():
                result["t0"] = trio.current_time()
                result["resp"] = await waiter.call("GET", "_timeout_=20s&_raw_=false")
                result["t1"] = trio.current_time()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_get)
                await trio.sleep(5)   # virtual time: the get is parked
                assert "resp" not in result
                status, _ = await putter.call("POST", "", b"wake")
                assert status == 200
            status, body = result["resp"]
            assert status == 200 and json.loads(body)[0]["index"] == 1
            assert 5 <= result["t1"] - result["t0"] < 6


async def test_long_poll_answers_204_just_before_the_client_timeout(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv:
            c = await srv.client("lp")
            t0 = trio.current_time()
            status, body = await c.call("GET", "_timeout_=5s&_raw_=false")
            waited = trio.current_time() - t0
            assert status == 204 and body == b""
            assert 4.4 <= waited < 5.0


async def test_zero_timeout_answers_at_once(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv:
            c = await srv.client("lp")
            t0 = trio.current_time()
            assert (await c.call("GET", "_timeout_=0"))[0] == 204
            assert trio.current_time() - t0 < 0.1


async def test_a_put_wakes_only_the_gets_it_can_answer(tmp_path, autojump_clock, monkeypatch):
    """Clients each waiting on the sink for their own requestId: a put wakes the one it answers
    (and gets whose tag filter it passes), not every waiting get. (Local backend: it counts the
    local queue's lookups; the Redis backend files its gets in the same `GetWaiters`.)"""
    from qserve.backends.local.queues import Queue
    looks = []
    real = Queue._matching

    def counting(self, start, tags, limit):
        looks.append(dict(tags))
        return real(self, start, tags, limit)

    monkeypatch.setattr(Queue, "_matching", counting)
    n = 30
    with trio.fail_after(60):
        async with running_server(tmp_path) as srv:
            results = {}

            async def wait_get(key, query):
                c = await srv.client("lp")
                results[key] = await c.call("GET", f"{query}&_timeout_=20s&_raw_=false", sink=True)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(wait_get, i, f"requestId=r{i}")
                nursery.start_soon(wait_get, "tagged", "kind=x")
                await trio.sleep(1)
                assert len(looks) == n + 1 and not results
                looks.clear()
                putter = await srv.client("lp")
                for i in reversed(range(n)):
                    assert (await putter.call("POST", f"requestId=r{i}", f"result {i}".encode(), sink=True))[0] == 200
                    await trio.sleep(0.1)
                    assert i in results and "tagged" not in results
                assert len(looks) == n          # one look per answered get (before: n*(n+1)/2)
                assert (await putter.call("POST", "kind=x", b"tagged", sink=True))[0] == 200
            for i in range(n):
                status, body = results[i]
                assert status == 200 and json.loads(body)[0]["tags"]["requestId"] == f"r{i}"
            assert json.loads(results["tagged"][1])[0]["tags"]["kind"] == "x"
