"""`qserve stream dlq list|show|replay|purge` end to end: subprocesses against a real server that
makes real dead letters (``--max-deliveries 1``: a watcher's negative commit moves the entry to
``SERVICE/dlq``), on each backend, checked by reading the queues back. The services of `DEDUPED` have a dedup window
(from the server's TOML file; one a test), the others none."""

from __future__ import annotations

import json
import re
from contextlib import ExitStack

import pytest

from qserve.client import BlockingQueueClient

from ..helpers.backends import BACKENDS
from ..helpers.process import ServerProcess
from ..helpers.redis_server import RedisServer, require_redis_server
from ..helpers.stream_cli import make_cli, wait_until

DEDUPED = ("deduped-a", "deduped-b")


@pytest.fixture(scope="module", params=BACKENDS)
def dlq_server(request, tmp_path_factory):
    """A server of this module's own, on each backend (the commands use the HTTP API only): every
    entry delivered once without a commit is a dead letter. Redis: a `redis-server` of its own."""
    data = tmp_path_factory.mktemp("qserve-dlq")
    config = data.parent / f"{data.name}.toml"
    config.write_text("".join(f'[services.{name}]\ndedup_window = "5m"\n' for name in DEDUPED))
    with ExitStack() as stack:
        backend = []
        if request.param == "redis":
            require_redis_server()
            redis = RedisServer(tmp_path_factory.mktemp("redis-dlq")).start()
            stack.callback(redis.stop)
            backend = ["--backend", redis.url]
        srv = ServerProcess(data, *backend, "--max-deliveries", "1", "--config", str(config)).start()
        stack.callback(srv.stop)
        yield srv


@pytest.fixture
def cli(tmp_path, dlq_server, service):
    return make_cli(tmp_path, f"{dlq_server.url}/api/predict/{service}", dlq_server.token)


def client(srv, path: str, user: str = "ops") -> BlockingQueueClient:
    return BlockingQueueClient(f"{srv.url}/api/predict/{path}", token=srv.token, user=user)


def dead_letters(srv, path: str, items: list[dict]) -> list[int]:
    """Put ``items`` (put's keyword arguments plus ``data``) into the queue at ``path``, negatively
    commit each from a watcher (code 500, reason ``boom I``), and wait until the service's
    dead-letter queue holds them all. Returns their indexes in the queue."""
    dlq_path = path.split("/")[0] + "/dlq"
    with client(srv, path, user="worker") as q, client(srv, dlq_path) as dlq:
        before = int(dlq.attributes()["stream.length"])
        indexes = [q.put(item["data"], item.get("tags"), priority=item.get("priority", 0),
                         path=item.get("path"))[0] for item in items]
        with q.watch(window=len(items)) as watcher:
            for _ in items:
                entry = next(watcher)
                q.negative(entry.index, "500", f"boom {entry.index}")
        wait_until(lambda: int(dlq.attributes()["stream.length"]) == before + len(items), what="the dead letters")
        assert q.count() == 0
    return indexes


def entries(srv, path: str) -> list:
    with client(srv, path) as q:
        return q.get(length=100, auto_delete=False)


def test_list_pages_and_show_prints_entries_whole(cli, dlq_server, service):
    assert cli("dlq", "list").stdout == "[INFO] no dead letters\n"
    first, second, third = dead_letters(dlq_server, service, [
        {"data": b"resize 7", "tags": {"requestId": "job-7", "lang": "en"}},
        {"data": b"resize 8"},
        {"data": "naïve\n".encode()}])
    table, as_json, page, show = cli.many([
        (("dlq", "list"), ""), (("dlq", "list", "--json"), ""), (("dlq", "list", "-l", "1", "--index", "2"), ""),
        (("dlq", "show", "1", "3"), "")])
    lines = table.stdout.splitlines()
    assert re.fullmatch(r"DLQ +QUEUE +INDEX +REQUEST_ID +DELIVERIES +GROUP +LAST_CODE +LAST_REASON", lines[0])
    rows = [line.split() for line in lines[1:]]
    assert rows[0] == ["1", service, str(first), "job-7", "1", "eas", "500", "boom", str(first)]
    assert [row[:3] for row in rows[1:]] == [["2", service, str(second)], ["3", service, str(third)]]
    objects = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert objects[0] == {"index": 1, "queue": service, "queue_index": first, "request_id": "job-7",
                          "deliveries": 1, "group": "eas", "last_code": "500", "last_reason": f"boom {first}",
                          "bytes": 8}
    assert [o["queue_index"] for o in objects] == [first, second, third] and len(objects[1]["request_id"]) == 36
    # paging: one entry from index 2 on, and where the next page starts
    assert page.stdout.splitlines()[1].split()[:3] == ["2", service, str(second)]
    assert page.stdout.splitlines()[2:] == ["[INFO] more from index 3: qserve stream dlq list --index 3"]
    # show: as get prints, every tag and the data
    shown = show.stdout.splitlines()
    assert re.fullmatch(rf"\[OK\] \[0 - 1\] tags\[dlq.deliveries=1 dlq.group=eas dlq.index={first} "
                        rf"dlq.queue={service} dlq.requestId=job-7 lang=en lastCode=500 lastReason=boom {first} "
                        r"requestId=job-7 ts@source=\d+\] resize 7", shown[0])
    assert shown[1].startswith("[OK] [1 - 3] tags[") and shown[1].endswith("] naïve")
    with client(dlq_server, f"{service}/dlq") as dlq:
        assert dlq.count() == 3                     # list and show read, never delete


