"""qserve's own endpoints and queue creation on purpose, through a real in-process server.

`GET /api/queues` lists the open and fenced queues (the JSON `qserve stream ls` reads), filtered by
the token; `POST /api/queues/S` creates service S's input and sink, idempotently, refused like an
auto-created queue would be; `--no-auto-create` makes a request to an unknown queue a 404 naming
the way to create it. Servers run on trio's mock clock (`clock`), each test bounded.
"""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing

from qserve.core.events import QueueRef
from qserve.backends.local.queues import queue_dir

from ..helpers.inproc import TOKEN, running_server
from ..helpers.queue_files import ENTRIES, build_queue, damage_sealed_segment


@pytest.fixture
def clock():
    """trio's autojump clock, jumping only after 0.25 s of real idleness: a queue opened from disk
    recovers in a worker thread, and waiting for it must not let the clock jump to the test's limit."""
    return trio.testing.MockClock(autojump_threshold=0.25)


async def call(srv, method: str, target: str, token: str | None = TOKEN, body: bytes = b""):
    """One request on a fresh connection: (status, headers as a dict, body)."""
    c = await srv.client("unused")
    try:
        head, data = await c.request(method, target, body, [("Authorization", token)] if token else [])
    finally:
        await c.stream.aclose()
    return head.status_code, {k.decode().lower(): v.decode() for k, v in head.headers}, data


async def listing(srv, token: str | None = TOKEN) -> list[dict]:
    status, headers, body = await call(srv, "GET", "/api/queues", token)
    assert (status, headers["content-type"]) == (200, "application/json"), body
    return json.loads(body)["queues"]


