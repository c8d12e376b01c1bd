"""Disk faults on writes under a running server: ENOSPC, short writes and fsync failures on puts,
injected through `storage.FileIO` and answered over HTTP.

The guarantees pinned here (README "Errors", FORMAT.md "Write and fsync faults", PROTOCOL.md
"Durability"): a full disk is a 507 and an I/O error a 503, each with a one-line reason; a failed
request stores nothing, not even part of a record; reads keep working during the fault; writes work
again once it clears, with the next index (a rolled-back index is never handed out again); a write
whose fsync failed is never answered 200; the failure is logged once, in storage's words. Deletes and
watchers under fsync failures are in test_disk_faults_watch.py.

These servers run with fsync="always" and so on real time (an fsync runs in a worker thread, which
trio's autojump clock would skip past); every test is bounded by `trio.fail_after`.
"""

from __future__ import annotations

import logging

import trio

from ..helpers.disk_faults import LIMIT, assert_clean, get_index, healthy, one_line, put
from ..helpers.inproc import running_server
from ..helpers.queue_files import SwitchIO, contents, reopen


# -- ENOSPC --------------------------------------------------------------------------------------------


async def test_enospc_on_put_is_507_reads_keep_working_and_space_returns(tmp_path):
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv:
            c = await srv.client("full")
            assert [await put(c, b"a%d" % i) for i in range(3)] == [(200, b"1"), (200, b"2"), (200, b"3")]
            before = await c.attrs()
            io.full = True
            for _ in range(3):   # a retrying client changes nothing either
                status, body = await put(c, b"x" * 100, "k=v")
                assert status == 507
                assert "space" in one_line(body)
            assert await c.attrs() == before
            # reads go on: attributes, non-deleting gets, count, search
            assert (await get_index(c, 2))["data"] == "YTE="
            assert await c.call("GET", "_count_=true") == (200, b"3")
            assert (await c.call("GET", "_search_=true&_index_=1"))[0] == 200
            # a deleting get cannot write its DELETE: 507, and the entry stays
            status, body = await c.call("GET", "_index_=1")
            assert status == 507 and one_line(body)
            status, body = await c.call("DELETE", "_indexes_=1")
            assert status == 507 and one_line(body)
            assert (await c.attrs())["stream.length"] == "3"
            io.full = False
            assert await put(c, b"after") == (200, b"4")
            assert await c.call("GET", "_index_=4") == (200, b"after")
            attrs = await c.attrs()
            assert (attrs["stream.length"], attrs["stream.firstEntry"], attrs["stream.lastEntry"]) == ("3", "1", "3")
    qlog = reopen(tmp_path, "full")
    assert contents(qlog) == [(1, b"a0"), (2, b"a1"), (3, b"a2")]
    assert qlog.next_index == 5 and qlog.recovery.truncated_bytes == 0
    qlog.close()
    assert_clean(tmp_path)


async def test_enospc_while_creating_a_queue_is_507_and_leaves_no_half_queue(tmp_path):
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv:
            c = await srv.client("newq")
            io.full = True
            status, body = await put(c, b"x")
            assert status == 507 and "space" in one_line(body)
            assert await healthy(srv)
            io.full = False
            assert await put(c, b"y") == (200, b"1")
    qlog = reopen(tmp_path, "newq")
    assert contents(qlog) == [(1, b"y")]
    qlog.close()
    assert_clean(tmp_path)


async def test_enospc_on_segment_roll_is_507_and_nothing_partial(tmp_path):
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always", segment_bytes=1024) as srv:
            c = await srv.client("roll")
            acked = []
            for i in range(6):
                status, body = await put(c, bytes([65 + i]) * 200)
                assert status == 200
                acked.append(int(body))
            io.full = True
            refused = 0
            for _ in range(10):   # at least one of these needs a new segment (write_file_atomic)
                status, body = await put(c, b"z" * 200)
                assert status == 507 and one_line(body)
                refused += 1
            io.full = False
            status, body = await put(c, b"back")
            assert status == 200 and int(body) == acked[-1] + 1
            acked.append(int(body))
    qlog = reopen(tmp_path, "roll")
    assert [i for i, _ in contents(qlog)] == acked
    qlog.close()
    assert_clean(tmp_path)


# -- short write ---------------------------------------------------------------------------------------


