"""Two nodes on one Redis, in process (each a whole server over memory streams): what one node does
reaches the other's clients at once, and the consumer-group state is one for both; plus the Redis
failure modes a client meets (out of memory: 507; a WAIT that replicas do not meet: 503)."""

from __future__ import annotations

import base64
import json

import coredis
import msgpack
import trio

from qserve.backends.redis.keys import REGISTRY, QueueKeys
from qserve.backends.redis.manager import LEASE_CHECK
from qserve.core.events import QueueRef

from ..helpers.inproc import next_frame, no_frame, running_server

LIMIT = 60


async def _long_poll_then_put(waiter, query: str, putter, data: bytes) -> dict:
    """A long-polling GET (``query``) through ``waiter``; 5 s later, still unanswered, a put of
    ``data`` through ``putter``. Returns the GET's (status, body) as ``resp`` and the clock when it
    began (``t0``), when the put was answered (``put_at``) and when the GET was (``t1``)."""
    result = {}

    async def wait_get():
        result["t0"] = trio.current_time()
        result["resp"] = await waiter.call("GET", query)
        result["t1"] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_get)
        await trio.sleep(5)
        assert "resp" not in result
        assert (await putter.call("POST", "", data))[0] == 200
        result["put_at"] = trio.current_time()
    return result


async def test_a_long_poll_on_one_node_is_woken_by_a_put_through_another(tmp_path, redis_url, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "a", backend=redis_url) as a, \
                running_server(tmp_path / "b", backend=redis_url) as b:
            waiter, putter = await b.client("x"), await a.client("x")
            result = await _long_poll_then_put(waiter, "_timeout_=20s&_raw_=false", putter, b"across")
            status, body = result["resp"]
            assert status == 200 and base64.b64decode(json.loads(body)[0]["data"]) == b"across"
            assert 5 <= result["t1"] - result["t0"] < 6   # woken by the put, not by the timeout


async def test_one_group_across_two_nodes_splits_the_entries_within_windows(tmp_path, redis_url,
                                                                             autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "a", backend=redis_url) as a, \
                running_server(tmp_path / "b", backend=redis_url) as b, trio.open_nursery() as nursery:
            c = await a.client("g")
            wa = await a.watch(nursery, "g", "_window_=2", user="on-a")
            wb = await b.watch(nursery, "g", "_window_=3", user="on-b")
            for i in range(8):
                assert (await c.call("POST", "", f"e{i}".encode()))[0] == 200
            got_a = [await next_frame(wa) for _ in range(2)]
            got_b = [await next_frame(wb) for _ in range(3)]
            assert await no_frame(wa) and await no_frame(wb)      # both windows full
            ia, ib = {f.index for f in got_a}, {f.index for f in got_b}
            assert not ia & ib and len(ia | ib) == 5
            attrs = await (await b.client("g")).attrs()         # node B lists node A's consumer too
            assert attrs["consumers.stats.total"] == "2"
            lines = [v for k, v in attrs.items() if k.startswith("consumers.list.")]
            assert any("Id: g.on-a," in v and "Pending: 2" in v for v in lines)
            assert any("Id: g.on-b," in v and "Pending: 3" in v for v in lines)
            # a commit through node B frees node A's consumer's slots: A's watcher gets more at once
            assert (await (await b.client("g")).call("PUT", "_indexes_=" + ",".join(map(str, ia))))[0] == 200
            more = {(await next_frame(wa)).index, (await next_frame(wa)).index}
            assert not more & (ia | ib)
            nursery.cancel_scope.cancel()


async def test_a_negative_commit_on_one_node_goes_to_the_member_on_the_other(tmp_path, redis_url,
                                                                           autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "a", backend=redis_url) as a, \
                running_server(tmp_path / "b", backend=redis_url) as b, trio.open_nursery() as nursery:
            c = await a.client("n")
            wa = await a.watch(nursery, "n", "_window_=1", user="on-a")
            assert (await c.call("POST", "", b"poison"))[0] == 200
            first = await next_frame(wa)
            wb = await b.watch(nursery, "n", "_window_=1", user="on-b")
            assert (await c.call("PUT", f"_indexes_={first.index}&_negative_=true", b"_code_=500"))[0] == 200
            moved = await next_frame(wb)
            assert moved.index == first.index and moved.tags["lastCode"] == "500"
            assert await no_frame(wa)
            nursery.cancel_scope.cancel()