async def test_the_listing_has_every_queue_with_its_figures(tmp_path, backend, clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv:
            assert await listing(srv) == []
            demo, other = await srv.client("demo"), await srv.client("a%20b")   # service "a b"
            for data in (b"1", b"2", b"3"):
                assert (await demo.call("POST", body=data))[0] == 200
            assert (await demo.call("POST", body=b"r", sink=True))[0] == 200
            assert (await other.call("POST", body=b"x"))[0] == 200
            async with trio.open_nursery() as nursery:
                ws = await srv.watch(nursery, "demo", "_window_=1", user="u1")
                await ws.get_message()   # attached: one consumer in one group
                queues = await listing(srv)
                await ws.aclose()
                nursery.cancel_scope.cancel()
    assert queues == [
        {"service": "a b", "queue": "input", "path": "/api/predict/a%20b", "status": "open",
         "length": 1, "first_index": 1, "last_index": 1, "consumers": 0, "groups": 0},
        {"service": "demo", "queue": "input", "path": "/api/predict/demo", "status": "open",
         "length": 3, "first_index": 1, "last_index": 3, "consumers": 1, "groups": 1},
        {"service": "demo", "queue": "sink", "path": "/api/predict/demo/sink", "status": "open",
         "length": 1, "first_index": 1, "last_index": 1, "consumers": 0, "groups": 0},
    ]


async def test_the_listing_shows_only_what_the_token_opens(tmp_path, backend, clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend, token=None, tokens={"a": "ta", "b": "tb"}) as srv:
            for service, token in (("a", "ta"), ("b", "tb")):
                c = await srv.client(service, headers=[("Authorization", token)])
                status, _ = await c.request("POST", f"/api/predict/{service}", b"x", [("Authorization", token)])
                assert status.status_code == 200
            assert [q["service"] for q in await listing(srv, "ta")] == ["a"]
            assert [q["service"] for q in await listing(srv, "Bearer tb")] == ["b"]
            for token in ("wrong", None):
                status, headers, body = await call(srv, "GET", "/api/queues", token)
                assert (status, body) == (401, b"missing or wrong token in the Authorization header\n")
            status, headers, _ = await call(srv, "DELETE", "/api/queues", "ta")
            assert (status, headers["allow"]) == (405, "GET")
        async with running_server(tmp_path, **backend, token=None) as srv:   # no token configured: open
            assert [q["service"] for q in await listing(srv, None)] == ["a", "b"]


async def test_create_makes_both_queues_once(tmp_path, backend, caplog, clock):
    caplog.set_level(logging.INFO, logger="qserve")
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv:
            for _ in range(2):   # idempotent
                status, headers, body = await call(srv, "POST", "/api/queues/demo")
                assert (status, body) == (200, b"OK")
            assert [(q["queue"], q["status"], q["length"]) for q in await listing(srv)] == [
                ("input", "open", 0), ("sink", "open", 0)]
            status, _, body = await call(srv, "POST", "/api/queues/demo", "wrong")
            assert (status, body) == (401, b"missing or wrong token in the Authorization header\n")
            status, headers, _ = await call(srv, "GET", "/api/queues/demo")
            assert (status, headers["allow"]) == (405, "POST")
            for target in ("/api/queues/", "/api/queues/..", "/api/queues/a%01b", "/api/queues/" + "x" * 256):
                status, _, body = await call(srv, "POST", target)
                assert status == 400 and body.count(b"\n") == 1, (target, body)
            assert (await call(srv, "POST", "/api/queues/a/b"))[0] == 404
        async with running_server(tmp_path, **backend) as srv:   # a restart opens them: not created again
            assert len(await listing(srv)) == 2
    assert [m for m in caplog.messages if m.endswith(" created")] == ["queue demo created", "queue demo/sink created"]
    assert "queue demo opened: 0 entries" in " ".join(caplog.messages)


async def test_create_is_refused_like_an_auto_created_queue(tmp_path, backend, clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend, max_queues=2) as srv:
            assert (await call(srv, "POST", "/api/queues/one"))[0] == 200
            status, _, body = await call(srv, "POST", "/api/queues/two")
            assert (status, body) == (507, b"cannot create queue two: the server holds its limit of 2 queues\n")
        async with running_server(tmp_path, **backend, queues=("one",)) as srv:
            status, _, body = await call(srv, "POST", "/api/queues/two")
            assert (status, body) == (404, b"no queue named two (the server serves the services of --queues only)\n")
            assert (await call(srv, "POST", "/api/queues/one"))[0] == 200


async def test_no_auto_create_serves_only_known_queues(tmp_path, backend, clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv:   # made earlier, on disk
            assert (await (await srv.client("old")).call("POST", body=b"x"))[0] == 200
        async with running_server(tmp_path, **backend, auto_create=False, queues=("declared", "old"), root_service="root") as srv:
            assert (await (await srv.client("declared")).call("POST", body=b"x"))[0] == 200
            assert (await (await srv.client("root")).call("POST", body=b"x"))[0] == 200
            assert (await (await srv.client("old")).call("GET", "_count_=true")) == (200, b"1")
        async with running_server(tmp_path, **backend, auto_create=False) as srv:
            demo = await srv.client("demo")
            for sink in (False, True):
                status, body = await demo.call("POST", body=b"x", sink=sink)
                name = "demo/sink" if sink else "demo"
                assert (status, body.decode()) == (404, f"no queue named {name} (the server runs with "
                                                        "--no-auto-create; create it with: qserve stream create demo)\n")
            assert "demo" not in {q["service"] for q in await listing(srv)}
            assert (await call(srv, "POST", "/api/queues/demo"))[0] == 200
            assert await demo.call("POST", body=b"x") == (200, b"1")
            assert await demo.call("POST", body=b"y", sink=True) == (200, b"1")
            assert await (await srv.client("old")).call("GET", "_count_=true") == (200, b"1")


async def test_the_listing_shows_a_fenced_queue_with_its_reason(tmp_path):
    data = tmp_path / "data"
    bad_dir = queue_dir(data, QueueRef("bad"))
    build_queue(bad_dir, ENTRIES)
    damage_sealed_segment(bad_dir)
    with trio.fail_after(20):   # real time: the damaged queue's open runs in a thread
        async with running_server(tmp_path) as srv:
            c = await srv.client("bad")
            status, body = await c.call("GET")
            head, listing = await c.request("GET", "/api/queues", headers=[("Authorization", TOKEN)])
            assert head.status_code == 200
            assert json.loads(listing) == {"queues": [
                {"service": "bad", "queue": "input", "path": "/api/predict/bad", "status": "fenced",
                 "reason": body.decode().strip()}]}


async def test_the_admin_paths_are_not_taken_by_the_root_service(tmp_path, backend, clock):
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend, root_service="root") as srv:
            assert (await call(srv, "POST", "/api/queues/demo"))[0] == 200
            assert {q["service"] for q in await listing(srv)} == {"demo", "root"}


async def test_a_service_name_no_directory_can_have_is_no_queue(tmp_path, backend, clock):
    """A control character (it would split the server's log lines) or a name longer than a file
    name (it used to be a 500 with a traceback) names no queue: a one-line 404, nothing created."""
    with trio.fail_after(60):
        async with running_server(tmp_path, **backend) as srv:
            for service in ("a%00b", "a%0Ab", "x" * 256):
                status, _, body = await call(srv, "POST", f"/api/predict/{service}", body=b"x")
                assert status == 404 and body.startswith(b"no queue at /api/predict/"), (service, body)
                assert body.count(b"\n") == 1
            assert await listing(srv) == []
