"""`qserve redis inspect QUEUE`: a queue served by a real `qserve serve --backend` on a real
`redis-server`, with a real watcher (the official SDK) holding part of it, shown key by key with
its state, groups and consumers, as text and as JSON; failures are one line and a non-zero exit."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess

import pytest

from ..helpers.commands import assert_one_line, run_qserve
from ..helpers.process import ServerProcess
from ..helpers.sdk import client, collect


@pytest.fixture
def node(redis_url, tmp_path):
    srv = ServerProcess(tmp_path / "unused", "--backend", redis_url).start()
    yield srv
    assert srv.stop() == 0


def inspect(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_qserve("redis", "inspect", *args, **kwargs)


def test_keys_state_groups_and_consumers(node, redis_url, service):
    q = client(node, service, uid="w1", gid="g1")
    for i in range(5):
        q.put(f"e{i}".encode(), tags={"lang": "en"})
    watcher = q.watch(0, 2, auto_commit=False)
    try:
        assert [df.index for df in collect(watcher, 2)] == [1, 2]    # the window is full: 2 held
        as_json = inspect(service, "--backend", redis_url, "--json")
        as_text = inspect(service, "--backend", redis_url)
    finally:
        watcher.close()
    assert as_json.returncode == 0 and as_json.stderr == "", as_json.stderr
    report = json.loads(as_json.stdout)
    tag = "{qs:" + service + "}"
    where = redis_url.removeprefix("redis://")
    assert {k: report[k] for k in ("queue", "tag", "redis", "state", "length", "firstIndex", "lastIndex",
                                   "nextIndex")} == {
        "queue": service, "tag": tag, "redis": where, "state": "Normal", "length": 5, "firstIndex": 1,
        "lastIndex": 5, "nextIndex": 6}
    keys = {k["name"]: (k["type"], k["length"]) for k in report["keys"]}
    assert keys[f"{tag}:s"] == ("stream", 5) and keys[f"{tag}:r"] == ("hash", 5)
    assert keys[f"{tag}:gm:g1"] == ("set", 1) and keys[f"{tag}:o:g1"] == ("hash", 2)
    assert keys[f"{tag}:c"] == ("hash", 1) and keys[f"{tag}:lease"] == ("hash", 1)
    assert f"{tag}:p" not in keys                                   # no priority entry, no set
    assert report["groups"] == [{"name": "g1", "pending": 2, "delivered": 2, "lastIndex": 2, "members": 1}]
    [consumer] = report["consumers"]
    assert {k: consumer[k] for k in ("id", "group", "window", "held", "delivered", "lastIndex", "autoCommit",
                                     "tags")} == {
        "id": "g1.w1", "group": "g1", "window": 2, "held": 2, "delivered": 2, "lastIndex": 2,
        "autoCommit": False, "tags": {}}
    assert f":{node.proc.pid}:" in consumer["node"]
    assert 0 < consumer["leaseLeftSeconds"] <= 10 and consumer["idleSeconds"] >= 0

    assert as_text.returncode == 0 and as_text.stderr == "", as_text.stderr
    lines = as_text.stdout.splitlines()
    assert lines[:3] == [f"queue {service} in redis at {where}, keys {tag}:*",
                         "state Normal; 5 entries (first 1, last 5); next index 6", "keys:"]
    assert lines[3].split() == ["NAME", "TYPE", "LENGTH"]
    assert [f"{tag}:s", "stream", "5"] in [line.split() for line in lines]
    groups = lines.index("groups:")
    assert [line.split() for line in lines[groups + 1:groups + 3]] == [
        ["NAME", "PENDING", "DELIVERED", "LAST", "INDEX", "MEMBERS"], ["g1", "2", "2", "2", "1"]]
    assert lines[groups + 3] == "consumers:"
    row = lines[groups + 5].split()
    assert row[:2] == ["g1.w1", "g1"] and row[3:6] == ["2", "2", "2"] and row[-1].endswith("s")


def test_an_ended_sink_and_the_url_from_qserve_backend(node, redis_url, service):
    client(node, service + "/sink").put(b"answer")
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    conn.request("POST", f"/api/predict/{service}/sink?_eos_=true", headers={"Authorization": node.token})
    assert conn.getresponse().status == 200
    conn.close()
    proc = inspect(f"{service}/sink", env={"QSERVE_BACKEND": redis_url})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "state End; 1 entry (first 1, last 1); next index 2"
    assert lines[-2:] == ["groups: none", "consumers: none"]


def test_a_queue_that_does_not_exist_is_one_line(redis_url):
    where = redis_url.removeprefix("redis://")
    assert_one_line(inspect("nope", "--backend", redis_url), "redis inspect", f"no queue nope in redis at {where}")
    assert_one_line(inspect("nope/sink", "--backend", redis_url), "redis inspect", "no queue nope/sink")


@pytest.mark.parametrize("name", ["a/b", "a/sink/x", "/sink", ".."])
def test_a_bad_queue_name_is_one_line(name):
    assert_one_line(inspect(name, "--backend", "redis://127.0.0.1:1/0"), "redis inspect",
                    "name it SERVICE (the input queue) or SERVICE/sink", status=2)


def test_an_unreachable_redis_is_one_line_without_the_password():
    with socket.socket() as bound:   # bound, not listening: every connection is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        proc = inspect("svc", "--backend", f"redis://u:s3cret@127.0.0.1:{port}/0")
    line = assert_one_line(proc, "redis inspect", f"redis at 127.0.0.1:{port}/0 is unreachable")
    assert "s3cret" not in line


@pytest.mark.parametrize("args, needle", [
    (["--backend", "redis://127.0.0.1:6379/x"], "--backend: database 'x'"),
    ([], "--backend URL (or QSERVE_BACKEND)"),
])
def test_a_bad_or_missing_url_is_one_line(args, needle):
    assert_one_line(inspect("svc", *args), "redis inspect", needle, status=2)
