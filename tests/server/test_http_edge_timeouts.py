"""The HTTP/1.1 edge (`qserve.server.http`) over time and load: slow requests (408), idle and
stalled connections, request timeouts versus handler time, graceful shutdown (drain, grace,
stragglers), IPv6 and absolute-form targets, hundreds of idle connections and the connection limit
(503).

Peers are h11 client connections and raw bytes, over a real loopback socket (`serve_tcp`
on 127.0.0.1, port 0), or over memory streams through a `MemoryListener` when a test waits for a
timeout (`autojump_clock` then owns time and nothing sleeps for real). Every test runs
under `trio.fail_after`.
"""

from __future__ import annotations

import logging

import h11
import pytest
import trio
import trio.testing

from qserve.server.http import HTTPServer
from qserve.server.types import HTTPConfig, Request, Response

from ..helpers.http_edge import LIMIT, SMALL, App, hdr, memory_server, parse_responses, settled, tcp_server
from ..helpers.peers import Client, MemoryListener, read_to_eof


# -- timeouts (memory streams, autojump_clock) -------------------------------------------------------


async def test_slow_request_408(autojump_clock):
    with trio.fail_after(LIMIT * 10):
        app = App()
        async with memory_server(app) as (_, listener):
            stream = await listener.connect()
            start = trio.current_time()
            await stream.send_all(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            responses = parse_responses(await read_to_eof(stream))
            assert [r[0] for r in responses] == [408] and app.seen == []
            assert SMALL.request_timeout <= trio.current_time() - start < SMALL.request_timeout + 2.5

            stream = await listener.connect()  # a slowloris head gets the same answer
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
            assert [r[0] for r in parse_responses(await read_to_eof(stream))] == [408]


async def test_idle_keepalive_closes_quietly(autojump_clock):
    with trio.fail_after(LIMIT * 10):
        async with memory_server(App()) as (server, listener):
            client = Client(await listener.connect())
            head, _ = await client.request("GET", "/one")
            assert head.status_code == 200
            start = trio.current_time()
            assert await client.stream.receive_some(100) == b""
            assert trio.current_time() - start == pytest.approx(SMALL.keepalive_timeout)
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics()["connections_open"] == 0
            assert server.statistics()["errors_by_status"] == {}


async def test_handler_and_keepalive_are_not_bounded_by_request_timeout(autojump_clock):
    with trio.fail_after(LIMIT * 10):
        async def slow(request: Request) -> Response:
            await trio.sleep(2 * SMALL.request_timeout)  # the request deadline is lifted for the handler
            return Response(200, b"done")

        async with memory_server(slow) as (server, listener):
            client = Client(await listener.connect())
            for _ in range(2):
                start = trio.current_time()
                head, body = await client.request("GET", "/")
                assert (head.status_code, body) == (200, b"done")
                assert trio.current_time() - start == pytest.approx(2 * SMALL.request_timeout)
                await trio.sleep(SMALL.keepalive_timeout - 1)  # idle, but within keep-alive
            start = trio.current_time()
            assert await client.stream.receive_some(100) == b""  # keep-alive counted from the last response
            assert trio.current_time() - start == pytest.approx(1)
            assert server.statistics()["errors_by_status"] == {}


async def test_partial_pipelined_request_is_bounded_by_request_timeout(autojump_clock):
    with trio.fail_after(LIMIT * 10):
        async with memory_server(App()) as (_, listener):
            stream = await listener.connect()
            start = trio.current_time()
            await stream.send_all(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\nGET /two HTTP/1.1\r\n")
            responses = parse_responses(await read_to_eof(stream))
            assert [r[0] for r in responses] == [200, 408]
            assert SMALL.request_timeout <= trio.current_time() - start < SMALL.keepalive_timeout


async def test_stalled_write_closes_the_connection(autojump_clock):
    with trio.fail_after(LIMIT * 10):
        async def big(request: Request) -> Response:
            return Response(200, b"b" * 100_000)

        listener = MemoryListener(trio.testing.lockstep_stream_pair)  # a write waits for the reader
        async with memory_server(big, listener=listener) as (server, listener):
            stream = await listener.connect()
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            start = trio.current_time()  # the client never reads: the response write stalls
            while server.statistics()["connections_open"]:
                await trio.sleep(0.25)
            assert SMALL.request_timeout <= trio.current_time() - start <= SMALL.request_timeout + 0.25


async def test_shutdown_drains_in_flight_then_serve_returns(autojump_clock):
    with trio.fail_after(LIMIT * 10):
        server, listener = HTTPServer(App(), None, SMALL), MemoryListener()
        got = []
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [listener])
            idle = Client(await listener.connect())
            busy = Client(await listener.connect())

            async def slow_request():
                got.append(await busy.request("GET", "/slow"))  # the handler takes 1 s

            nursery.start_soon(slow_request)
            await trio.sleep(0.5)
            start = trio.current_time()
            server.shutdown()
            assert await idle.stream.receive_some(100) == b""  # idle keep-alive closes at once
            assert trio.current_time() == start
        (head, body), = got  # serve() returned after the in-flight request finished
        assert head.status_code == 200 and body == b"GET /slow [] "
        assert hdr(head, b"connection") == b"close"
        assert trio.current_time() - start == pytest.approx(0.5)
        with pytest.raises(trio.BrokenResourceError):  # no longer accepting
            await listener.connect()


async def test_request_arriving_as_shutdown_begins_is_served(autojump_clock):
    with trio.fail_after(LIMIT * 10):
        async with memory_server(App()) as (server, listener):
            client = Client(await listener.connect())
            assert (await client.request("GET", "/first"))[0].status_code == 200
            await trio.testing.wait_all_tasks_blocked()  # the connection is idle
            client.conn.start_next_cycle()
            await client.send(h11.Request(method="GET", target="/second", headers=[("Host", "t")]),
                              h11.EndOfMessage())
            server.shutdown()  # the server has the bytes but has not run since: shutdown races with them
            head, body = await client.response()
            assert (head.status_code, body) == (200, b"GET /second [] ")
            assert hdr(head, b"connection") == b"close"


async def test_shutdown_grace_cancels_stragglers(autojump_clock):
    with trio.fail_after(LIMIT * 10):
        async def stuck(request: Request) -> Response:
            await trio.sleep_forever()

        server, listener = HTTPServer(stuck, None, SMALL), MemoryListener()
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [listener])
            client = Client(await listener.connect())
            await client.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]), h11.EndOfMessage())
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            server.shutdown()
        assert trio.current_time() - start == pytest.approx(SMALL.shutdown_grace)
        assert await client.stream.receive_some(100) == b""


