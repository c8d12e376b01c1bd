"""Delivery policies end to end through the HTTP and WebSocket API, in process on trio's clock:
the consumer lease (``delivery_timeout``), delayed negative commits (``_delay_``, ``retry_backoff``)
and the dead-letter queue (``max_deliveries``), each off by default. The local backend only: the
Redis backend refuses these settings at start (tested here too) until it has them."""

from __future__ import annotations

import json

import pytest
import trio

from qserve.config import Config, ConfigError

from ..helpers.inproc import next_frame, no_frame, running_server

LIMIT = 120


async def put_n(c, n, query=""):
    return [int((await c.call("POST", query, f"d{i}".encode()))[1]) for i in range(n)]


async def test_policies_are_off_by_default_and_shown_in_the_attributes(tmp_path, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path) as srv:
            c = await srv.client("plain")
            attrs = await c.attrs()
            assert {k: v for k, v in attrs.items() if k.startswith("policy.")} == {
                "policy.maxDeliveries": "0", "policy.retryBackoff": "", "policy.dedupWindow": "0",
                "policy.deliveryTimeout": "0", "policy.delayed": "0"}
        async with running_server(tmp_path, delivery_timeout=30.0, services={"ocr": {"max_deliveries": 4,
                                                                                     "retry_backoff": "1s,2,1m"}}) as srv:
            attrs = await (await srv.client("ocr")).attrs()
            assert attrs["policy.maxDeliveries"] == "4" and attrs["policy.retryBackoff"] == "1s,2s,60s"
            assert attrs["policy.deliveryTimeout"] == "30s"
            assert (await (await srv.client("other")).attrs())["policy.maxDeliveries"] == "0"


async def test_a_lease_that_runs_out_hands_the_entry_to_another_member(tmp_path, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, delivery_timeout=10.0) as srv, trio.open_nursery() as nursery:
            c = await srv.client("lease")
            [index] = await put_n(c, 1)
            hung = await srv.watch(nursery, "lease", "_window_=1", user="hung")
            first = await next_frame(hung)
            assert first.index == index
            other = await srv.watch(nursery, "lease", "_window_=1", user="other")
            assert await no_frame(other, wait=9.0)          # still within the lease
            again = await next_frame(other, timeout=3.0)    # at 10 s the entry moves on
            assert again.index == index
            assert again.tags["lastCode"] == "timeout" and "held by g.hung" in again.tags["lastReason"]
            # the hung consumer's slot is free: a new entry may reach it
            [second] = await put_n(c, 1)
            assert (await next_frame(hung)).index == second
            # its late commit is a harmless 200 that deletes nothing the new holder has
            status, _ = await c.call("PUT", f"_indexes_={index}", headers=[("X-EAS-QueueService-Gid", "g"),
                                                                         ("X-EAS-QueueService-Uid", "hung")])
            assert status == 200
            assert json.loads((await c.call("GET", f"_search_=true&_index_={index}"))[1])["IsPending"] is True
            # the holder's commit deletes it
            status, _ = await c.call("PUT", f"_indexes_={index}", headers=[("X-EAS-QueueService-Gid", "g"),
                                                                         ("X-EAS-QueueService-Uid", "other")])
            assert status == 200
            assert json.loads((await c.call("GET", f"_search_=true&_index_={index}"))[1]) == {}   # gone
            nursery.cancel_scope.cancel()


async def test_a_delayed_negative_commit_hides_the_entry_until_due(tmp_path, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path) as srv, trio.open_nursery() as nursery:
            c = await srv.client("later")
            first, second = await put_n(c, 2)
            ws = await srv.watch(nursery, "later", "_window_=1", user="w")
            assert (await next_frame(ws)).index == first
            assert (await c.call("PUT", f"_indexes_={first}&_negative_=true&_delay_=30s&_code_=429"))[0] == 200
            assert (await c.attrs())["policy.delayed"] == "1"
            assert (await next_frame(ws)).index == second    # the delayed one keeps out of the way
            assert (await c.call("PUT", f"_indexes_={second}"))[0] == 200
            began = trio.current_time()
            back = await next_frame(ws, timeout=40)
            assert back.index == first and back.tags["lastCode"] == "429"
            assert 29.5 <= trio.current_time() - began <= 31
            assert (await c.attrs())["policy.delayed"] == "0"
            status, body = await c.call("PUT", f"_indexes_={first}&_negative_=true&_delay_=soon")
            assert status == 400 and b"_delay_" in body
            nursery.cancel_scope.cancel()