def test_replay_puts_entries_back_with_their_request_id_then_deletes_them(cli, dlq_server, service):
    _, second, third = dead_letters(dlq_server, service, [
        {"data": b"a", "tags": {"requestId": "rid-a", "lang": "en"}, "priority": 1},
        {"data": b"b", "tags": {"requestId": "rid-b"}},
        {"data": b"c", "tags": {"requestId": "rid-c"}, "path": "v2/ocr"}])
    declined = cli("dlq", "replay", "1", "3", input="n\n")
    assert declined.stdout.endswith("[y/N][INFO] cancelled\n") and "index(es):\n1 3" in declined.stdout
    assert len(entries(dlq_server, f"{service}/dlq")) == 3
    out = cli("dlq", "replay", "1", "3", "-y").stdout.splitlines()
    m = [re.fullmatch(rf"\[OK\] (\d) -> {service} (\d+) requestId=(\S+)", line) for line in out[:2]]
    assert [(x.group(1), x.group(3)) for x in m] == [("1", "rid-a"), ("3", "rid-c")]
    assert out[2:] == ["[INFO] replayed: 2, failed: 0"]
    back = {e.tags["requestId"]: e for e in entries(dlq_server, service)}
    assert set(back) == {"rid-a", "rid-c"}
    a, c = back["rid-a"], back["rid-c"]
    assert [a.index, c.index] == [int(x.group(2)) for x in m] and a.index > third
    assert (a.data, c.data) == (b"a", b"c")
    assert not [k for k in [*a.tags, *c.tags] if k.startswith("dlq.") or k in ("lastCode", "lastReason")]
    assert a.tags["lang"] == "en" and c.tags["_path_"] == "v2/ocr"
    with client(dlq_server, service) as q:
        assert q.count(priority=1, tags={"requestId": "rid-a"}) == 1      # its priority came along
        assert q.count(priority=0, tags={"requestId": "rid-c"}) == 1
    [left] = entries(dlq_server, f"{service}/dlq")
    assert (left.index, left.tags["dlq.index"]) == (2, str(second))
    # an index the dead-letter queue does not hold: one line, nothing done
    err = cli("dlq", "replay", "2", "3", "-y", check=1).stderr
    assert err == f"[ERROR] not in the dead-letter queue /api/predict/{service}/dlq: 3\n"
    assert [e.index for e in entries(dlq_server, f"{service}/dlq")] == [2]


def test_replay_all_puts_a_sink_entry_back_into_the_sink(cli, dlq_server, service):
    dead_letters(dlq_server, service, [{"data": b"in", "tags": {"requestId": "rid-in"}}])
    dead_letters(dlq_server, f"{service}/sink", [{"data": b"out", "tags": {"requestId": "rid-out"}}])
    assert [e.tags["dlq.queue"] for e in entries(dlq_server, f"{service}/dlq")] == [service, f"{service}/sink"]
    out = cli("dlq", "replay", "--all", "-y", "--json", "--url", cli.url + "/sink").stdout   # any queue URL
    objects = [json.loads(line) for line in out.splitlines()]
    assert [(o["index"], o["queue"], o["request_id"]) for o in objects[:2]] == [
        (1, service, "rid-in"), (2, f"{service}/sink", "rid-out")]
    assert objects[2] == {"replayed": 2, "failed": 0}
    assert [(e.data, e.tags["requestId"]) for e in entries(dlq_server, service)] == [(b"in", "rid-in")]
    assert [(e.data, e.tags["requestId"]) for e in entries(dlq_server, f"{service}/sink")] == [(b"out", "rid-out")]
    assert entries(dlq_server, f"{service}/dlq") == []
    assert cli("dlq", "replay", "--all", "-y").stdout == "[INFO] no dead letters\n"


