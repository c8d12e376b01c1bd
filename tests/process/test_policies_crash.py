"""Delivery policies across a kill -9 of a real `qserve serve` (#17): what the answers said holds
after SIGKILL and a restart on the same data directory: a dead-lettered entry is in the dead-letter
queue and nowhere else, a delayed entry is still hidden from its group (and still stored), and the
dedup window still answers a retried put with the original index; nothing else is lost or stored
twice. The server runs with its defaults (fsync=always); on Redis (the session's redis-server,
appendfsync always) the node is killed and a new one starts on the same Redis."""

from __future__ import annotations

import trio

from qserve.client import QueueClient

from ..helpers.process import ServerProcess, backend_args

LIMIT = 60


async def test_a_dead_letter_a_delay_and_the_dedup_window_survive_kill_9(tmp_path, backend):
    srv = ServerProcess(tmp_path / "data", "--max-deliveries", "2", "--dedup-window", "5m",
                        *backend_args(backend.get("backend")))
    await trio.to_thread.run_sync(srv.start)
    try:
        with trio.fail_after(LIMIT):
            async with QueueClient(srv.url + "/api/predict/pol", token=srv.token, user="w", group="g") as c:
                poison, _ = await c.put(b"poison", {"requestId": "req-poison"})
                later, _ = await c.put(b"later", {"requestId": "req-later"})
                done, _ = await c.put(b"done", {"requestId": "req-done"})
                async with c.watch(window=3) as w:
                    seen = {}
                    async for entry in w:
                        seen[entry.index] = entry
                        if len(seen) == 3:
                            break
                    assert set(seen) == {poison, later, done}
                    await c.commit(done)                               # consumed: the window still knows it
                    await c.negative(later, "503", "busy", delay=3600)  # hidden for an hour
                    await c.negative(poison, "500", "boom-1")           # delivery 1 of 2: comes again
                    async for entry in w:
                        assert entry.index == poison
                        break
                    await c.negative(poison, "500", "boom-2")           # delivery 2 of 2: dead letter
                attrs = await c.attributes()
                assert attrs["stream.length"] == "1" and attrs["policy.delayed"] == "1"
        await trio.to_thread.run_sync(srv.kill)
        await trio.to_thread.run_sync(srv.start)
        with trio.fail_after(LIMIT):
            async with QueueClient(srv.url + "/api/predict/pol", token=srv.token, user="w2", group="g") as c, \
                    QueueClient(srv.url + "/api/predict/pol/dlq", token=srv.token, user="ops") as dlq:
                attrs = await c.attributes()
                assert attrs["stream.length"] == "1" and attrs["policy.delayed"] == "1"
                [kept] = await c.get(index=0, length=10, auto_delete=False)
                assert kept.index == later and kept.data == b"later"
                # the dedup window: a retried put (even of a consumed entry) stores nothing
                assert await c.put(b"done", {"requestId": "req-done"}) == (done, "req-done")
                assert await c.put(b"later", {"requestId": "req-later"}) == (later, "req-later")
                assert (await c.attributes())["stream.length"] == "1"
                [letter] = await dlq.get(index=0, length=10, auto_delete=False)
                assert letter.data == b"poison"
                assert letter.tags["dlq.requestId"] == "req-poison" and letter.tags["dlq.index"] == str(poison)
                assert letter.tags["dlq.deliveries"] == "2" and letter.tags["lastReason"] == "boom-2"
                # a fresh put is new: the window only holds what was stored
                fresh, _ = await c.put(b"new", {"requestId": "req-new"})
                assert fresh > done
    finally:
        await trio.to_thread.run_sync(srv.kill)
