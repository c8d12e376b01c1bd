"""The delivery policies (#17) across two nodes on one Redis, in process: what one node's script did
(a dedup window's entry, a delay, a dead letter, a delivery's deadline) holds for the other node's
clients, since it is in Redis and not in the node that did it. (Each policy on one node, on both
backends: test_policies.py.)"""

from __future__ import annotations

import json

import trio

from qserve.backends.redis import policies
from qserve.core.errors import Unavailable

from ..helpers.inproc import next_frame, no_frame, running_server

LIMIT = 90


async def test_a_retry_through_another_node_is_a_duplicate(tmp_path, redis_url, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "a", backend=redis_url, dedup_window=60.0) as a, \
                running_server(tmp_path / "b", backend=redis_url, dedup_window=60.0) as b:
            first = int((await (await a.client("idem")).call("POST", "requestId=r-1", b"x"))[1])
            head, body = await (await b.client("idem")).request(
                "POST", "/api/predict/idem?requestId=r-1", b"x", [("Authorization", "tok")])
            assert int(body) == first and dict(head.headers)[b"x-qserve-duplicate"] == b"1"
            assert (await (await b.client("idem")).attrs())["stream.length"] == "1"


async def test_a_delay_made_through_one_node_holds_for_the_other_nodes_watchers(tmp_path, redis_url,
                                                                                 autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "a", backend=redis_url) as a, \
                running_server(tmp_path / "b", backend=redis_url) as b, trio.open_nursery() as nursery:
            c = await a.client("later")
            index = int((await c.call("POST", "", b"job"))[1])
            on_a = await a.watch(nursery, "later", "_window_=1", user="on-a")
            assert (await next_frame(on_a)).index == index
            on_b = await b.watch(nursery, "later", "_window_=1", user="on-b")
            # nacked through node A with a delay: node B's member (free) gets it when due, not before
            assert (await c.call("PUT", f"_indexes_={index}&_negative_=true&_delay_=4s&_code_=429"))[0] == 200
            began = trio.current_time()
            assert (await (await b.client("later")).attrs())["policy.delayed"] == "1"
            assert await no_frame(on_b, wait=3.5)
            frame = await next_frame(on_b, timeout=5)
            assert frame.index == index and frame.tags["lastCode"] == "429"
            # B learns the due time in a lease round; each node reads the wall clock once (at its start), so
            # under the test's mock clock the two nodes' clocks differ by the real time between their starts
            assert 3.9 <= trio.current_time() - began <= 5
            nursery.cancel_scope.cancel()


async def test_a_dead_letter_made_through_one_node_reaches_the_other_nodes_dlq_watcher(tmp_path, redis_url,
                                                                                        autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "a", backend=redis_url, max_deliveries=1) as a, \
                running_server(tmp_path / "b", backend=redis_url, max_deliveries=1) as b, \
                trio.open_nursery() as nursery:
            c = await a.client("poison")
            index = int((await c.call("POST", "requestId=bad", b"poison"))[1])
            assert (await (await b.client("poison")).call("GET", "_index_=1&_auto_delete_=false", dlq=True))[0] == 204
            dl = await b.watch(nursery, "poison/dlq", "_window_=1", user="ops")
            ws = await a.watch(nursery, "poison", "_window_=1", user="w")
            assert (await next_frame(ws)).index == index
            assert (await c.call("PUT", f"_indexes_={index}&_negative_=true&_code_=500&_reason_=boom"))[0] == 200
            moved = await next_frame(dl)
            assert moved.data == b"poison" and moved.tags["dlq.index"] == str(index)
            assert moved.tags["lastReason"] == "boom" and moved.tags["requestId"] == "bad"
            listing = json.loads((await (await b.client("poison")).request(
                "GET", "/api/queues", b"", [("Authorization", "tok")]))[1])
            assert {q["queue"] for q in listing["queues"] if q["service"] == "poison"} == {"input", "dlq"}
            assert await no_frame(ws)
            nursery.cancel_scope.cancel()


