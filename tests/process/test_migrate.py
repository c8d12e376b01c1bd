"""`qserve migrate`: a data directory written by a real local server (and by the storage API, for a
queue of many batches) is copied into a real `redis-server`, and a real `qserve serve --backend`
on that Redis answers every client exactly as the local server did: gets by index and by
requestId (repeated requestIds, deleted newest copies), priorities in the dispatch order, the
ended queue's 409, and a new put gets the next index although the last ones were deleted.
Failures are one line on stderr with a non-zero exit and leave Redis as it was."""

from __future__ import annotations

import http.client
import json
import socket

import msgpack
import trio
from pathlib import Path

import pytest

from qserve import storage
from qserve.backends.redis.keys import REGISTRY
from qserve.backends.redis.link import Link
from qserve.backends.redis.migrate import BATCH_ENTRIES, Copier, MigrateError
from qserve.backends.redis.url import parse_redis_url
from qserve.core.events import QueueRef

from ..helpers.commands import assert_one_line, run_qserve as qserve
from ..helpers.process import ServerProcess
from ..helpers.queue_files import damage_sealed_segment


def request(srv: ServerProcess, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Authorization": srv.token})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def put(srv: ServerProcess, queue: str, data: bytes, query: str = "") -> int:
    status, body = request(srv, "POST", f"/api/predict/{queue}?{query}", data)
    assert status == 200, (status, body)
    return int(body)


def ok(srv: ServerProcess, method: str, path: str) -> None:
    status, body = request(srv, method, path)
    assert (status, body) == (200, b"OK"), (status, body)


def entries(srv: ServerProcess, queue: str, query: str) -> list[dict]:
    """A get that deletes nothing, as JSON ([] for a 204)."""
    status, body = request(srv, "GET", f"/api/predict/{queue}?_raw_=false&_auto_delete_=false&_timeout_=0s&{query}")
    assert status in (200, 204), (status, body)
    return json.loads(body) if status == 200 else []


def every_entry(srv: ServerProcess, queue: str) -> list[dict]:
    """Every live entry, a page of the get's limit (1000) at a time."""
    found: list[dict] = []
    while page := entries(srv, queue, f"_index_={found[-1]['index'] + 1 if found else 0}&_length_=1000"):
        found += page
    return found


def seen(srv: ServerProcess, queue: str, request_ids: list[str], searched: list[int]) -> dict:
    """What a client sees of a queue: every entry, requestId lookups, attributes, counts, search."""
    attrs = json.loads(request(srv, "GET", f"/api/predict/{queue}?_attrs_=true")[1])
    return {
        "entries": every_entry(srv, queue),
        "by request id": {rid: entries(srv, queue, f"requestId={rid}") for rid in request_ids},
        "attributes": {k: attrs[k] for k in ("stream.length", "stream.firstEntry", "stream.lastEntry", "meta.state")},
        "priority 5": request(srv, "GET", f"/api/predict/{queue}?_count_=true&_priority_=5")[1],
        "search": {i: request(srv, "GET", f"/api/predict/{queue}?_search_=true&_index_={i}")[1] for i in searched},
    }


#: queue -> (requestIds looked up, indexes searched)
LOOKUPS = {
    "orders": (["dup", "solo", "gone"], [1, 3, 6]),
    "orders/sink": (["dup"], [1]),
    "closed": (["c1"], [2]),
    "trimmed": (["t3", "t1"], [3]),
    "grp.svc": ([], [1]),
}


def fill_local_server(srv: ServerProcess) -> None:
    """Queues with tags, priorities, repeated requestIds, deleted entries (the newest included),
    a truncated queue and an ended one, all through the HTTP API of a real local server."""
    put(srv, "orders", b"first", "requestId=dup&lang=en")          # 1
    put(srv, "orders", b"urgent", "_priority_=5&k=v")               # 2
    put(srv, "orders", b"second", "requestId=dup")                  # 3
    put(srv, "orders", b"soon", "_priority_=2&requestId=solo")      # 4
    put(srv, "orders", b"third", "requestId=dup")                   # 5: deleted, so dup names 3
    put(srv, "orders", b"plain")                                    # 6
    put(srv, "orders", b"last", "requestId=gone")                   # 7: deleted, the newest
    ok(srv, "DELETE", "/api/predict/orders?_indexes_=5,7")
    put(srv, "orders/sink", b"answer 1", "requestId=dup")
    put(srv, "orders/sink", b"answer 2", "requestId=dup")
    for i in range(1, 4):
        put(srv, "closed", f"c{i}".encode(), f"requestId=c{i}")
    ok(srv, "POST", "/api/predict/closed?_eos_=true")
    assert request(srv, "POST", "/api/predict/closed", b"late")[0] == 409
    for i in range(1, 5):
        put(srv, "trimmed", f"t{i}".encode(), f"requestId=t{i}")
    ok(srv, "DELETE", "/api/predict/trimmed?_index_=3&_trunc_=true")
    ok(srv, "DELETE", "/api/predict/trimmed?_index_=4")
    put(srv, "grp.svc", b"dotted")


def add_bulk_queue(data: Path) -> dict[str, int]:
    """A queue of several script batches written with the storage API: requestIds repeated every 7
    entries, priorities on some, deletes (the last entry too). Returns requestId -> the index a
    lookup must name (the newest live copy)."""
    qlog = storage.QueueLog.open(data / "bulk" / "input")
    try:
        n = 2 * BATCH_ENTRIES + 300
        for i in range(1, n + 1):
            qlog.append(b"%d" % i + b"." * (i % 50), {"requestId": f"r{i % 7}", "n": str(i)},
                        priority=i % 3 if i % 11 == 0 else 0)
        qlog.delete([1, 2, 500, 777, n])
        newest = {f"r{k}": qlog.find_request_id(f"r{k}").index for k in range(7)}
    finally:
        qlog.close()
    return newest


def test_a_migrated_data_directory_answers_as_before(redis_url, redis_server, tmp_path):
    data = tmp_path / "data"
    local = ServerProcess(data).start()
    try:
        fill_local_server(local)
        before = {queue: seen(local, queue, *LOOKUPS[queue]) for queue in LOOKUPS}
    finally:
        assert local.stop() == 0
    bulk_newest = add_bulk_queue(data)

    proc = qserve("migrate", "--from", str(data), "--to", redis_url, "--progress", "500")
    assert proc.returncode == 0, proc.stderr
    where = redis_url.removeprefix("redis://")
    assert proc.stdout.splitlines() == [
        "bulk: 1319 entries, next index 1325, verified",
        "closed: 3 entries, next index 4, ended, verified",
        "grp.svc: 1 entry, next index 2, verified",
        "orders: 5 entries, next index 8, verified",
        "orders/sink: 2 entries, next index 3, verified",
        "trimmed: 1 entry, next index 5, verified",
        f"migrated 6 queues, 1331 entries, from {data} to redis at {where}: verified",
    ]
    assert proc.stderr.splitlines() == [f"qserve migrate: bulk: {n} of 1319 entries {what}"
                                        for what in ("copied", "verified") for n in (500, 1000)]
    assert (data / "orders" / "input").is_dir()          # the data directory stays as it was

    node = ServerProcess(tmp_path / "unused", "--backend", redis_url).start()
    try:
        after = {queue: seen(node, queue, *LOOKUPS[queue]) for queue in LOOKUPS}
        assert after == before
        assert [e["index"] for e in after["orders"]["entries"]] == [1, 2, 3, 4, 6]
        assert [e["index"] for e in after["orders"]["by request id"]["dup"]] == [3]
        assert after["orders"]["by request id"]["gone"] == []
        # a new put continues after the deleted last entry; the ended queue stays ended
        assert put(node, "orders", b"new", "requestId=dup") == 8
        assert request(node, "POST", "/api/predict/closed", b"late")[0] == 409
        assert put(node, "trimmed", b"t5") == 5
        # the older copies of a repeated requestId came along: deleting the newest names the one before
        ok(node, "DELETE", "/api/predict/orders?_indexes_=8,3")
        assert [e["index"] for e in entries(node, "orders", "requestId=dup")] == [1]
        bulk = every_entry(node, "bulk")
        assert [e["index"] for e in bulk][:3] == [3, 4, 5] and len(bulk) == 1319
        for rid, index in bulk_newest.items():
            assert [e["index"] for e in entries(node, "bulk", f"requestId={rid}")] == [index]
        assert put(node, "bulk", b"more") == 1325
    finally:
        assert node.stop() == 0
    assert not (tmp_path / "unused").exists()


def _bulk_data(tmp_path: Path, services: tuple[str, ...] = ("a", "b")) -> Path:
    data = tmp_path / "data"
    for service in services:
        qlog = storage.QueueLog.open(data / service / "input")
        try:
            for i in range(1, 4):
                qlog.append(f"{service}{i}".encode(), {"requestId": f"{service}{i}"})
        finally:
            qlog.close()
    return data


def test_a_partial_copy_left_by_an_interrupted_run_is_replaced(redis_url, redis_server, tmp_path):
    """An interrupted migration leaves entry keys but no ``m`` (written last): the queue does not
    exist for a server, and the next run drops the partial copy and copies again."""
    data = _bulk_data(tmp_path, ("a",))
    redis_server.call("XADD", "{qs:a}:s", "1-0", "d", "a1", "t", b"\x80")
    redis_server.call("XADD", "{qs:a}:s", "9-0", "d", "stale", "t", b"\x80")
    redis_server.call("HSET", "{qs:a}:r", "stale", "9")
    proc = qserve("migrate", "--from", str(data), "--to", redis_url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "a: 3 entries, next index 4, verified"
    assert redis_server.call("XLEN", "{qs:a}:s") == 3
    assert redis_server.call("HGET", "{qs:a}:r", "stale") is None


@pytest.mark.parametrize("tamper, needle", [
    (("HSET", "{qs:q}:m", "last", "9"), "next index 10, not 5"),
    (("HSET", "{qs:q}:m", "state", "End"), "queue state"),
    (("HDEL", REGISTRY, "{qs:q}"), f"not listed in {REGISTRY}"),
    (("XDEL", "{qs:q}:s", "3-0"), "entry 3 is missing"),
    (("XADD", "{qs:q}:s", "9-0", "d", "x", "t", b"\x80"), "entry 9 is not live here"),
    (("ZREM", "{qs:q}:p", "%08x%016x" % (2**31 - 1 - 4, 2)), "missing from the priority set"),
    (("HSET", "{qs:q}:r", "dup", "1"), "requestId dup names entry 1, not 3"),
    (("HSET", "{qs:q}:rr", "dup", msgpack.packb([])), "entry 1: not kept as an older copy of requestId dup"),
    (("HSET", "{qs:q}:r", "other", "2"), "the requestId hash holds other requestIds"),
])
async def test_the_verification_names_what_differs(redis_url, redis_server, tmp_path, tamper, needle):
    """A copy changed after `qserve migrate` wrote it is found by the verification it runs."""
    data = tmp_path / "data"
    qlog = storage.QueueLog.open(data / "q" / "input")
    try:
        qlog.append(b"one", {"requestId": "dup"})
        qlog.append(b"two", {"requestId": "solo"}, priority=4)
        qlog.append(b"three", {"requestId": "dup"})
        qlog.append(b"gone", {"requestId": "gone"})
        qlog.delete([4])
    finally:
        qlog.close()
    proc = qserve("migrate", "--from", str(data), "--to", redis_url)
    assert proc.returncode == 0, proc.stderr
    redis_server.call(*tamper)
    link = Link(parse_redis_url(redis_url), "test")
    qlog = storage.QueueLog.open(data / "q" / "input")
    try:
        with trio.fail_after(60):
            async with link.connected():
                with pytest.raises(MigrateError) as found:
                    await Copier(link, progress=print, every=0).verify(QueueRef("q"), qlog)
    finally:
        qlog.close()
    assert str(found.value).startswith(f"queue q: the copy in redis at {link.target.where} differs: ")
    assert needle in str(found.value)


def test_refused_when_a_queue_exists_in_redis(redis_url, redis_server, tmp_path):
    data = _bulk_data(tmp_path)
    redis_server.call("HSET", "{qs:b}:m", "created", "1")
    proc = qserve("migrate", "--from", str(data), "--to", redis_url)
    assert_one_line(proc, "migrate", "queue b already exists in redis at", "nothing copied")
    assert redis_server.call("DBSIZE") == 1                   # nothing of queue a either


def test_refused_while_a_server_uses_the_data_directory(redis_url, redis_server, tmp_path):
    data = tmp_path / "data"
    local = ServerProcess(data).start()
    try:
        put(local, "busy", b"x")
        proc = qserve("migrate", "--from", str(data), "--to", redis_url)
        assert_one_line(proc, "migrate", f"data directory {data} is in use by process {local.proc.pid}",
                        "stop it")
    finally:
        assert local.stop() == 0
    assert redis_server.call("DBSIZE") == 0


def test_a_damaged_queue_is_one_line_naming_the_repair(redis_url, redis_server, tmp_path):
    data = tmp_path / "data"
    queue = data / "dmg" / "input"
    qlog = storage.QueueLog.open(queue, storage.LogConfig(segment_bytes=1024))
    try:
        for i in range(40):
            qlog.append(b"x" * 60, {"requestId": f"r{i}"})
    finally:
        qlog.close()
    damage_sealed_segment(queue)
    proc = qserve("migrate", "--from", str(data), "--to", redis_url)
    assert_one_line(proc, "migrate", "queue dmg cannot be read", f"qserve log repair {queue}")


def test_a_redis_that_does_not_fsync_every_write_is_warned_about(redis_url, redis_server, tmp_path):
    redis_server.call("CONFIG", "SET", "appendfsync", "everysec")
    try:
        proc = qserve("migrate", "--from", str(_bulk_data(tmp_path)), "--to", redis_url)
    finally:
        redis_server.call("CONFIG", "SET", "appendfsync", "always")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"qserve migrate: warning: redis at {redis_url.removeprefix('redis://')} runs with "
        "appendonly yes, appendfsync everysec: keep the data directory until Redis has saved the copy"]


def test_the_url_comes_from_qserve_backend_too(redis_url, tmp_path):
    proc = qserve("migrate", "--from", str(_bulk_data(tmp_path)), env={"QSERVE_BACKEND": redis_url})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("migrated 2 queues, 6 entries")


def _refused_port() -> tuple[socket.socket, int]:
    """A port bound but not listening: every connection to it is refused, and no other process can
    take it while the socket is open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("case", ["missing", "empty", "file"])
def test_no_data_directory_or_no_queue_in_it(tmp_path, case):
    path = tmp_path / "data"
    if case == "empty":
        (path / "not-a-queue").mkdir(parents=True)
    elif case == "file":
        path.write_text("x")
    proc = qserve("migrate", "--from", str(path), "--to", "redis://127.0.0.1:1/0")
    needle = f"no queues in data directory {path}" if case == "empty" else f"no data directory {path}"
    assert_one_line(proc, "migrate", needle)


def test_an_unreachable_redis_is_one_line_without_the_password(tmp_path):
    sock, port = _refused_port()
    with sock:
        proc = qserve("migrate", "--from", str(_bulk_data(tmp_path)), "--to", f"redis://u:s3cret@127.0.0.1:{port}/0")
    line = assert_one_line(proc, "migrate", f"redis at 127.0.0.1:{port}/0 is unreachable")
    assert "s3cret" not in line


@pytest.mark.parametrize("args, needle", [
    (["--to", "redis://u:s3cret@127.0.0.1:6379/0?x=1"], "--to: no query"),
    (["--to", "http://127.0.0.1:6379"], "--to: expected"),
    ([], "--to URL (or QSERVE_BACKEND)"),
])
def test_a_bad_or_missing_url_is_one_line(tmp_path, args, needle):
    proc = qserve("migrate", "--from", str(tmp_path), *args)
    line = assert_one_line(proc, "migrate", needle, status=2)
    assert "s3cret" not in line