def test_replay_within_the_dedup_window_of_the_first_put_stores_the_entry(tmp_path, dlq_server):
    """The window still holds the requestId of the entry's first put, which a put would be a
    duplicate of: the server's replay stores the entry under a new index and re-keys the window, so
    a later put of that requestId is a duplicate of the replayed entry."""
    name = DEDUPED[0]
    cli = make_cli(tmp_path, f"{dlq_server.url}/api/predict/{name}", dlq_server.token)
    [index] = dead_letters(dlq_server, name, [{"data": b"once", "tags": {"requestId": "rid-once"}}])
    [letter] = entries(dlq_server, f"{name}/dlq")
    out = cli("dlq", "replay", str(letter.index), "-y").stdout.splitlines()
    m = re.fullmatch(rf"\[OK\] {letter.index} -> {name} (\d+) requestId=rid-once", out[0])
    assert m and int(m.group(1)) > index and out[1:] == ["[INFO] replayed: 1, failed: 0"]
    assert entries(dlq_server, f"{name}/dlq") == []
    [back] = entries(dlq_server, name)
    assert (back.index, back.data) == (int(m.group(1)), b"once")
    with client(dlq_server, name) as q:
        assert q.put(b"once", {"requestId": "rid-once"}) == (back.index, "rid-once")   # the window's answer
        assert q.count() == 1


def test_replay_keeps_any_priority_and_refuses_what_is_not_a_dead_letter(cli, dlq_server, service):
    dead_letters(dlq_server, service, [{"data": b"urgent", "tags": {"requestId": "rid-u"}, "priority": 5}])
    with client(dlq_server, f"{service}/dlq") as dlq:
        stray, _ = dlq.put(b"stray")                   # not a dead letter: no dlq.* tags
    proc = cli("dlq", "replay", str(stray), "1", "-y", check=1)
    assert proc.stderr.splitlines() == [
        f"[ERROR] dlq {stray}: entry {stray} of {service}/dlq is not a dead letter (no dlq.queue / dlq.index "
        "tags): delete it or get it instead"]
    assert proc.stdout.startswith(f"[OK] 1 -> {service} ")
    assert proc.stdout.splitlines()[-1] == "[INFO] replayed: 1, failed: 1"
    assert [e.index for e in entries(dlq_server, f"{service}/dlq")] == [stray]
    with client(dlq_server, service) as q:
        assert q.count(priority=5, tags={"requestId": "rid-u"}) == 1


def test_purge_indexes_or_all_after_asking(cli, dlq_server, service):
    assert cli("dlq", "purge", "--all", "-y").stdout == "[INFO] no dead letters\n"
    dead_letters(dlq_server, service, [{"data": f"e{i}".encode()} for i in range(4)])
    declined = cli("dlq", "purge", "2", "3")                          # end of input: declined
    assert declined.stdout == (f"Purging from /api/predict/{service}/dlq index(es):\n2 3 [y/N]\n"
                               "[INFO] cancelled\n")
    assert cli("dlq", "purge", "2", "3", input="y\n").stdout.endswith("[OK] purged 2 entries: 2 3\n")
    assert [e.index for e in entries(dlq_server, f"{service}/dlq")] == [1, 4]
    err = cli("dlq", "purge", "3", "4", "-y", check=1).stderr
    assert err == f"[ERROR] not in the dead-letter queue /api/predict/{service}/dlq: 3\n"
    assert cli("dlq", "purge", "--all", "-y", "--json").stdout == '{"purged_up_to": 4}\n'
    assert entries(dlq_server, f"{service}/dlq") == []
    assert entries(dlq_server, service) == []                          # purged, not replayed


@pytest.mark.parametrize("args", [("dlq",), ("dlq", "replay"), ("dlq", "purge"), ("dlq", "replay", "1", "--all"),
                                  ("dlq", "show", "0"), ("dlq", "list", "-l", "0"), ("dlq", "show")])
def test_usage_errors_exit_2(cli, args):
    proc = cli(*args, check=2)
    assert "usage: qserve stream dlq" in proc.stderr and proc.stdout == ""


def test_errors_are_one_line(cli, dlq_server, service):
    wrong, unreachable = cli.many([(("dlq", "list", "--token", "wrong"), ""),
                                   (("dlq", "show", "1", "--url", "http://127.0.0.1:1/api/predict/x"), "")])
    assert wrong.returncode == unreachable.returncode == 1
    assert wrong.stderr.startswith("[ERROR] 401 unauthorized: ") and wrong.stderr.count("\n") == 1
    assert unreachable.stderr == "[ERROR] cannot reach http://127.0.0.1:1: connection refused\n"
