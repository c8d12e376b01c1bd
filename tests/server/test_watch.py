"""Watch over WebSocket and HTTP streaming, in process on trio's clock: groups, windows, commits,
negative commits, redelivery, priority, tag filters and the figures attributes and search report;
on every queue backend (the `backend` fixture: local and Redis)."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket

from qserve.server import watch
from qserve.wire import framing, protobuf

from ..helpers.inproc import TOKEN, next_frame, no_frame, running_server


async def put_n(c, n, query=""):
    return [int((await c.call("POST", query, f"d{i}".encode()))[1]) for i in range(n)]


async def drain(ws, n):
    return [await next_frame(ws) for _ in range(n)]


async def test_two_consumers_split_a_group_within_their_windows(tmp_path, backend, autojump_clock):
    with trio.fail_after(120):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            await put_n(c, 10)
            a = await srv.watch(nursery, "w", "_window_=3", user="a")
            b = await srv.watch(nursery, "w", "_window_=2", user="b")
            got_a, got_b = await drain(a, 3), await drain(b, 2)
            assert await no_frame(a) and await no_frame(b)       # windows full
            ia, ib = {f.index for f in got_a}, {f.index for f in got_b}
            assert not ia & ib and len(ia | ib) == 5
            attrs = await c.attrs()
            lines = [v for k, v in attrs.items() if k.startswith("consumers.list.")]
            assert any("Id: g.a," in v and "Pending: 3" in v and "Slots: 0" in v for v in lines)
            assert any("Id: g.b," in v and "Pending: 2" in v and "Window: 2" in v for v in lines)
            assert attrs["consumers.stats.total"] == "2"
            assert any("Id: g," in v and "Pending: 5" in v for k, v in attrs.items() if k.startswith("groups.list."))
            held = min(ia)
            search = json.loads((await c.call("GET", f"_search_=true&_index_={held}"))[1])
            assert search == {"IsPending": True, "WaitCount": 0}
            waiting = max(ia | ib) + 1
            search = json.loads((await c.call("GET", f"_search_=true&_index_={waiting}"))[1])
            assert search == {"IsPending": False, "WaitCount": 0}
            # committing frees slots: the rest flow until everything is committed
            seen = ia | ib
            await c.call("PUT", "_indexes_=" + ",".join(map(str, sorted(ia))))
            await c.call("PUT", "_indexes_=" + ",".join(map(str, sorted(ib))))
            while len(seen) < 10:
                with trio.move_on_after(1):
                    f = await next_frame(a)
                    assert f.index not in seen
                    seen.add(f.index)
                    await c.call("PUT", f"_indexes_={f.index}")
                with trio.move_on_after(1):
                    f = await next_frame(b)
                    assert f.index not in seen
                    seen.add(f.index)
                    await c.call("PUT", f"_indexes_={f.index}")
            assert (await c.attrs())["stream.length"] == "0"
            nursery.cancel_scope.cancel()


async def test_killed_consumer_hands_its_entries_to_the_other(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            await put_n(c, 4)
            a = await srv.watch(nursery, "w", "_window_=4", user="a")
            held = {f.index for f in await drain(a, 4)}
            b = await srv.watch(nursery, "w", "_window_=4", user="b")
            assert await no_frame(b)
            await a._stream.aclose()        # abrupt EOF, no close frame (as the Python SDK does)
            got = {f.index for f in await drain(b, 4)}
            assert got == held
            nursery.cancel_scope.cancel()


async def test_negative_commit_is_redelivered_with_last_code(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            await put_n(c, 1)
            a = await srv.watch(nursery, "w", "_window_=1", user="a")
            f = await next_frame(a)
            status, body = await c.call("PUT", f"_indexes_={f.index}&_negative_=true",
                                        b"_code_=Shutdown&_reason_=going+away",
                                        headers=[("Content-Type", "application/x-www-form-urlencoded")])
            assert (status, body) == (200, b"OK")
            again = await next_frame(a)
            assert again.index == f.index
            assert again.tags["lastCode"] == "Shutdown" and again.tags["lastReason"] == "going away"
            nursery.cancel_scope.cancel()


async def test_negative_prefers_another_consumer(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            a = await srv.watch(nursery, "w", "_window_=1", user="a")
            b = await srv.watch(nursery, "w", "_window_=1", user="b")
            await put_n(c, 1)
            with trio.move_on_after(2):
                first, holder, other = await next_frame(a), a, b
            if "first" not in locals():
                first, holder, other = await next_frame(b), b, a
            await c.call("PUT", f"_indexes_={first.index}&_negative_=true", b"_code_=500")
            moved = await next_frame(other)
            assert moved.index == first.index and moved.tags["lastCode"] == "500"
            assert await no_frame(holder)
            nursery.cancel_scope.cancel()


async def test_two_groups_each_get_every_entry(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            await put_n(c, 3)
            x = await srv.watch(nursery, "w", "_window_=5", user="u", group="gx")
            y = await srv.watch(nursery, "w", "_window_=5", user="u", group="gy")
            assert [f.index for f in await drain(x, 3)] == [1, 2, 3]
            assert [f.index for f in await drain(y, 3)] == [1, 2, 3]
            await c.call("PUT", "_indexes_=2")     # a commit removes it for every group
            attrs = await c.attrs()
            assert attrs["stream.length"] == "2"
            nursery.cancel_scope.cancel()


async def test_priority_first_then_fifo(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            await c.call("POST", "", b"low1")
            await c.call("POST", "_priority_=1", b"high1")
            await c.call("POST", "", b"low2")
            await c.call("POST", "", b"high2", headers=[("X-EAS-QueueService-Priority", "1")])
            await c.call("POST", "_priority_=5", b"top")
            a = await srv.watch(nursery, "w", "_window_=10&_auto_commit_=true", user="a")
            assert [f.data for f in await drain(a, 5)] == [b"top", b"high1", b"high2", b"low1", b"low2"]
            nursery.cancel_scope.cancel()


async def test_tag_filter_and_start_positions(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            for i in range(6):
                await c.call("POST", f"kind={'img' if i % 2 else 'txt'}", f"d{i}".encode())
            img = await srv.watch(nursery, "w", "_window_=10&kind=img", user="img")
            assert [f.index for f in await drain(img, 3)] == [2, 4, 6]
            assert await no_frame(img)
            late = await srv.watch(nursery, "w", "_window_=10&_index_=5", user="late", group="g2")
            assert [f.index for f in await drain(late, 2)] == [5, 6]
            new = await srv.watch(nursery, "w", "_window_=10&_index_=-1", user="new", group="g3")
            assert await no_frame(new)
            await c.call("POST", "", b"fresh")
            assert (await next_frame(new)).data == b"fresh"
            nursery.cancel_scope.cancel()


async def test_same_consumer_reconnecting_replaces_the_stale_socket(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            await put_n(c, 2)
            old = await srv.watch(nursery, "w", "_window_=2", user="same")
            assert len(await drain(old, 2)) == 2
            new = await srv.watch(nursery, "w", "_window_=2", user="same")
            assert sorted(f.index for f in await drain(new, 2)) == [1, 2]   # redelivered to the new socket
            attrs = await c.attrs()
            assert attrs["consumers.stats.total"] == "1"
            nursery.cancel_scope.cancel()


async def test_anonymous_watchers_never_share_an_id(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            await put_n(c, 2)
            a = await srv.watch(nursery, "w", "_window_=1")
            b = await srv.watch(nursery, "w", "_window_=1")
            assert {(await next_frame(a)).index, (await next_frame(b)).index} == {1, 2}
            nursery.cancel_scope.cancel()


async def test_refused_handshake_gets_a_status(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv:
            stream = await srv.listener.connect()
            rejected = []
            try:
                async with trio.open_nursery() as nursery:
                    await trio_websocket.wrap_client_stream(nursery, stream, "test", "/api/predict/w?_watch_=true",
                                                            extra_headers=[("Authorization", "wrong")])
            except* trio_websocket.ConnectionRejected as group:
                rejected = list(group.exceptions)
            assert [e.status_code for e in rejected] == [401]


async def test_http_streaming_watch_sends_length_delimited_frames(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv:
            c = await srv.client("w")
            await put_n(c, 3)
            stream = await srv.listener.connect()
            await stream.send_all(b"GET /api/predict/w?_watch_=true&_window_=5&_auto_commit_=true HTTP/1.1\r\n"
                                  b"Host: t\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
                                  b"Accept: application/vnd.google.protobuf\r\n\r\n")
            import h11
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
            reader = framing.LengthDelimitedReader()
            frames = []
            while len(frames) < 3:
                conn.receive_data(await stream.receive_some(65536))
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        break
                    if isinstance(ev, h11.Response):
                        assert ev.status_code == 200
                    if isinstance(ev, h11.Data):
                        reader.receive_data(ev.data)
                        while (frame := reader.next_frame()) is not None:
                            frames.append(protobuf.decode_frame(frame))
            assert [f.data for f in frames] == [b"d0", b"d1", b"d2"]
            await stream.aclose()
            with trio.fail_after(5):
                while (await c.attrs())["stream.length"] != "0":
                    await trio.sleep(0.1)


async def test_a_put_wakes_one_member_per_group_at_once(tmp_path, backend, autojump_clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            members = [await srv.watch(nursery, "w", "_window_=1", user=f"m{i}") for i in range(8)]
            other = await srv.watch(nursery, "w", "_window_=1&kind=x", user="o", group="g2")
            await trio.testing.wait_all_tasks_blocked()
            got = []

            async def receive(ws):
                got.append(await next_frame(ws, timeout=30))

            t0 = trio.current_time()
            async with trio.open_nursery() as inner:
                for ws in members:
                    inner.start_soon(receive, ws)
                for i in range(8):
                    await c.call("POST", "kind=x", f"d{i}".encode())
                with trio.fail_after(0.5):     # well before the sessions' fallback poll (1 s)
                    while len(got) < 8:
                        await trio.sleep(0.01)
            assert sorted(f.data for f in got) == [f"d{i}".encode() for i in range(8)]
            assert trio.current_time() - t0 < 0.5
            assert (await next_frame(other)).data == b"d0"      # the other group gets its own copy
            nursery.cancel_scope.cancel()


async def test_a_silent_watcher_is_dropped_by_the_keepalive_and_its_entries_move(tmp_path, backend, autojump_clock,
                                                                              monkeypatch):
    from ..helpers.rawws import RawWatcher

    # 2 s instead of 20: on Redis the clock jumps only after 0.25 s of real idleness, once per timer
    KEEPALIVE_INTERVAL = KEEPALIVE_TIMEOUT = 2.0
    monkeypatch.setattr(watch, "KEEPALIVE_INTERVAL", KEEPALIVE_INTERVAL)
    monkeypatch.setattr(watch, "KEEPALIVE_TIMEOUT", KEEPALIVE_TIMEOUT)

    with trio.fail_after(300):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            await put_n(c, 2)
            dead = await RawWatcher.connect(srv.listener, "w", "_window_=2", "dead")   # never reads again
            await trio.testing.wait_all_tasks_blocked()
            attrs = await c.attrs()
            assert any("Id: g.dead," in v and "Pending: 2" in v
                       for k, v in attrs.items() if k.startswith("consumers.list."))
            t0 = trio.current_time()
            alive = await srv.watch(nursery, "w", "_window_=2", user="alive")
            got = [await next_frame(alive, timeout=120) for _ in range(2)]   # once the silent one is dropped
            assert sorted(f.index for f in got) == [1, 2]
            assert trio.current_time() - t0 >= KEEPALIVE_INTERVAL
            assert trio.current_time() - t0 <= KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + 5
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("batch_bytes", [1, 100_000])
async def test_a_window_of_large_frames_is_written_in_bounded_batches(tmp_path, backend, autojump_clock, monkeypatch,
                                                                      batch_bytes):
    from qserve.server.websocket import WebSocketUpgrade
    monkeypatch.setattr(watch, "SEND_BATCH_BYTES", batch_bytes)
    batches = []
    real = WebSocketUpgrade.send_messages

    async def recording(self, messages):
        batches.append([len(m) for m in messages])
        await real(self, messages)
    monkeypatch.setattr(WebSocketUpgrade, "send_messages", recording)
    with trio.fail_after(120):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("big")
            bodies = [bytes([i]) * (40_000 + i) for i in range(12)]
            for body in bodies:
                assert (await c.call("POST", "", body))[0] == 200
            ws = await srv.watch(nursery, "big", "_window_=12", user="u")
            got = await drain(ws, 12)
            assert [f.data for f in got] == bodies
            nursery.cancel_scope.cancel()
    assert sum(map(len, batches)) == 12
    assert all(len(b) == 1 or sum(b) <= batch_bytes for b in batches), batches
    assert max(map(len, batches)) == (1 if batch_bytes == 1 else 2)


async def test_a_missed_wake_up_costs_at_most_the_fallback_period(tmp_path, autojump_clock):
    """Every change normally wakes the sessions it concerns; should one be missed (here: an entry
    appended to the log behind the service's back), `WatchService.fallback` wakes every session
    each `WAKE_FALLBACK` seconds, so the entry still goes out within that period. (Local backend: the
    entry is appended behind the service's back through the segment log.)"""
    with trio.fail_after(60):
        async with running_server(tmp_path) as srv, trio.open_nursery() as nursery:
            c = await srv.client("fb")
            await c.call("POST", "", b"first")
            ws = await srv.watch(nursery, "fb", "_window_=5", user="a")
            assert (await next_frame(ws)).data == b"first"
            queue = await srv.server.queues.get(next(iter(srv.server.queues._queues)))
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            queue.log.append(b"unannounced", {})        # no notify(): nobody is woken
            frame = await next_frame(ws, timeout=2 * watch.WAKE_FALLBACK)
            assert frame.data == b"unannounced"
            assert trio.current_time() - t0 <= watch.WAKE_FALLBACK + 0.01
            nursery.cancel_scope.cancel()
