"""Delivery policies end to end through the HTTP and WebSocket API, in process on trio's clock:
the consumer lease (``delivery_timeout``), delayed negative commits (``_delay_``, ``retry_backoff``)
and the dead-letter queue (``max_deliveries``), each off by default; every test on both backends
(the `backend` fixture), where Redis differs the test says why."""

from __future__ import annotations

import json

import pytest
import trio

from qserve.config import Config, ConfigError

from ..helpers.inproc import next_frame, no_frame, running_server

LIMIT = 120


async def put_n(c, n, query=""):
    return [int((await c.call("POST", query, f"d{i}".encode()))[1]) for i in range(n)]


async def test_policies_are_off_by_default_and_shown_in_the_attributes(tmp_path, backend, recovering_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, **backend) as srv:
            c = await srv.client("plain")
            attrs = await c.attrs()
            assert {k: v for k, v in attrs.items() if k.startswith("policy.")} == {
                "policy.maxDeliveries": "0", "policy.retryBackoff": "", "policy.dedupWindow": "0",
                "policy.deliveryTimeout": "0", "policy.delayed": "0"}
        async with running_server(tmp_path, delivery_timeout=30.0, **backend,
                                  services={"ocr": {"max_deliveries": 4, "retry_backoff": "1s,2,1m"}}) as srv:
            attrs = await (await srv.client("ocr")).attrs()
            assert attrs["policy.maxDeliveries"] == "4" and attrs["policy.retryBackoff"] == "1s,2,60s"
            assert attrs["policy.deliveryTimeout"] == "30s"
            assert (await (await srv.client("other")).attrs())["policy.maxDeliveries"] == "0"


async def test_a_lease_that_runs_out_hands_the_entry_to_another_member(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, delivery_timeout=10.0, **backend) as srv, trio.open_nursery() as nursery:
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
            assert await metric(srv, "qserve_timed_out_total", "lease") == 1
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


