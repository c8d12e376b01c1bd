"""`qserve stream ls` and `qserve stream create NAME` against the real server's /api/queues."""

from __future__ import annotations

import json
import re

from qserve import cli as qserve_cli
from qserve.client import BlockingQueueClient
from qserve.core.events import QueueRef
from qserve.backends.local.queues import queue_dir
from qserve.storage.lock import DirLock

from ..helpers.stream_cli import make_cli, wait_until


def _row(lines: list[str], service: str, queue: str) -> list[str]:
    [row] = [line.split(None, 4) for line in lines if line.split()[:2] == [service, queue]]
    return row


def test_create_then_ls_shows_length_and_consumers(tmp_path, server, service):
    url = f"{server.url}/api/predict/{service}"
    cli = make_cli(tmp_path, url, server.token)
    first, again = cli.many([(("create", service), ""), (("create", service, "--json"), "")])
    assert first.stdout == f"[OK] created {service}\n"
    assert json.loads(again.stdout) == {"created": service}                  # idempotent
    with BlockingQueueClient(url, token=server.token, user="u1") as q:
        for data in (b"a", b"b", b"c"):
            q.put(data)
        with q.watch(window=1) as watcher:                                   # one consumer, holding entry 1
            assert next(watcher).data == b"a"
            wait_until(lambda: q.attributes()["consumers.stats.total"] == "1", what="the consumer")
            table, as_json = cli.many([(("ls",), ""), (("ls", "--json"), "")])
    lines = table.stdout.splitlines()
    assert re.fullmatch(r"SERVICE +QUEUE +LENGTH +CONSUMERS +STATUS", lines[0])
    starts = [lines[0].index(h) for h in ("QUEUE", "LENGTH", "CONSUMERS", "STATUS")]
    for line in lines[1:]:                                                    # the columns line up
        assert all(line[p - 1] == " " and line[p] != " " for p in starts), line
    assert _row(lines, service, "input") == [service, "input", "3", "1", "open"]
    assert _row(lines, service, "sink") == [service, "sink", "0", "0", "open"]
    objects = [json.loads(line) for line in as_json.stdout.splitlines()]
    [mine] = [o for o in objects if o["service"] == service and o["queue"] == "input"]
    assert (mine["path"], mine["length"], mine["consumers"], mine["status"]) == (
        f"/api/predict/{service}", 3, 1, "open")


def test_ls_shows_a_fenced_queue_with_its_reason(tmp_path, server, service):
    cli = make_cli(tmp_path, f"{server.url}/api/predict/{service}", server.token)
    directory = queue_dir(server.data_dir, QueueRef(service))
    directory.mkdir(parents=True)
    with DirLock.acquire(directory):           # the queue cannot be opened: the server fences it
        with BlockingQueueClient(cli.url, token=server.token) as q:
            q.attributes()
        table, as_json = cli.many([(("ls",), ""), (("ls", "--json"), "")])
    row = _row(table.stdout.splitlines(), service, "input")
    assert row[2:4] == ["-", "-"] and row[4].startswith("fenced: ") and "in use by process" in row[4]
    [mine] = [json.loads(line) for line in as_json.stdout.splitlines() if f'"{service}"' in line]
    assert mine["status"] == "fenced" and "length" not in mine and row[4] == f"fenced: {mine['reason']}"


def test_server_command_errors_are_one_line(tmp_path, server, service, monkeypatch, capsys):
    cli = make_cli(tmp_path, f"{server.url}/api/predict/{service}", server.token)
    monkeypatch.setenv("QSERVE_CONFIG_DIR", cli.env["QSERVE_CONFIG_DIR"])     # in process: same parser and main
    for args, expected in [
        (("ls", "--token", "wrong"), "[ERROR] 401 unauthorized: missing or wrong token"),
        (("create", service, "--token", "wrong"), "[ERROR] 401 unauthorized: "),
        (("create", "a/b"), "[ERROR] service name 'a/b': must not be empty nor contain '/'"),
        (("ls", "--url", "http://127.0.0.1:1/x"), "[ERROR] cannot reach http://127.0.0.1:1: connection refused"),
    ]:
        assert qserve_cli.main(["stream", *args]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1, (args, err)