async def test_the_same_consumer_on_another_node_replaces_the_stale_socket(tmp_path, redis_url,
                                                                         autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "a", backend=redis_url) as a, \
                running_server(tmp_path / "b", backend=redis_url) as b, trio.open_nursery() as nursery:
            c = await a.client("r")
            for i in range(2):
                await c.call("POST", "", f"e{i}".encode())
            old = await a.watch(nursery, "r", "_window_=2", user="same")
            assert {(await next_frame(old)).index for _ in range(2)} == {1, 2}
            new = await b.watch(nursery, "r", "_window_=2", user="same")
            assert sorted([(await next_frame(new)).index for _ in range(2)]) == [1, 2]   # given back, redelivered
            with trio.fail_after(5):   # node A closed the stale socket
                while True:
                    try:
                        await old.get_message()
                    except Exception:
                        break
            assert (await c.attrs())["consumers.stats.total"] == "1"
            nursery.cancel_scope.cancel()


async def test_messages_no_node_wrote_on_a_queue_s_event_channel_are_ignored_and_said_once(
        tmp_path, redis_url, autojump_clock, caplog):
    """Anybody with access to Redis may PUBLISH on a queue's event channel: garbage there is
    ignored (one warning per queue), and the nodes go on hearing each other's puts."""
    foreign = [b"p1 2x \x80", b"pnode 5 \xc1", b"pnode 5 " + msgpack.packb([1]), b"pnode 5",
               b"k\xff\xfe", b"kno-token", b"zzz", b""]
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "a", backend=redis_url) as a, \
                running_server(tmp_path / "b", backend=redis_url) as b:
            putter, waiter = await a.client("m"), await b.client("m")
            assert (await putter.call("POST", "", b"first"))[0] == 200
            assert (await waiter.attrs())["stream.length"] == "1"   # node B has the queue open too
            async with coredis.Redis.from_url(redis_url) as r:
                for message in foreign:   # both nodes hear each one before the put below
                    assert await r.publish(QueueKeys(QueueRef("m")).channel, message) == 2
            result = await _long_poll_then_put(waiter, "_index_=2&_timeout_=20s&_raw_=false", putter, b"second")
            status, body = result["resp"]
            assert status == 200 and base64.b64decode(json.loads(body)[0]["data"]) == b"second"
            assert result["t1"] - result["put_at"] < 1   # woken by node A's event, not by the timeout
    said = [r.getMessage() for r in caplog.records if "that no qserve node wrote" in r.getMessage()]
    assert len(said) == 2 and all(":m:ev" in line or "m}:ev" in line for line in said), said   # once per node
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def test_a_lease_round_that_redis_fails_unexpectedly_is_said_once_and_the_node_goes_on(
        tmp_path, redis_url, autojump_clock, caplog):
    """A key of a queue that is not of the type its scripts expect (written by something else) makes
    every lease round of that queue fail with WRONGTYPE: the node says so once, keeps serving, and
    its lease rounds work again once the key is repaired."""
    lease_key = QueueKeys(QueueRef("w")).key("lease")
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis_url) as srv, trio.open_nursery() as nursery:
            c = await srv.client("w")
            assert (await c.call("POST", "", b"before"))[0] == 200
            async with coredis.Redis.from_url(redis_url) as r:
                await r.delete([lease_key])
                await r.set(lease_key, "not a hash")
                await trio.sleep(10 * LEASE_CHECK)   # many lease rounds, each failing
                assert (await c.call("POST", "", b"during"))[0] == 200
                said = [rec for rec in caplog.records if "lease round" in rec.getMessage()]
                assert len(said) == 1 and said[0].levelname == "ERROR" and "wrong kind of value" in said[0].getMessage(), \
                    [rec.getMessage() for rec in said]
                await r.delete([lease_key])
            watcher = await srv.watch(nursery, "w", "_window_=5", user="after")
            assert [(await next_frame(watcher)).index for _ in range(2)] == [1, 2]
            await trio.sleep(10 * LEASE_CHECK)   # the rounds renew the new consumer's lease again
            async with coredis.Redis.from_url(redis_url) as r:
                assert await r.type(lease_key) == b"hash" and await r.hlen(lease_key) == 1
            nursery.cancel_scope.cancel()
    assert not [rec for rec in caplog.records if "Traceback" in rec.getMessage()]