async def test_retry_backoff_grows_with_each_delivery(tmp_path, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, retry_backoff=(2.0, 3.0, 10.0)) as srv, trio.open_nursery() as nursery:
            c = await srv.client("backoff")
            [index] = await put_n(c, 1)
            ws = await srv.watch(nursery, "backoff", "_window_=1", user="w")
            waits = []
            assert (await next_frame(ws)).index == index
            for _ in range(4):
                await c.call("PUT", f"_indexes_={index}&_negative_=true")
                began = trio.current_time()
                assert (await next_frame(ws, timeout=30)).index == index
                waits.append(round(trio.current_time() - began))
            assert waits == [2, 6, 10, 10]      # initial 2 s, times 3, at most 10 s
            nursery.cancel_scope.cancel()


async def test_max_deliveries_moves_the_entry_to_the_dead_letter_queue(tmp_path, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=3) as srv, trio.open_nursery() as nursery:
            c = await srv.client("poison")
            good, bad = await put_n(c, 2, "requestId=")
            status, _ = await c.call("POST", "requestId=req-bad", b"poison")
            ws = await srv.watch(nursery, "poison", "_window_=5", user="w")
            frames = [await next_frame(ws) for _ in range(3)]
            poison = next(f.index for f in frames if f.data == b"poison")
            await c.call("PUT", f"_indexes_={good},{bad}")
            for delivery in (1, 2):
                await c.call("PUT", f"_indexes_={poison}&_negative_=true&_code_=500&_reason_=boom-{delivery}")
                assert (await next_frame(ws)).index == poison
            # the third delivery's negative commit ends it there, gone for every group
            await c.call("PUT", f"_indexes_={poison}&_negative_=true&_code_=500&_reason_=boom-3")
            assert await no_frame(ws)
            assert (await c.attrs())["stream.length"] == "0"
            status, body = await c.call("GET", "_index_=1&_length_=10&_raw_=false&_auto_delete_=false", dlq=True)
            assert status == 200
            [moved] = json.loads(body)
            tags = moved["tags"]
            assert tags["dlq.queue"] == "poison" and tags["dlq.index"] == str(poison)
            assert tags["dlq.requestId"] == tags["requestId"] == "req-bad"
            assert tags["dlq.deliveries"] == "3" and tags["dlq.group"] == "g"
            assert tags["lastCode"] == "500" and tags["lastReason"] == "boom-3"
            # the dead-letter queue is an ordinary queue: watch it, commit there
            dl = await srv.watch(nursery, "poison/dlq", "_window_=1", user="ops")
            assert (await next_frame(dl)).data == b"poison"
            listing = json.loads((await c.request("GET", "/api/queues", b"", [("Authorization", "tok")]))[1])
            assert {q["queue"] for q in listing["queues"] if q["service"] == "poison"} == {"input", "dlq"}
            nursery.cancel_scope.cancel()


async def test_a_consumer_that_dies_on_an_entry_counts_as_a_delivery(tmp_path, autojump_clock):
    """A worker that crashes on an entry (its socket closes) and comes back: the deliveries
    still count, so the entry ends in the dead-letter queue instead of crashing it for ever."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=2) as srv:
            c = await srv.client("crashy")
            [index] = await put_n(c, 1)
            for _ in range(2):
                async with trio.open_nursery() as nursery:
                    ws = await srv.watch(nursery, "crashy", "_window_=1", user="w")
                    assert (await next_frame(ws)).index == index
                    await ws.aclose()
            with trio.fail_after(10):
                while (await c.attrs(dlq=True)).get("stream.length") != "1":
                    await trio.sleep(0.1)
            assert (await c.attrs())["stream.length"] == "0"
            body = json.loads((await c.call("GET", "_index_=1&_raw_=false&_auto_delete_=false", dlq=True))[1])
            assert body[0]["tags"]["lastCode"] == "detached"


def test_redis_refuses_the_policies_until_it_has_them():
    with pytest.raises(ConfigError, match="not available with --backend redis yet"):
        Config(backend="redis://127.0.0.1:6379/0", max_deliveries=3)
    with pytest.raises(ConfigError, match="retry_backoff: the factor"):
        Config(retry_backoff=(1.0, 0.5, 2.0)) if False else Config(**{"services": {"x": {"retry_backoff": "1s,0.5,2s"}}})