async def test_a_lease_that_runs_out_on_one_node_goes_to_a_member_on_the_other(tmp_path, redis_url,
                                                                               autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "a", backend=redis_url, delivery_timeout=10.0) as a, \
                running_server(tmp_path / "b", backend=redis_url, delivery_timeout=10.0) as b, \
                trio.open_nursery() as nursery:
            c = await a.client("lease")
            index = int((await c.call("POST", "", b"job"))[1])
            hung = await a.watch(nursery, "lease", "_window_=1", user="hung")
            assert (await next_frame(hung)).index == index
            other = await b.watch(nursery, "lease", "_window_=1", user="other")
            assert await no_frame(other, wait=9.0)
            again = await next_frame(other, timeout=3.0)
            assert again.index == index and again.tags["lastCode"] == "timeout"
            # the late commit through node A deletes nothing node B's member holds now
            status, _ = await c.call("PUT", f"_indexes_={index}", headers=[("X-EAS-QueueService-Gid", "g"),
                                                                         ("X-EAS-QueueService-Uid", "hung")])
            assert status == 200
            found = json.loads((await (await b.client("lease")).call("GET", f"_search_=true&_index_={index}"))[1])
            assert found["IsPending"] is True
            nursery.cancel_scope.cancel()


async def test_a_migrated_dead_letter_queue_is_served_from_redis(tmp_path, redis_url, autojump_clock):
    """`qserve migrate` copies a local service's dead-letter queue too (dlq tags and all)."""
    from qserve.backends.redis.migrate import migrate
    from qserve.backends.redis.url import parse_redis_url

    with trio.fail_after(LIMIT):
        data = tmp_path / "local"
        async with running_server(tmp_path, data_dir=data, max_deliveries=1) as local, \
                trio.open_nursery() as nursery:
            c = await local.client("jobs")
            index = int((await c.call("POST", "requestId=j-1", b"bad"))[1])
            ws = await local.watch(nursery, "jobs", "_window_=1", user="w")
            assert (await next_frame(ws)).index == index
            await c.call("PUT", f"_indexes_={index}&_negative_=true&_code_=500&_reason_=boom")
            with trio.fail_after(10):
                while (await c.attrs(dlq=True))["stream.length"] != "1":
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        lines = []
        reports = await migrate(data, parse_redis_url(redis_url), say=lines.append, progress=lines.append)
        assert [r.ref.name for r in reports] == ["jobs", "jobs/dlq"]
        async with running_server(tmp_path / "node", backend=redis_url) as node:
            c = await node.client("jobs")
            [moved] = json.loads((await c.call("GET", "_index_=1&_raw_=false&_auto_delete_=false", dlq=True))[1])
            assert moved["tags"]["dlq.queue"] == "jobs" and moved["tags"]["lastReason"] == "boom"
            assert moved["tags"]["requestId"] == "j-1"
            listing = json.loads((await c.request("GET", "/api/queues", b"", [("Authorization", "tok")]))[1])
            assert {q["queue"] for q in listing["queues"] if q["service"] == "jobs"} == {"input", "dlq"}


