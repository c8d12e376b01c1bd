"""The backend seam's contract (`qserve.backends.base`), exercised directly on every backend.

Each test runs once per name in `helpers.backends.BACKENDS` ("local", "redis": the `backend_name`
and `backend_url` fixtures of tests/conftest.py; "redis" on a real `redis-server`), through the
Protocol's operations only: what the server relies on, stated once for all.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from qserve.backends.base import QueueStatus
from qserve.core.errors import Conflict, NotFound, PayloadTooLarge, QueueFull
from qserve.core.events import ConsumerSpec, QueueRef

from ..helpers.backends import open_backend

LIMIT = 10
Q = QueueRef("svc")


async def _put_many(queue, n, **tags):
    return [await queue.put(f"e{i}".encode(), {"requestId": f"r{i}", **tags}, 0) for i in range(n)]


async def test_put_and_read_by_index_request_id_and_tags(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            assert queue.ref == Q and await queue.next_index() == 1
            assert await _put_many(queue, 3) == [1, 2, 3]          # indexes from 1
            assert await queue.put(b"x", {"requestId": "rx", "kind": "x"}, 0) == 4
            assert await queue.next_index() == 5
            assert [e.index for e in await queue.read(2, {}, 2)] == [2, 3]   # _length_
            assert [e.data for e in await queue.read(0, {}, 10)] == [b"e0", b"e1", b"e2", b"x"]
            [found] = await queue.read(0, {"requestId": "r1"}, 10)
            assert (found.index, found.data, found.tags["requestId"]) == (2, b"e1", "r1")
            assert await queue.read(3, {"requestId": "r1"}, 10) == []        # before start
            assert [e.index for e in await queue.read(0, {"kind": "x"}, 10)] == [4]
            assert await queue.read(0, {"kind": "y"}, 10) == []


async def test_a_repeated_request_id_names_its_newest_live_entry(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            for data in (b"first", b"second", b"third"):
                await queue.put(data, {"requestId": "same"}, 0)
            assert [e.data for e in await queue.read(0, {"requestId": "same"}, 10)] == [b"third"]
            await queue.delete([3])                       # the newest goes: the one before answers
            assert [e.data for e in await queue.read(0, {"requestId": "same"}, 10)] == [b"second"]
            await queue.delete([1])                       # an older one goes: nothing changes
            assert [e.data for e in await queue.read(0, {"requestId": "same"}, 10)] == [b"second"]
            await queue.delete([2])
            assert await queue.read(0, {"requestId": "same"}, 10) == []


async def test_read_with_delete_takes_the_entries_once(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            await _put_many(queue, 4)
            first = await queue.read(0, {}, 2, delete=True)
            second = await queue.read(0, {}, 2, delete=True)
            assert [e.index for e in first] == [1, 2] and [e.index for e in second] == [3, 4]
            assert await queue.count(None, {}) == 0


async def test_delete_truncate_and_count_indexes_never_reused(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            await _put_many(queue, 3, kind="a")
            await queue.put(b"p", {"requestId": "rp"}, 5)
            assert await queue.count(None, {}) == 4
            assert await queue.count(5, {}) == 1
            assert await queue.count(None, {"kind": "a"}) == 3
            assert await queue.count(0, {"kind": "a"}) == 3
            await queue.delete([2, 99])                 # unknown indexes are ignored
            assert [e.index for e in await queue.read(0, {}, 10)] == [1, 3, 4]
            await queue.truncate(4)
            assert [e.index for e in await queue.read(0, {}, 10)] == [4]
            await queue.truncate(10**6)
            assert await queue.count(None, {}) == 0
            assert await queue.put(b"after", {"requestId": "ra"}, 0) == 5


async def test_end_refuses_puts_and_force_keeps_only_pending(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            await _put_many(queue, 4)
            await queue.attach(ConsumerSpec("g", "a", window=1))
            [held] = await queue.deliver("g.a")
            await queue.end(force=True)
            assert [e.index for e in await queue.read(0, {}, 10)] == [held.index]
            assert (await queue.attributes())["meta.state"] == "End"
            with pytest.raises(Conflict):
                await queue.put(b"late", {"requestId": "late"}, 0)


async def test_attributes_listing_and_search(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            await _put_many(queue, 3)
            await queue.delete([1])
            await queue.attach(ConsumerSpec("g", "a", window=5))
            await queue.deliver("g.a")
            attrs = await queue.attributes()
            assert (attrs["meta.name"], attrs["meta.state"], attrs["queue.state"]) == (Q.name, "Normal", "open")
            assert (attrs["stream.length"], attrs["stream.firstEntry"], attrs["stream.lastEntry"]) == ("2", "2", "3")
            assert all(isinstance(v, str) for v in attrs.values())
            assert await backend.listing() == [QueueStatus(Q, length=2, first_index=2, last_index=3,
                                                           consumers=1, groups=1)]
            assert (await queue.search(2)) is not None


async def test_get_honours_auto_create(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, auto_create=False, redis_url=backend_url) as backend:
            with pytest.raises(NotFound):
                await backend.get(Q)
            await backend.create("svc")
            assert (await backend.get(QueueRef("svc", sink=True))).ref.sink


async def test_window_commit_and_negative_to_another_member(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            await _put_many(queue, 3)
            await queue.attach(ConsumerSpec("g", "a", window=2))
            assert queue.wants() == ["g.a"]
            got = await queue.deliver("g.a")
            assert [e.index for e in got] == [1, 2]
            assert await queue.deliver("g.a") == [] and queue.wants() == []   # window full
            await queue.commit([1])
            assert [e.index for e in await queue.deliver("g.a")] == [3]
            assert await queue.count(None, {}) == 2                         # committed = deleted
            await queue.attach(ConsumerSpec("g", "b", window=2))
            await queue.negative([2], "500", "worker failed")
            [again] = await queue.deliver("g.b")
            assert again.index == 2
            tags = queue.tags_of(again)
            assert (tags["lastCode"], tags["lastReason"]) == ("500", "worker failed")


async def test_release_gives_entries_back_to_the_group(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            await _put_many(queue, 2)
            await queue.attach(ConsumerSpec("g", "a", window=5))
            await queue.attach(ConsumerSpec("g", "b", window=5))
            assert [e.index for e in await queue.deliver("g.a")] == [1, 2]
            assert await queue.deliver("g.b") == []
            await queue.release("g.a")
            assert [e.index for e in await queue.deliver("g.b")] == [1, 2]


async def test_take_deletes_the_batch_and_sent_frees_the_window(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, fsync="always", redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            await _put_many(queue, 3)
            await queue.attach(ConsumerSpec("g", "a", window=2, auto_commit=True))
            mark, entries, indexes = await queue.take("g.a")
            assert [e.index for e in entries] == indexes == [1, 2]
            await queue.wait_durable(mark, first=True)
            assert await queue.count(None, {}) == 1                         # deleted when taken
            assert await queue.take("g.a") is None                          # window: not yet sent
            queue.sent("g.a", indexes)
            _, entries, _ = await queue.take("g.a")
            assert [e.index for e in entries] == [3]


async def test_wake_ups_on_change_and_put_waiters(backend_name, backend_url, tmp_path):
    changes = []
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, changes, redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            with queue.put_waiter(1, {"kind": "x"}) as for_x, queue.put_waiter(1, {"requestId": "r9"}) as for_r9:
                await queue.put(b"y", {"requestId": "r1", "kind": "y"}, 0)
                assert not for_x.is_set() and not for_r9.is_set()
                assert (Q, 1) in changes                                   # a put names its entry
                await queue.put(b"x", {"requestId": "r2", "kind": "x"}, 0)
                assert for_x.is_set() and not for_r9.is_set()
                changes.clear()
                await queue.delete([1])
                assert changes and all(entry is None for _, entry in changes)   # anything else: None
                backend.wake_long_polls()
                assert for_r9.is_set()


async def test_a_durable_put_survives_reopening(backend_name, backend_url, tmp_path):
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, fsync="always", redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            await _put_many(queue, 2)
            await queue.end(force=False)
        async with open_backend(backend_name, tmp_path, redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            assert [e.data for e in await queue.read(0, {}, 10)] == [b"e0", b"e1"]
            assert await queue.next_index() == 3
            with pytest.raises(Conflict):
                await queue.put(b"late", {"requestId": "late"}, 0)


async def test_refusals_are_the_core_errors_a_client_sees(backend_name, backend_url, tmp_path):
    """The seam raises `qserve.core.errors` types only: the server maps nothing of a backend's own."""
    with trio.fail_after(LIMIT):
        async with open_backend(backend_name, tmp_path, max_payload_bytes=8, max_length=2,
                                redis_url=backend_url) as backend:
            queue = await backend.get(Q)
            with pytest.raises(PayloadTooLarge) as too_large:
                await queue.put(b"123456789", {"requestId": "big"}, 0)
            assert (too_large.value.http_status, too_large.value.ws_close_code) == (413, 1009)
            await _put_many(queue, 2)
            with pytest.raises(QueueFull) as full:
                await queue.put(b"one more", {"requestId": "more"}, 0)
            assert (full.value.http_status, full.value.headers) == (429, [("Retry-After", "1")])
            assert await queue.count(None, {}) == 2
