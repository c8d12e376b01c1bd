"""qserve's own client (`qserve.client`) against a real `qserve serve` process on loopback, on every
queue backend (local and Redis: the `server` fixture below; the restart test starts its own)."""

from __future__ import annotations

import socket

import pytest
import trio

from qserve.client import BlockingQueueClient, ConnectError, QueueClient, QueueError

from ..helpers.process import ServerProcess, backend_args

LIMIT = 30  # seconds of trio time for any one test


@pytest.fixture
def server(backend_server):
    """The session's server on the backend under test: this module runs on every backend."""
    return backend_server


def make(server, service, **kwargs) -> QueueClient:
    kwargs.setdefault("token", server.token)
    return QueueClient(f"{server.url}/api/predict/{service}", **kwargs)


async def test_put_get_by_index_and_request_id(server, service):
    with trio.fail_after(LIMIT):
        async with make(server, service) as q:
            index, rid = await q.put(b"hello", {"lang": "en"})
            assert index == 1 and len(rid) == 36
            [e] = await q.get(index=index, auto_delete=False)
            assert (e.index, e.data, e.tags["lang"], e.tags["requestId"]) == (1, b"hello", "en", rid)
            _, rid2 = await q.put(b"second", {"requestId": "my-id"})
            assert rid2 == "my-id"
            [e] = await q.get(request_id="my-id")              # auto-delete (the default)
            assert (e.index, e.data) == (2, b"second")
            assert await q.get(request_id="my-id") == []
            assert [e.data for e in await q.get(length=10, auto_delete=False)] == [b"hello"]
            assert await q.get(tags={"lang": "fr"}) == []


async def test_long_poll_get_is_woken_by_a_put(server, service):
    with trio.fail_after(LIMIT):
        async with make(server, service) as q, trio.open_nursery() as nursery:
            got = []

            async def poll():
                # woken by the put, long before its own timeout: a wake-up lost between the get's
                # read and its wait (a put during the read's Redis round trip) fails here
                with trio.fail_after(15):
                    got.extend(await q.get(timeout=50))
            nursery.start_soon(poll)
            await trio.testing.wait_all_tasks_blocked()
            await q.put(b"late")
        assert [e.data for e in got] == [b"late"]


async def test_sink_attributes_delete_truncate_search_count(server, service):
    with trio.fail_after(LIMIT):
        async with make(server, service) as q, q.sink() as sink:
            assert str(sink.url).endswith(f"/{service}/sink") and sink.user == q.user
            await sink.put(b"result", {"requestId": "r1"})
            attrs = await sink.attributes()
            assert attrs["meta.name"] == f"{service}/sink" and attrs["stream.length"] == "1"
            for i in range(5):
                await q.put(f"d{i}".encode(), priority=1 if i == 4 else 0)
            await q.delete(2)
            await q.delete([3, 99])                            # unknown index: harmless
            assert (await q.attributes())["stream.length"] == "3"
            assert await q.search(4) == {"IsPending": False, "WaitCount": 2}   # 1 and the priority 5
            assert await q.search(3) == {}
            assert await q.count() == 3 and await q.count(priority=1) == 1
            await q.truncate(4)
            attrs = await q.attributes()
            assert (attrs["stream.firstEntry"], attrs["stream.length"]) == ("4", "2")
            with pytest.raises(ValueError):
                await q.put(b"x", {"_priority_": "1"})           # system parameters are not tags


async def test_end_refuses_later_puts(server, service):
    with trio.fail_after(LIMIT):
        async with make(server, service) as q:
            await q.put(b"x")
            await q.end()
            with pytest.raises(QueueError) as info:
                await q.put(b"y")
            assert info.value.status == 409 and "\n" not in info.value.reason
            assert (await q.attributes())["meta.state"] == "End"


async def test_watch_with_auto_commit_empties_the_queue(server, service):
    with trio.fail_after(LIMIT):
        async with make(server, service) as q:
            ids = [(await q.put(str(i).encode()))[1] for i in range(10)]
            got = []
            async with q.watch(window=3, auto_commit=True) as w:
                async for e in w:
                    got.append(e)
                    if len(got) == 10:
                        break
            assert [e.tags["requestId"] for e in got] == ids
            assert await q.count() == 0