async def test_short_write_is_503_and_stores_nothing_partial(tmp_path):
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv:
            c = await srv.client("short")
            assert await put(c, b"first") == (200, b"1")
            io.short = True
            status, body = await put(c, b"s" * 1000, "k=v")
            # a short write without an errno is an I/O error (storage.StorageIOError), not ENOSPC
            assert status == 503 and one_line(body)
            assert await get_index(c, 2) is None
            assert (await c.attrs())["stream.length"] == "1"
            assert await put(c, b"second") == (200, b"2")
            io.short = True
            status, _ = await c.call("DELETE", "_indexes_=1")
            assert status == 503
            assert (await get_index(c, 1))["index"] == 1
    qlog = reopen(tmp_path, "short")
    assert contents(qlog) == [(1, b"first"), (2, b"second")]
    assert qlog.recovery.truncated_bytes == 0   # nothing torn was left behind
    qlog.close()
    assert_clean(tmp_path)


# -- fsync failures ------------------------------------------------------------------------------------


async def test_fsync_failure_on_put_is_503_and_the_entry_is_not_stored(tmp_path):
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv:
            c = await srv.client("fs")
            assert await put(c, b"durable") == (200, b"1")
            io.fail_fsync = True
            status, body = await put(c, b"lost", "requestId=rid-lost")
            assert status == 503 and "fsync" in one_line(body)
            assert await get_index(c, 2) is None
            assert (await c.call("GET", "requestId=rid-lost&_auto_delete_=false"))[0] == 204
            attrs = await c.attrs()
            assert (attrs["stream.length"], attrs["stream.lastEntry"]) == ("1", "1")
            # still failing: every put is refused
            assert (await put(c, b"lost too"))[0] == 503
            io.fail_fsync = False
            status, body = await put(c, b"after")
            assert status == 200 and int(body) > 2   # the rolled-back indexes are never reused
            after = int(body)
            assert (await get_index(c, after))["data"] == "YWZ0ZXI="
    qlog = reopen(tmp_path, "fs")
    assert contents(qlog) == [(1, b"durable"), (after, b"after")]
    assert qlog.find_request_id("rid-lost") is None
    qlog.close()
    assert_clean(tmp_path)


async def test_concurrent_puts_sharing_a_failed_fsync_all_fail(tmp_path):
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv:
            c0 = await srv.client("grp")
            assert await put(c0, b"d") == (200, b"1")
            io.fail_fsync = True
            results = []

            async def one(i):
                c = await srv.client("grp")
                results.append((i, *await put(c, b"p%d" % i)))

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
            assert sorted(r[1] for r in results) == [503] * 8
            io.fail_fsync = False
            assert (await put(c0, b"ok"))[0] == 200
    qlog = reopen(tmp_path, "grp")
    assert [d for _, d in contents(qlog)] == [b"d", b"ok"]
    qlog.close()


async def test_a_put_rolled_back_by_a_failed_roll_fsync_is_not_answered_200(tmp_path):
    """Put A waits for the group-commit flusher, whose fsync is slow; meanwhile put B needs a new
    segment and the inline fsync of the old one (storage's `_roll`) fails. That rollback removes A's
    record too, so A must not be answered 200, although the flusher's own fsync then succeeds."""
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always", segment_bytes=1024) as srv:
            c = await srv.client("race")
            assert await put(c, b"durable") == (200, b"1")
            results = {}
            io.hold()   # the flusher's next fsync (for A) waits at the gate

            async def put_a():
                results["A"] = await put(await srv.client("race"), b"A" * 100)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(put_a)
                await trio.to_thread.run_sync(io.gated.wait, 5)
                assert io.gated.is_set(), "the flusher never started its fsync"
                io.fail_fsync = True          # only the inline fsync of B's segment roll sees this
                results["B"] = await put(c, b"B" * 900)   # too big for the active segment: a roll
                io.fail_fsync = False
                io.release()
            assert results["B"][0] == 503, results
            assert results["A"][0] in (200, 503), results
            acked = [1] + [int(r[1]) for r in results.values() if r[0] == 200]
            if results["A"][0] == 200:
                assert await get_index(c, int(results["A"][1])) is not None, \
                    f"put A answered {results['A']} but its entry is gone"
    qlog = reopen(tmp_path, "race")
    stored = [i for i, _ in contents(qlog)]
    qlog.close()
    assert set(acked) <= set(stored), f"answered 200 but not stored: {sorted(set(acked) - set(stored))}"


async def test_a_disk_failure_is_logged_once_in_storages_words(tmp_path, caplog):
    """The local backend logs what storage said (the client's reason leaves it out) and the edge
    does not log the same failure again."""
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv:
            c = await srv.client("full")
            assert await put(c, b"a") == (200, b"1")
            io.full = True
            caplog.clear()
            status, body = await put(c, b"x")
            assert (status, one_line(body)) == (507, "no space left on the server's disk")
            io.full = False
    errors = [r.getMessage() for r in caplog.records if r.name == "qserve" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("queue full: put failed: "), errors
    assert errors[0] != "queue full: put failed: no space left on the server's disk"
