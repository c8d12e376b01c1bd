"""Replaying dead letters (#17): ``POST /api/predict/S/dlq?_replay_=true&_indexes_=...`` moves
entries of the dead-letter queue back into their queue, in process on trio's clock, on both
backends (the `backend` fixture). Dead letters are made as the policy makes them: a watcher's
negative commit with ``max_deliveries=1``. The local backend's crash safety (two logs: the
marker ``replay:D`` in the origin's state) is shown last, on the real storage: the state a crash
leaves is written with `storage.QueueLog` itself and the server reopened on it."""

from __future__ import annotations

import json

import pytest
import trio

from qserve import storage
from qserve.backends.local.queues import REPLAY_KEY, queue_dir
from qserve.core.events import QueueRef

from ..helpers.inproc import next_frame, running_server

LIMIT = 120


class Clock:
    """A wall clock the test moves (the puts' timestamps and the dedup window read it)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def metric(srv, name: str, service: str, queue: str) -> float:
    _, body = await (await srv.client(service)).request("GET", "/metrics", b"", [("Authorization", "tok")])
    prefix = f'{name}{{queue="{queue}",service="{service}"}} '
    return float(next(line[len(prefix):] for line in body.decode().splitlines() if line.startswith(prefix)))


@pytest.fixture
def recovering_clock():
    """trio's autojump clock, jumping only after 0.25 s of real idleness (a queue reopened from disk
    recovers in a worker thread)."""
    return trio.testing.MockClock(autojump_threshold=0.25)


async def dead_letter(srv, nursery, service: str, query: str, data: bytes, *, sink: bool = False) -> int:
    """Put one entry (``query``: its tags and parameters) and dead-letter it from a watcher;
    returns its index in its queue once the dead-letter queue holds it."""
    c = await srv.client(service)
    before = int((await c.attrs(dlq=True)).get("stream.length", "0")) if await _has_dlq(c) else 0
    status, body = await c.call("POST", query, data, sink=sink)
    assert status == 200
    index = int(body)
    ws = await srv.watch(nursery, service, "_window_=1", user=f"w{index}{sink}", sink=sink)
    assert (await next_frame(ws)).index == index
    assert (await c.call("PUT", f"_indexes_={index}&_negative_=true&_code_=500&_reason_=boom", sink=sink))[0] == 200
    await ws.aclose()
    with trio.fail_after(10):
        while int((await c.attrs(dlq=True))["stream.length"]) != before + 1:
            await trio.sleep(0.05)
    return index


async def _has_dlq(c) -> bool:
    return (await c.call("GET", "_attrs_=true", dlq=True))[0] == 200


async def letters(c) -> list[dict]:
    status, body = await c.call("GET", "_index_=0&_length_=100&_raw_=false&_auto_delete_=false", dlq=True)
    return [] if status == 204 else json.loads(body)


async def replay(c, indexes: str):
    status, body = await c.call("POST", f"_replay_=true&_indexes_={indexes}", dlq=True)
    return status, (json.loads(body) if status == 200 else body.decode())


async def test_replay_moves_a_dead_letter_back_with_its_request_id_data_tags_and_priority(
        tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=1, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("ocr")
            first = await dead_letter(srv, nursery, "ocr", "requestId=scan-1&lang=en&_priority_=3", b"scan 1")
            [letter] = await letters(c)
            assert letter["tags"]["dlq.index"] == str(first)
            status, answer = await replay(c, str(letter["index"]))
            assert status == 200
            [done] = answer["replayed"]
            assert done["index"] == letter["index"] and done["queue"] == "ocr" and done["request_id"] == "scan-1"
            assert done["priority"] == 3 and done["replayed_index"] > first
            # back in ocr: same data, requestId, own tags and priority, a new index, no bookkeeping
            [back] = json.loads((await c.call("GET", "_raw_=false&_auto_delete_=false&_length_=10"))[1])
            assert back["index"] == done["replayed_index"]
            assert back["data"] == "c2NhbiAx"   # b"scan 1"
            tags = back["tags"]
            assert tags["requestId"] == "scan-1" and tags["lang"] == "en"
            assert not [k for k in tags if k.startswith("dlq.") or k in ("lastCode", "lastReason")]
            assert int(tags["ts@source"]) > 0
            assert int((await c.call("GET", "_count_=true&_priority_=3"))[1]) == 1
            # gone from the dead-letter queue; counted there
            assert await letters(c) == []
            assert await metric(srv, "qserve_replayed_total", "ocr", "dlq") == 1
            # delivered again like any entry
            ws = await srv.watch(nursery, "ocr", "_window_=1", user="again")
            assert (await next_frame(ws)).index == back["index"]
            nursery.cancel_scope.cancel()


async def test_a_replay_within_the_dedup_window_stores_the_entry_and_rekeys_the_window(
        tmp_path, backend, autojump_clock):
    """The window holds the requestId of the entry's first put: a put would be its duplicate; the
    replay stores it, and a later put of that requestId answers the replayed index."""
    clock = Clock()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=1, dedup_window=300.0, wall_clock=clock,
                                  **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("jobs")
            first = await dead_letter(srv, nursery, "jobs", "requestId=job-7", b"resize 7")
            assert int((await c.call("POST", "requestId=job-7", b"resize 7"))[1]) == first   # a duplicate
            [letter] = await letters(c)
            status, answer = await replay(c, str(letter["index"]))
            assert status == 200
            new = answer["replayed"][0]["replayed_index"]
            assert new > first and (await c.attrs())["stream.length"] == "1"
            clock.now += 10
            head, body = await c.request("POST", "/api/predict/jobs?requestId=job-7", b"resize 7",
                                         [("Authorization", "tok")])
            assert int(body) == new and dict(head.headers)[b"x-qserve-duplicate"] == b"1"
            assert (await c.attrs())["stream.length"] == "1"
            nursery.cancel_scope.cancel()


async def test_the_rekeyed_dedup_window_survives_a_restart(tmp_path, backend, recovering_clock):
    """Local: the window is read back from the segment files, where the replayed entry's record
    follows the first put's; Redis: kept there (``dd``/``di``)."""
    clock = Clock()
    settings = dict(max_deliveries=1, dedup_window=300.0, wall_clock=clock, **backend)
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, **settings) as srv, trio.open_nursery() as nursery:
            c = await srv.client("jobs")
            first = await dead_letter(srv, nursery, "jobs", "requestId=job-8", b"resize 8")
            [letter] = await letters(c)
            new = (await replay(c, str(letter["index"])))[1]["replayed"][0]["replayed_index"]
            nursery.cancel_scope.cancel()
        clock.now += 10
        async with running_server(tmp_path, **settings) as srv:
            c = await opened(srv, "jobs")
            answer = int((await c.call("POST", "requestId=job-8", b"resize 8"))[1])
            assert answer == new != first
            assert (await c.attrs())["stream.length"] == "1"