async def test_on_a_cluster_the_dead_letter_move_is_one_script_in_the_input_queues_slot(tmp_path, redis_cluster_url):
    """The dead-letter queue's keys share the input queue's hash tag, so the move runs on a Redis
    Cluster too (a script naming keys of two slots would fail with CROSSSLOT). On trio's real clock:
    the cluster client's discovery does not survive an autojump clock."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis_cluster_url, max_deliveries=1) as srv, \
                trio.open_nursery() as nursery:
            c = await srv.client("clustered")
            index = int((await c.call("POST", "", b"bad"))[1])
            ws = await srv.watch(nursery, "clustered", "_window_=1", user="w")
            assert (await next_frame(ws)).index == index
            assert (await c.call("PUT", f"_indexes_={index}&_negative_=true&_code_=500"))[0] == 200
            [moved] = json.loads((await c.call("GET", "_index_=1&_raw_=false&_auto_delete_=false", dlq=True))[1])
            assert moved["tags"]["dlq.index"] == str(index)
            assert (await c.attrs())["stream.length"] == "0"
            nursery.cancel_scope.cancel()


async def test_a_due_delay_in_a_group_that_cannot_poll_does_not_spin_the_node(tmp_path, redis_url, autojump_clock):
    """A delay that fell due while its group's windows are full: the scripts drop it once due, so
    the node's timer does not wake again and again for it (the local backend's upkeep once spun so:
    test_policy_upkeep.py). Counted: the queue's lease rounds, about 2 a second from the node's
    lease task, and the timer's."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis_url, delivery_timeout=60.0) as srv, \
                trio.open_nursery() as nursery:
            c = await srv.client("svc")
            first = int((await c.call("POST", "", b"one"))[1])
            second = int((await c.call("POST", "", b"two"))[1])
            ws = await srv.watch(nursery, "svc", "_window_=1", user="w")
            assert (await next_frame(ws)).index == first
            assert (await c.call("PUT", f"_indexes_={first}&_negative_=true&_delay_=1s"))[0] == 200
            assert (await next_frame(ws)).index == second   # held: the window is full, no more polls
            queue = srv.server.queues._queues[next(ref for ref in srv.server.queues._queues
                                                   if ref.service == "svc")]
            rounds = []
            real = queue.lease

            async def counted():
                rounds.append(trio.current_time())
                if len(rounds) >= 1000:
                    raise RuntimeError("the node spins on a due delay")
                return await real()

            queue.lease = counted
            began = trio.current_time()
            assert await no_frame(ws, 10)               # the delay fell due at 1 s; the window is still full
            assert len(rounds) <= 2 * (trio.current_time() - began) + 4, rounds
            assert (await c.attrs())["policy.delayed"] == "0"
            assert (await c.call("PUT", f"_indexes_={second}"))[0] == 200   # commit: a slot frees
            assert (await next_frame(ws)).index == first
            nursery.cancel_scope.cancel()