async def test_ipv6_and_absolute_form_target():
    with trio.fail_after(LIMIT):
        app = App()
        server = HTTPServer(app, None, SMALL)
        async with trio.open_nursery() as nursery:
            try:
                port = await nursery.start(server.serve_tcp, "::1", 0)
            except OSError:
                pytest.skip("no IPv6 loopback here")
            client = Client(await trio.open_tcp_stream("::1", port))
            head, body = await client.request("GET", "http://example/p%2Fq?a=b")
            assert head.status_code == 200 and body == b"GET /p/q [('a', 'b')] "
            assert app.seen[0].client[0] == "::1"
            server.shutdown()


# -- many connections -------------------------------------------------------------------------------


async def test_hundreds_of_idle_connections_then_a_fresh_request():
    with trio.fail_after(LIMIT):
        async with tcp_server(App()) as (server, port):
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(300)]
            head, _ = await Client(await trio.open_tcp_stream("127.0.0.1", port)).request("GET", "/fresh")
            assert head.status_code == 200
            assert server.statistics()["connections_open"] >= 300
            for stream in idle:
                await stream.aclose()


async def test_connection_limit_503(caplog):
    with trio.fail_after(LIMIT):
        config = HTTPConfig(max_connections=2, request_timeout=3.0)
        async with tcp_server(App(), config=config) as (server, port):
            first = Client(await trio.open_tcp_stream("127.0.0.1", port))
            second = Client(await trio.open_tcp_stream("127.0.0.1", port))
            for c in (first, second):
                assert (await c.request("GET", "/"))[0].status_code == 200
            with caplog.at_level(logging.WARNING, logger="qserve.http"):
                third = Client(await trio.open_tcp_stream("127.0.0.1", port))
                head, body = await third.request("GET", "/")
            assert head.status_code == 503 and hdr(head, b"retry-after") == b"1"
            assert await third.stream.receive_some(100) == b""
            assert any("connection limit" in r.getMessage() for r in caplog.records)
            await first.stream.aclose()
            await settled(lambda: server.statistics()["connections_open"] == 1)
            fourth = Client(await trio.open_tcp_stream("127.0.0.1", port))
            assert (await fourth.request("GET", "/"))[0].status_code == 200
