"""Puts to one Redis queue coalesced into one script call (`qserve.backends.redis.putbatch`), on the
session's real redis-server, in process. Redis is made to hold writes for a moment (``CLIENT PAUSE
... WRITE``: the in-flight script waits in Redis), so that puts pile up behind it deterministically;
trio's `wait_all_tasks_blocked` says when they have."""

from __future__ import annotations

import trio
from trio.testing import wait_all_tasks_blocked

from qserve.core.events import QueueRef

from ..helpers.inproc import running_server

LIMIT = 30


async def test_puts_that_arrive_during_a_put_go_together_in_the_next_script(tmp_path, redis_server, redis_url):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis_url, dedup_window=60.0) as srv:
            queue = await srv.server.app.queues.get(QueueRef("batch"))
            clients = [await srv.client("batch") for _ in range(40)]
            answers: dict[int, tuple[int, bytes]] = {}

            async def put(i: int) -> None:
                query = "requestId=twice" if i >= 38 else ""     # the last two: one requestId
                head, body = await clients[i].request("POST", f"/api/predict/batch?{query}", b"p%d" % i,
                                                      [("Authorization", "tok")])
                answers[i] = (int(body), dict(head.headers).get(b"x-qserve-duplicate", b""))

            redis_server.call("CLIENT", "PAUSE", "10000", "WRITE")
            try:
                async with trio.open_nursery() as nursery:
                    for i in range(40):
                        nursery.start_soon(put, i)
                    await wait_all_tasks_blocked()
                    assert queue._puts.batches == 1 and len(queue._puts._pending) == 39   # one in Redis
                    redis_server.call("CLIENT", "UNPAUSE")
            finally:
                redis_server.call("CLIENT", "UNPAUSE")
            assert queue._puts.batches == 2 and queue._puts.puts == 40
            stored = sorted(index for index, dup in answers.values() if not dup)
            assert stored == list(range(1, 40))                  # 39 entries, indexes in arrival order
            twice = [answers[38], answers[39]]
            assert sorted(dup for _, dup in twice) == [b"", b"1"] and twice[0][0] == twice[1][0]
            attrs = await clients[0].attrs()
            assert attrs["stream.length"] == "39"


async def test_a_put_cancelled_before_its_batch_went_stores_nothing(tmp_path, redis_server, redis_url):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis_url) as srv:
            queue = await srv.server.app.queues.get(QueueRef("withdrawn"))
            indexes = []
            gone = trio.CancelScope()

            async def put(data: bytes) -> None:
                indexes.append(await queue.put(data, {}, 0))

            async def put_then_go_away(data: bytes) -> None:
                with gone:   # as a request whose client went away
                    await put(data)

            redis_server.call("CLIENT", "PAUSE", "10000", "WRITE")
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(put, b"sent")
                    await wait_all_tasks_blocked()          # in Redis
                    nursery.start_soon(put_then_go_away, b"withdrawn")
                    await wait_all_tasks_blocked()
                    nursery.start_soon(put, b"kept")
                    await wait_all_tasks_blocked()
                    assert len(queue._puts._pending) == 2
                    gone.cancel()
                    await wait_all_tasks_blocked()
                    assert len(queue._puts._pending) == 1
                    redis_server.call("CLIENT", "UNPAUSE")
            finally:
                redis_server.call("CLIENT", "UNPAUSE")
            assert indexes == [1, 2] and queue._puts.batches == 2
            rows = await queue.read(1, {}, 10)
            assert [row.data for row in rows] == [b"sent", b"kept"]