async def test_on_a_cluster_a_sinks_dead_letters_are_parked_and_moved(tmp_path, redis_cluster_url):
    """A sink's hash tag is not its service's input queue's, so on a Cluster its dead letter cannot
    move in one script: it is parked (delivered to nobody) and the node moves it in idempotent steps;
    a node that stopped in between leaves it parked, and a lease round moves it. Real clock (see above)."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis_cluster_url, max_deliveries=1) as srv, \
                trio.open_nursery() as nursery:
            c = await srv.client("out")
            first = int((await c.call("POST", "requestId=s-1", b"bad", sink=True))[1])
            second = int((await c.call("POST", "requestId=s-2", b"worse", sink=True))[1])
            ws = await srv.watch(nursery, "out", "_window_=1", user="w", sink=True)
            assert (await next_frame(ws)).index == first
            assert (await c.call("PUT", f"_indexes_={first}&_negative_=true&_code_=500", sink=True))[0] == 200
            [moved] = json.loads((await c.call("GET", "_index_=1&_raw_=false&_auto_delete_=false", dlq=True))[1])
            assert moved["tags"]["dlq.queue"] == "out/sink" and moved["tags"]["dlq.index"] == str(first)
            assert moved["tags"]["requestId"] == "s-1" and moved["tags"]["lastCode"] == "500"
            assert (await c.attrs(sink=True))["stream.length"] == "1"
            # the node "stops" after parking the next one: a lease round (any node's) moves it
            sink = srv.server.queues._queues[next(ref for ref in srv.server.queues._queues if ref.sink)]
            real, skipped = sink._move_parked, []

            async def stopped_here():
                skipped.append(True)
                if len(skipped) > 1:
                    await real()

            sink._move_parked = stopped_here
            assert (await next_frame(ws)).index == second
            assert (await c.call("PUT", f"_indexes_={second}&_negative_=true&_code_=503", sink=True))[0] == 200
            assert await no_frame(ws, 1.0)          # parked: delivered to nobody
            assert (await c.attrs(sink=True))["stream.length"] == "1"
            with trio.fail_after(5):
                while (await c.attrs(dlq=True))["stream.length"] != "2":
                    await trio.sleep(0.1)
            assert (await c.attrs(sink=True))["stream.length"] == "0"
            letters = json.loads((await c.call("GET", "_index_=1&_length_=5&_raw_=false&_auto_delete_=false",
                                               dlq=True))[1])
            assert [e["tags"]["dlq.index"] for e in letters] == [str(first), str(second)]   # once each
            # cut between the append there and the delete here: moved again, appended once
            third = int((await c.call("POST", "", b"worst", sink=True))[1])
            sink._move_parked = real
            run, cut = sink._run, []

            async def cut_once(script, *args, **kwargs):
                if script is policies.UNPARK and not cut:
                    cut.append(True)
                    raise Unavailable("cut")
                return await run(script, *args, **kwargs)

            sink._run = cut_once
            assert (await next_frame(ws)).index == third
            # the negative commit stands (200); the cut move is done again by a lease round
            assert (await c.call("PUT", f"_indexes_={third}&_negative_=true", sink=True))[0] == 200
            with trio.fail_after(5):
                while (await c.attrs(sink=True))["stream.length"] != "0":
                    await trio.sleep(0.1)
            letters = json.loads((await c.call("GET", "_index_=1&_length_=5&_raw_=false&_auto_delete_=false",
                                               dlq=True))[1])
            assert cut and [e["tags"]["dlq.index"] for e in letters] == [str(first), str(second), str(third)]
            nursery.cancel_scope.cancel()


async def test_on_a_cluster_a_replay_is_one_script_and_a_sinks_is_refused(tmp_path, redis_cluster_url):
    """The replay of an input queue's dead letter moves it in one script (the dead-letter queue is
    in the input queue's slot); a sink's dead letter cannot (its slot is another): 501, nothing
    moved. Real clock (see above)."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis_cluster_url, max_deliveries=1) as srv, \
                trio.open_nursery() as nursery:
            c = await srv.client("back")
            into_input = int((await c.call("POST", "requestId=i-1", b"in"))[1])
            into_sink = int((await c.call("POST", "requestId=s-1", b"out", sink=True))[1])
            for sink, index in ((False, into_input), (True, into_sink)):
                ws = await srv.watch(nursery, "back", "_window_=1", user=f"w{sink}", sink=sink)
                assert (await next_frame(ws)).index == index
                assert (await c.call("PUT", f"_indexes_={index}&_negative_=true", sink=sink))[0] == 200
            with trio.fail_after(5):
                while (await c.attrs(dlq=True))["stream.length"] != "2":
                    await trio.sleep(0.1)
            letters = json.loads((await c.call("GET", "_index_=1&_length_=5&_raw_=false&_auto_delete_=false",
                                               dlq=True))[1])
            by_queue = {e["tags"]["dlq.queue"]: e["index"] for e in letters}
            status, body = await c.call("POST", f"_replay_=true&_index_={by_queue['back']}", dlq=True)
            assert status == 200
            [done] = json.loads(body)["replayed"]
            assert done["queue"] == "back" and done["replayed_index"] > into_input and done["request_id"] == "i-1"
            status, body = await c.call("POST", f"_replay_=true&_index_={by_queue['back/sink']}", dlq=True)
            assert status == 501 and b"not supported on a Redis Cluster" in body and body.count(b"\n") == 1
            assert (await c.attrs(dlq=True))["stream.length"] == "1"
            assert (await c.attrs(sink=True))["stream.length"] == "0"
            nursery.cancel_scope.cancel()