async def test_a_sinks_dead_letter_replays_into_the_sink(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=1, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("svc")
            into_input = await dead_letter(srv, nursery, "svc", "requestId=in-1", b"in")
            into_sink = await dead_letter(srv, nursery, "svc", "requestId=out-1", b"out", sink=True)
            held = await letters(c)
            assert [e["tags"]["dlq.queue"] for e in held] == ["svc", "svc/sink"]
            status, answer = await replay(c, ",".join(str(e["index"]) for e in held))
            assert status == 200
            assert [(r["queue"], r["request_id"]) for r in answer["replayed"]] == [("svc", "in-1"),
                                                                                   ("svc/sink", "out-1")]
            [out] = json.loads((await c.call("GET", "_raw_=false&_auto_delete_=false", sink=True))[1])
            assert out["index"] == answer["replayed"][1]["replayed_index"] > into_sink
            assert out["tags"]["requestId"] == "out-1" and "ts@sink" in out["tags"] and "ts@source" not in out["tags"]
            [back] = json.loads((await c.call("GET", "_raw_=false&_auto_delete_=false"))[1])
            assert back["index"] > into_input and back["tags"]["requestId"] == "in-1"
            assert await letters(c) == []
            nursery.cancel_scope.cancel()


async def test_a_replay_refused_changes_nothing(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=1, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("svc")
            await dead_letter(srv, nursery, "svc", "requestId=r-1", b"one")
            [letter] = await letters(c)
            d = letter["index"]
            # an index the dead-letter queue does not hold: 404 naming it, the other one stays
            assert await replay(c, f"{d},{d + 5}") == (404, f"not in the dead-letter queue svc/dlq: {d + 5}\n")
            # not a dead-letter queue, no index: 400
            status, body = await c.call("POST", f"_replay_=true&_index_={d}")
            assert status == 400 and body.startswith(b"_replay_: only a dead-letter queue replays its entries")
            assert body.count(b"\n") == 1
            status, body = await c.call("POST", "_replay_=true", dlq=True)
            assert (status, body) == (400, b"_indexes_: required with _replay_ (or _index_)\n")
            # an entry put there by hand is not a dead letter
            stray = int((await c.call("POST", "", b"stray", dlq=True))[1])
            status, body = await replay(c, f"{d},{stray}")
            assert status == 400 and body == (f"entry {stray} of svc/dlq is not a dead letter (no dlq.queue / "
                                              "dlq.index tags): delete it or get it instead\n")
            assert [e["index"] for e in await letters(c)] == [d, stray]
            assert (await c.attrs())["stream.length"] == "0"
            # an ended queue takes no replay
            assert (await c.call("POST", "_eos_=true"))[0] == 200
            status, body = await replay(c, str(d))
            assert status == 409 and "has ended" in body
            assert [e["index"] for e in await letters(c)] == [d, stray]
            nursery.cancel_scope.cancel()


async def test_the_index_form_and_a_repeated_replay(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=1, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("svc")
            await dead_letter(srv, nursery, "svc", "requestId=r-1", b"one")
            [letter] = await letters(c)
            status, body = await c.call("POST", f"_replay_=true&_index_={letter['index']}", dlq=True)
            assert status == 200 and json.loads(body)["replayed"][0]["request_id"] == "r-1"
            # done already: nothing to replay, nothing stored twice
            assert (await replay(c, str(letter["index"])))[0] == 404
            assert (await c.attrs())["stream.length"] == "1"
            nursery.cancel_scope.cancel()


# -- the local backend's two logs: what a crash leaves, and what the next open and a retry do ------

async def opened(srv, service: str):
    """A client once the server has opened the queues on disk (and settled what a crash left)."""
    c = await srv.client(service)
    while (await c.request("GET", "/readyz"))[0].status_code != 200:
        await trio.sleep(0.05)
    return c


def _origin_log(tmp_path, service: str) -> storage.QueueLog:
    return storage.QueueLog.open(queue_dir(tmp_path / "data", QueueRef(service)))


async def _one_dead_letter(tmp_path, service: str) -> tuple[int, dict]:
    """A server run that leaves one dead letter of ``service``: (its index there, the entry)."""
    async with running_server(tmp_path, max_deliveries=1) as srv, trio.open_nursery() as nursery:
        await dead_letter(srv, nursery, service, "requestId=crash-1&lang=en", b"payload")
        [letter] = await letters(await srv.client(service))
        nursery.cancel_scope.cancel()
    return letter["index"], letter


async def test_a_replay_cut_after_its_entry_is_finished_at_open_and_not_stored_twice(tmp_path, recovering_clock):
    """The crash between step 1 (marker and entry durable in the origin) and step 2 (the delete
    from the dead-letter queue): the entry is in both. The next open deletes the dead letter; a
    replay retried then stores nothing."""
    with trio.fail_after(LIMIT):
        d, letter = await _one_dead_letter(tmp_path, "cut")
        with _origin_log(tmp_path, "cut") as qlog:   # step 1 as the replay writes it, then the "crash"
            qlog.set_state(**{f"{REPLAY_KEY}{d}": str(qlog.next_index)})
            stored = qlog.append(b"payload", {"requestId": "crash-1", "lang": "en"}).index
            qlog.sync()
        async with running_server(tmp_path, max_deliveries=1) as srv:
            c = await opened(srv, "cut")
            assert await letters(c) == []                       # finished: gone from the dlq
            assert await replay(c, str(d)) == (404, f"not in the dead-letter queue cut/dlq: {d}\n")
            entries = json.loads((await c.call("GET", "_raw_=false&_auto_delete_=false&_length_=10"))[1])
            assert [e["index"] for e in entries] == [stored]     # stored once
        with _origin_log(tmp_path, "cut") as qlog:
            assert not [k for k in qlog.state if k.startswith(REPLAY_KEY)]   # the marker is dropped


async def test_a_replay_cut_before_its_entry_replays_anew(tmp_path, recovering_clock):
    """A torn tail kept the marker and lost the entry: at open the marker names an index not yet
    handed out, so it is dropped before any put takes that index, and the dead letter replays."""
    with trio.fail_after(LIMIT):
        d, letter = await _one_dead_letter(tmp_path, "torn")
        with _origin_log(tmp_path, "torn") as qlog:
            lost = qlog.next_index
            qlog.set_state(**{f"{REPLAY_KEY}{d}": str(lost)})
            qlog.sync()
        async with running_server(tmp_path, max_deliveries=1) as srv:
            c = await opened(srv, "torn")
            assert [e["index"] for e in await letters(c)] == [d]   # still a dead letter
            other = int((await c.call("POST", "", b"someone else's put"))[1])
            assert other == lost                                   # the index the torn entry would have had
            status, answer = await replay(c, str(d))
            assert status == 200 and answer["replayed"][0]["replayed_index"] == other + 1
            entries = json.loads((await c.call("GET", "_raw_=false&_auto_delete_=false&_length_=10"))[1])
            assert [e["tags"]["requestId"] for e in entries].count("crash-1") == 1


async def test_a_replay_retried_after_its_entry_was_stored_answers_that_entry(tmp_path, recovering_clock):
    """Step 1 done and step 2 failed in a running server (the marker in memory and on disk): a
    retried replay finds the marker, stores nothing, answers the stored index and deletes the
    dead letter."""
    with trio.fail_after(LIMIT):
        d, letter = await _one_dead_letter(tmp_path, "retry")
        async with running_server(tmp_path, max_deliveries=1) as srv:
            c = await opened(srv, "retry")
            origin = await srv.server.queues.get(QueueRef("retry"))
            stored = origin.append(b"payload", {"requestId": "crash-1"}, 0, replay_of=d).index
            await origin.wait_durable()
            status, answer = await replay(c, str(d))
            assert status == 200 and answer["replayed"][0]["replayed_index"] == stored
            assert await letters(c) == []
            assert (await c.attrs())["stream.length"] == "1"
            assert f"{REPLAY_KEY}{d}" not in origin.log.state
