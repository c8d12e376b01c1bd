"""The server's limits, in-process: the number of queues (507), a full queue (429 with Retry-After,
nothing stored), and trim_oldest making room instead."""

from __future__ import annotations

import trio

from ..helpers.inproc import running_server


async def test_queue_count_is_bounded(tmp_path, backend):
    with trio.fail_after(30):
        async with running_server(tmp_path, **backend, max_queues=3) as srv:
            a = await srv.client("a")
            assert (await a.call("POST", "", b"x"))[0] == 200          # queue 1: a
            assert (await a.call("POST", "", b"x", sink=True))[0] == 200  # queue 2: a/sink
            b = await srv.client("b")
            assert (await b.call("POST", "", b"x"))[0] == 200          # queue 3
            c = await srv.client("c")
            status, body = await c.call("POST", "", b"x")
            assert status == 507 and b"limit of 3 queues" in body
            assert (await a.call("POST", "", b"y"))[0] == 200          # existing queues keep working


async def test_full_queue_is_429_with_retry_after_and_stores_nothing(tmp_path, backend):
    with trio.fail_after(30):
        async with running_server(tmp_path, **backend, max_length=2) as srv:
            c = await srv.client("full")
            assert [(await c.call("POST", "", b"x"))[0] for _ in range(2)] == [200, 200]
            head, body = await c.request("POST", "/api/predict/full", b"x", [("Authorization", "tok")])
            assert head.status_code == 429 and dict(head.headers)[b"retry-after"] == b"1"
            assert body.count(b"\n") == 1
            attrs = await c.attrs()
            assert (attrs["stream.length"], attrs["stream.lastEntry"], attrs["stream.approxMaxLength"]) == ("2", "2", "2")
            assert (await c.call("DELETE", "_index_=1"))[0] == 200
            status, body = await c.call("POST", "", b"y")
            assert (status, body) == (200, b"3")


async def test_trim_oldest_makes_room_instead_of_429(tmp_path, backend):
    with trio.fail_after(30):
        async with running_server(tmp_path, **backend, max_length=2, trim_oldest=True) as srv:
            c = await srv.client("trim")
            assert [(await c.call("POST", "", f"d{i}".encode()))[1] for i in range(5)] == \
                [b"1", b"2", b"3", b"4", b"5"]
            attrs = await c.attrs()
            assert (attrs["stream.length"], attrs["stream.firstEntry"], attrs["stream.lastEntry"]) == ("2", "4", "5")
            status, body = await c.call("GET", "_index_=0&_auto_delete_=false")
            assert (status, body) == (200, b"d3")