async def test_watch_with_manual_commit_and_negative(server, service):
    with trio.fail_after(LIMIT):
        async with make(server, service) as q:
            await q.put(b"a")
            await q.put(b"b")
            seen = []
            async with q.watch(window=1) as w:
                async for e in w:
                    seen.append((e.index, e.tags.get("lastCode")))
                    if len(seen) == 1:
                        await q.negative(e.index, code="Retry", reason="not now")
                    else:
                        await q.commit(e.index)
                    if len(seen) == 3:
                        break
            assert seen == [(1, None), (1, "Retry"), (2, None)]
            assert await q.count() == 0


async def test_index_only_and_tag_filtered_watch(server, service):
    with trio.fail_after(LIMIT):
        async with make(server, service) as q:
            await q.put(b"skip", {"k": "no"})
            await q.put(b"payload", {"k": "yes"})
            async with q.watch(index_only=True, auto_commit=True, tags={"k": "yes"}) as w:
                e = await w.__anext__()
            assert (e.index, e.data, e.tags["k"]) == (2, b"", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_watch_reconnects_after_a_restart_and_gets_uncommitted_entries_again(tmp_path, backend_url):
    srv = ServerProcess(tmp_path / "data", "--port", str(free_port()), *backend_args(backend_url)).start()
    try:
        with trio.fail_after(LIMIT):
            async with make(srv, "restart") as q:
                for i in range(3):
                    await q.put(f"d{i}".encode())
                async with q.watch(window=5, reconnect_delay=0.05) as w:
                    first = [await w.__anext__() for _ in range(3)]       # delivered, not committed
                    port = srv.port
                    await trio.to_thread.run_sync(srv.restart)
                    assert srv.port == port
                    again = [await w.__anext__() for _ in range(3)]
                    await q.commit([e.index for e in again])              # the stale keep-alive is replaced
                    assert w.connects == 2
                assert [e.index for e in again] == [e.index for e in first] == [1, 2, 3]
                assert await q.count() == 0
    finally:
        srv.kill()


async def test_wrong_token_and_unreachable_server(server, service):
    with trio.fail_after(LIMIT):
        async with make(server, service, token="wrong") as q:
            with pytest.raises(QueueError) as info:
                await q.put(b"x")
            assert info.value.status == 401
            with pytest.raises(QueueError) as info:
                async with q.watch():
                    pass
            assert info.value.status == 401
        async with QueueClient("http://127.0.0.1:1/api/predict/x", retries=1) as q:
            with pytest.raises(ConnectError) as info:
                await q.attributes()
            assert info.value.status == 0
            assert str(info.value) == "cannot reach http://127.0.0.1:1: connection refused"
        with pytest.raises(ValueError):
            QueueClient("ftp://host/x")


async def test_concurrent_puts_share_a_bounded_pool(server, service):
    with trio.fail_after(LIMIT):
        async with make(server, service, max_connections=2) as q:
            indexes = []

            async def put(i):
                indexes.append((await q.put(str(i).encode()))[0])
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(put, i)
            assert sorted(indexes) == list(range(1, 21))


def test_blocking_facade(server, service):
    with BlockingQueueClient(f"{server.url}/api/predict/{service}", token=server.token) as q:
        assert q.put(b"one")[0] == 1 and q.put(b"two")[0] == 2
        assert q.attributes()["stream.length"] == "2"
        [e] = q.get(index=2, auto_delete=False)
        assert e.data == b"two"
        with q.watch(window=1) as w:
            for e in w:
                q.commit(e.index)
                if e.index == 2:
                    break
        assert q.count() == 0
        assert q.sink().put(b"r")[0] == 1
        with pytest.raises(QueueError) as info:
            BlockingQueueClient(q.client.url.origin + f"/api/predict/{service}", token="bad").put(b"x")
        assert info.value.status == 401