async def test_a_registry_the_node_cannot_read_leaves_it_serving_and_not_ready_until_repaired(
        tmp_path, redis_url, autojump_clock, caplog):
    """The registry of queues (``qs:queues``) overwritten with another type: the node starts, serves
    a queue that exists, says once that it cannot open the stored queues, and answers 503 on
    /readyz until the key is repaired, then 200."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "first", backend=redis_url) as srv:
            assert (await (await srv.client("reg")).call("POST", "", b"stored"))[0] == 200
        async with coredis.Redis.from_url(redis_url) as r:
            await r.delete([REGISTRY])
            await r.set(REGISTRY, "not a hash")
            async with running_server(tmp_path / "second", backend=redis_url) as srv:
                c = await srv.client("reg")
                await trio.sleep(30)   # retries, backing off
                status, body = await c.request("GET", "/readyz")
                assert status.status_code == 503 and b"recovering" in body, body
                said = [rec for rec in caplog.records if "cannot open the stored queues" in rec.getMessage()]
                assert len(said) == 1 and said[0].levelname == "ERROR" and "wrong kind of value" in said[0].getMessage()
                status, body = await c.call("GET", "_index_=0&_length_=1&_auto_delete_=false&_raw_=false")
                assert status == 200 and [base64.b64decode(e["data"]) for e in json.loads(body)] == [b"stored"]
                await r.delete([REGISTRY])
                await trio.sleep(20)   # once the registry is readable, recovery ends
                status, body = await c.request("GET", "/readyz")
                assert status.status_code == 200, body
    assert not [rec for rec in caplog.records if "Traceback" in rec.getMessage()]


async def test_redis_out_of_memory_is_507_and_stores_nothing(tmp_path, redis_url, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis_url) as srv:
            c = await srv.client("oom")
            assert (await c.call("POST", "", b"before"))[0] == 200
            async with coredis.Redis.from_url(redis_url) as r:
                await r.config_set({"maxmemory": "1"})
                try:
                    status, body = await c.call("POST", "", b"x" * 1000)
                    assert status == 507 and b"out of memory" in body and body.count(b"\n") == 1
                finally:
                    await r.config_set({"maxmemory": "0"})
            status, body = await c.call("GET", "_index_=0&_length_=10&_raw_=false")
            assert [base64.b64decode(e["data"]) for e in json.loads(body)] == [b"before"]
            assert (await c.call("POST", "", b"after"))[0] == 200


async def test_a_write_no_replica_acknowledges_is_503(tmp_path, redis_url, autojump_clock):
    """--redis-wait 1 on a Redis without replicas: the WAIT times out, the put is answered 503 with
    a one-line reason (the entry is on the primary: WAIT cannot undo it, the README says so)."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis_url, redis_wait=1, redis_wait_timeout=0.05) as srv:
            c = await srv.client("w")
            status, body = await c.call("POST", "", b"x")
            assert status == 503 and b"replicas" in body and body.count(b"\n") == 1


async def test_a_lease_round_during_an_attach_or_a_reattach_evicts_nobody(tmp_path, redis_url, autojump_clock):
    """A lease round that runs while a consumer's ATTACH script has not answered does not ask about
    that consumer (Redis does not know its token yet, and would call it gone: the round evicted the
    session being attached, and the SDK saw its WebSocket handshake dropped, once in a full test
    run); and a round whose answer names a consumer attached again meanwhile (a new token) does
    not forget it. Both rounds are forced into those windows through the queue's script runner."""
    from qserve.backends.redis import group_scripts
    from qserve.core.events import ConsumerSpec

    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis_url) as srv:
            c = await srv.client("race")
            assert (await c.call("POST", "", b"x"))[0] == 200
            queue = await srv.server.queues.get(QueueRef("race"))
            evicted = []
            queue.on_evict = lambda ref, cid: evicted.append(cid)
            real = queue._run_policy
            during = {}

            async def attach_with_a_round_inside(script, *args):
                if script is group_scripts.ATTACH and not during:
                    during["attach"] = True   # Redis has not got the token yet
                    await queue.lease()
                return await real(script, *args)

            queue._run_policy = attach_with_a_round_inside
            spec = ConsumerSpec(group="g", user="u", window=1)
            await queue.attach(spec)
            assert during["attach"] and spec.id in queue._tokens and evicted == []

            async def reattach_inside_a_round(script, *args):
                reply = await real(script, *args)
                if script is group_scripts.LEASE and "again" not in during:
                    during["again"] = True
                    await real(group_scripts.RELEASE, spec.id, queue._tokens[spec.id])   # as a reconnect does
                    queue._tokens[spec.id] = "new-token"   # ... and its new attach, not in Redis yet
                    return [spec.id]
                return reply

            queue._run_policy = reattach_inside_a_round
            await queue.lease()
            assert queue._tokens.get(spec.id) == "new-token" and evicted == []
            queue._run_policy = real
