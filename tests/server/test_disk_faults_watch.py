"""Disk faults under a running server on deletes and watchers: fsync failures on delete, commit,
truncate and end, and what manual and auto-commit watchers (WebSocket and HTTP stream) see meanwhile,
injected through `storage.FileIO`.

The guarantees pinned here (FORMAT.md "Write and fsync faults", PROTOCOL.md "Durability"): a delete
whose fsync failed is a 503 with a one-line reason and keeps the entry; an auto-committed frame goes
out only once its delete is durable, and a storage failure closes a watch with 1013; a watcher handed
a put that was rolled back is not stuck. Faults on puts are in test_disk_faults.py.

These servers run with fsync="always" and so on real time (an fsync runs in a worker thread, which
trio's autojump clock would skip past); every test is bounded by `trio.fail_after`.
"""

from __future__ import annotations

import trio
import trio_websocket

from ..helpers.disk_faults import LIMIT, assert_clean, get_index, one_line, put
from ..helpers.inproc import next_frame, running_server
from ..helpers.queue_files import SwitchIO, contents, reopen


async def test_fsync_failure_on_delete_commit_truncate_end_keeps_the_entries(tmp_path):
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv:
            c = await srv.client("del")
            for i in range(4):
                assert (await put(c, b"e%d" % i))[0] == 200
            io.fail_fsync = True
            for method, query in [("DELETE", "_indexes_=1,2"), ("PUT", "_indexes_=3"),
                                  ("DELETE", "_index_=4&_trunc_=true"), ("POST", "_eos_=true"),
                                  ("GET", "_index_=2")]:   # the last one: an auto-deleting get
                status, body = await c.call(method, query)
                assert status == 503, (method, query, status, body)
                one_line(body)
            for i in range(1, 5):
                assert (await get_index(c, i))["index"] == i
            attrs = await c.attrs()
            assert (attrs["stream.length"], attrs["meta.state"]) == ("4", "Normal")
            io.fail_fsync = False
            assert await c.call("PUT", "_indexes_=3") == (200, b"OK")
            assert await get_index(c, 3) is None
    qlog = reopen(tmp_path, "del")
    assert [i for i, _ in contents(qlog)] == [1, 2, 4]
    assert qlog.state.get("state") != "End"
    qlog.close()
    assert_clean(tmp_path)


async def test_manual_watcher_commit_during_fsync_failure_is_503_and_the_entry_stays(tmp_path):
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv, trio.open_nursery() as nursery:
            c = await srv.client("wm")
            assert await put(c, b"job") == (200, b"1")
            ws = await srv.watch(nursery, "wm", "_window_=1", user="u")
            frame = await next_frame(ws)
            assert frame.index == 1
            io.fail_fsync = True
            status, body = await c.call("PUT", "_indexes_=1")
            assert status == 503 and one_line(body)
            io.fail_fsync = False
            assert (await get_index(c, 1))["index"] == 1
            # the commit is retried and sticks
            assert await c.call("PUT", "_indexes_=1") == (200, b"OK")
            assert await get_index(c, 1) is None
            await ws.aclose()
    qlog = reopen(tmp_path, "wm")
    assert contents(qlog) == []
    qlog.close()


async def test_auto_commit_watch_sends_nothing_whose_delete_failed_to_become_durable(tmp_path):
    """PROTOCOL.md: "an auto-commit frame goes out once its delete is on disk". With fsync failing
    the delete is rolled back, so the frame must not go out; the entry stays and a later consumer
    gets it (at-least-once, never lost)."""
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv, trio.open_nursery() as nursery:
            c = await srv.client("wa")
            assert await put(c, b"keep-me") == (200, b"1")
            io.fail_fsync = True
            ws = await srv.watch(nursery, "wa", "_auto_commit_=true", user="a")
            with trio.fail_after(5):
                try:
                    message = await ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    closed = exc.reason
                else:
                    raise AssertionError(f"a frame went out although its delete was not durable: {message!r}")
            # the server closed the socket with an "try again later" code, not normally
            assert closed.code in (1011, 1013), closed
            io.fail_fsync = False
            assert (await get_index(c, 1))["data"] == "a2VlcC1tZQ=="
            ws2 = await srv.watch(nursery, "wa", "_auto_commit_=true", user="b")
            frame = await next_frame(ws2)
            assert (frame.index, frame.data) == (1, b"keep-me")
            await ws2.aclose()
            with trio.fail_after(5):
                while (await c.attrs())["stream.length"] != "0":
                    await trio.sleep(0.01)
    qlog = reopen(tmp_path, "wa")
    assert contents(qlog) == []   # delivered once, auto-committed durably
    qlog.close()


async def test_auto_commit_watch_close_code_is_1013_for_a_storage_failure(tmp_path):
    """errors.Unavailable maps to close code 1013 (try again later), not 1011 (internal error)."""
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv, trio.open_nursery() as nursery:
            c = await srv.client("wc")
            assert await put(c, b"x") == (200, b"1")
            io.fail_fsync = True
            ws = await srv.watch(nursery, "wc", "_auto_commit_=true", user="a")
            with trio.fail_after(5):
                try:
                    await ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    closed = exc.reason
            io.fail_fsync = False
            assert closed.code == 1013, closed


async def test_auto_commit_http_stream_watch_sends_nothing_during_fsync_failure(tmp_path):
    """The length-delimited HTTP watch (no Upgrade) keeps the same promise as the WebSocket one."""
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv:
            c = await srv.client("hs")
            assert await put(c, b"keep") == (200, b"1")
            io.fail_fsync = True
            raw = await srv.listener.connect()
            await raw.send_all(b"GET /api/predict/hs?_watch_=true&_auto_commit_=true HTTP/1.1\r\n"
                               b"Host: t\r\nAuthorization: tok\r\n\r\n")
            got = b""
            with trio.move_on_after(3):
                while chunk := await raw.receive_some(65536):
                    got += chunk
            await raw.aclose()
            io.fail_fsync = False
            assert b"keep" not in got, got
            assert (await get_index(c, 1))["data"] == "a2VlcA=="


async def test_a_watcher_handed_a_rolled_back_put_is_not_stuck(tmp_path):
    """A manual-commit watcher may be handed an entry before its put is durable. If the put's fsync
    then fails (503, the entry rolled back), committing the ghost index is a harmless 200, the index is
    never reused, and the watcher's window slot comes back for the next entry."""
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv, trio.open_nursery() as nursery:
            c = await srv.client("gh")
            assert await put(c, b"first") == (200, b"1")
            ws = await srv.watch(nursery, "gh", "_window_=1", user="u")
            assert (await next_frame(ws)).index == 1
            assert await c.call("PUT", "_indexes_=1") == (200, b"OK")
            io.fail_fsync = True
            status, _ = await put(c, b"ghost")
            assert status == 503
            io.fail_fsync = False
            ghost = None
            with trio.move_on_after(0.5):
                ghost = (await next_frame(ws)).index   # the frame may have gone out before the fsync
            if ghost is not None:
                assert ghost == 2 and await get_index(c, 2) is None
                assert await c.call("PUT", f"_indexes_={ghost}") == (200, b"OK")
            status, body = await put(c, b"real")
            assert status == 200 and int(body) == 3
            frame = await next_frame(ws)
            assert (frame.index, frame.data) == (3, b"real")
            await ws.aclose()