async def test_a_delayed_negative_commit_hides_the_entry_until_due(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("later")
            first, second = await put_n(c, 2)
            ws = await srv.watch(nursery, "later", "_window_=1", user="w")
            assert (await next_frame(ws)).index == first
            assert (await c.call("PUT", f"_indexes_={first}&_negative_=true&_delay_=5s&_code_=429"))[0] == 200
            assert (await c.attrs())["policy.delayed"] == "1"
            assert await metric(srv, "qserve_queue_delayed", "later") == 1
            assert (await next_frame(ws)).index == second    # the delayed one keeps out of the way
            assert (await c.call("PUT", f"_indexes_={second}"))[0] == 200
            began = trio.current_time()
            back = await next_frame(ws, timeout=10)
            assert back.index == first and back.tags["lastCode"] == "429"
            assert 4.9 <= trio.current_time() - began <= 5.5
            assert (await c.attrs())["policy.delayed"] == "0"
            status, body = await c.call("PUT", f"_indexes_={first}&_negative_=true&_delay_=soon")
            assert status == 400 and b"_delay_" in body
            nursery.cancel_scope.cancel()


async def test_retry_backoff_grows_with_each_delivery(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, retry_backoff=(0.5, 3.0, 2.5), **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("backoff")
            [index] = await put_n(c, 1)
            ws = await srv.watch(nursery, "backoff", "_window_=1", user="w")
            waits = []
            assert (await next_frame(ws)).index == index
            for _ in range(4):
                await c.call("PUT", f"_indexes_={index}&_negative_=true")
                began = trio.current_time()
                assert (await next_frame(ws, timeout=30)).index == index
                waits.append(trio.current_time() - began)
            assert waits == pytest.approx([0.5, 1.5, 2.5, 2.5], abs=0.2)   # initial 0.5 s, times 3, at most 2.5 s
            nursery.cancel_scope.cancel()


async def test_max_deliveries_moves_the_entry_to_the_dead_letter_queue(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=3, **backend) as srv, trio.open_nursery() as nursery:
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
            assert await metric(srv, "qserve_dead_lettered_total", "poison") == 1
            # the dead-letter queue is an ordinary queue: watch it, commit there
            dl = await srv.watch(nursery, "poison/dlq", "_window_=1", user="ops")
            assert (await next_frame(dl)).data == b"poison"
            listing = json.loads((await c.request("GET", "/api/queues", b"", [("Authorization", "tok")]))[1])
            assert {q["queue"] for q in listing["queues"] if q["service"] == "poison"} == {"input", "dlq"}
            nursery.cancel_scope.cancel()


async def test_a_consumer_that_dies_on_an_entry_counts_as_a_delivery(tmp_path, backend, autojump_clock):
    """A worker that crashes on an entry (its socket closes) and comes back: the deliveries
    still count, so the entry ends in the dead-letter queue instead of crashing it for ever."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=2, **backend) as srv:
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


def test_every_backend_takes_the_policies_and_bad_settings_are_refused():
    for backend in ("", "redis://127.0.0.1:6379/0"):
        Config(backend=backend, max_deliveries=3, retry_backoff=(1.0, 2.0, 60.0), dedup_window=60.0,
               delivery_timeout=30.0, services={"x": {"max_deliveries": 2, "delivery_timeout": "1m"}})
    with pytest.raises(ConfigError, match="retry_backoff: the factor"):
        Config(services={"x": {"retry_backoff": "1s,0.5,2s"}})
    with pytest.raises(ConfigError, match="services.x: unknown setting 'max_delivery'"):
        Config(services={"x": {"max_delivery": 3}})


async def metric(srv, name: str, service: str, queue: str = "input") -> float:
    c = await srv.client(service)
    _, body = await c.request("GET", "/metrics", b"", [("Authorization", "tok")])
    prefix = f'{name}{{queue="{queue}",service="{service}"}} '
    return float(next(line[len(prefix):] for line in body.decode().splitlines() if line.startswith(prefix)))


class Clock:
    """A wall clock the test moves (the puts' timestamps and the dedup window read it)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_put_retried_within_the_dedup_window_stores_nothing(tmp_path, backend, autojump_clock):
    clock = Clock()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, dedup_window=300.0, wall_clock=clock, **backend) as srv:
            c = await srv.client("idem")
            head, body = await c.request("POST", "/api/predict/idem?requestId=order-1", b"first",
                                         [("Authorization", "tok")])
            assert head.status_code == 200
            original = int(body)
            assert dict(head.headers).get(b"x-qserve-duplicate") is None
            # the retry (same requestId, any body) answers the original index and stores nothing
            head, body = await c.request("POST", "/api/predict/idem?requestId=order-1", b"retry",
                                         [("Authorization", "tok")])
            headers = dict(head.headers)
            assert head.status_code == 200 and int(body) == original
            assert headers[b"x-qserve-duplicate"] == b"1"
            assert headers[b"x-eas-queueservice-request-id"] == b"order-1"
            assert (await c.attrs())["stream.length"] == "1"
            # concurrent retries: one entry
            answers = []
            async with trio.open_nursery() as nursery:
                async def put_once():
                    client = await srv.client("idem")
                    answers.append(int((await client.call("POST", "requestId=order-2", b"x"))[1]))
                for _ in range(5):
                    nursery.start_soon(put_once)
            assert len(set(answers)) == 1
            assert (await c.attrs())["stream.length"] == "2"
            assert await metric(srv, "qserve_deduplicated_total", "idem") == 5
            assert await metric(srv, "qserve_puts_total", "idem") == 2
            # consumed, the requestId still deduplicates within the window
            status, _ = await c.call("GET", "requestId=order-1")
            assert status == 200 and (await c.attrs())["stream.length"] == "1"
            assert int((await c.call("POST", "requestId=order-1", b"again"))[1]) == original
            # server-generated requestIds never collide; past the window a requestId is new again
            fresh = [int((await c.call("POST", "", b"n"))[1]) for _ in range(3)]
            assert len(set(fresh)) == 3
            clock.now += 301
            assert int((await c.call("POST", "requestId=order-1", b"later"))[1]) > max(fresh)


@pytest.fixture
def recovering_clock():
    """trio's autojump clock, jumping only after 0.25 s of real idleness: a queue reopened from disk
    recovers in a worker thread, and waiting for it must not let the clock jump to the test's limit."""
    return trio.testing.MockClock(autojump_threshold=0.25)


async def test_the_dedup_window_survives_a_restart(tmp_path, backend, recovering_clock):
    """Local: read back from the segment files; Redis: kept there (`dd`, `di` of the queue)."""
    clock = Clock()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, dedup_window=60.0, wall_clock=clock, **backend) as srv:
            c = await srv.client("idem")
            kept = int((await c.call("POST", "requestId=kept", b"k"))[1])
            consumed = int((await c.call("POST", "requestId=consumed", b"c"))[1])
            assert (await c.call("DELETE", f"_indexes_={consumed}"))[0] == 200
            clock.now += 30
            late = int((await c.call("POST", "requestId=late", b"l"))[1])
        clock.now += 40   # "kept" and "consumed" are 70 s old now, "late" 40 s
        async with running_server(tmp_path, dedup_window=60.0, wall_clock=clock, **backend) as srv:
            c = await srv.client("idem")
            head, body = await c.request("POST", "/api/predict/idem?requestId=late", b"l",
                                         [("Authorization", "tok")])
            assert int(body) == late and dict(head.headers)[b"x-qserve-duplicate"] == b"1"
            assert int((await c.call("POST", "requestId=consumed", b"c"))[1]) > late   # out of the window
        clock.now -= 40   # the same data seen from within the window of all three
        async with running_server(tmp_path, dedup_window=600.0, wall_clock=clock, **backend) as srv:
            c = await srv.client("idem")
            again = int((await c.call("POST", "requestId=kept", b"k"))[1])
            if backend:   # Redis forgot "kept" at the last run's puts, past its 60 s window then: a
                assert again > late   # wider window later has nothing to read it back from (README)
            else:         # the segment files still hold it
                assert again == kept
            assert int((await c.call("POST", "requestId=late", b"l"))[1]) == late
