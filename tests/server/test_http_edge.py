"""The HTTP/1.1 + WebSocket edge (`qserve.server.http`, `qserve.server.websocket`), talked to by real peers.

Peers are h11 client connections, raw bytes, and trio-websocket clients, over a real loopback socket
(`serve_tcp` on 127.0.0.1, port 0), or over memory streams through a `MemoryListener` when a test
waits for a timeout (`autojump_clock` then owns time and nothing sleeps for real). Every test runs
under `trio.fail_after`.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import h11
import pytest
import trio
import trio.testing
import trio_websocket
import wsproto.connection
import wsproto.events

from qserve.core import errors
from qserve.server.http import HTTPServer
from qserve.server.types import HTTPConfig, Request, Response
from qserve.server.websocket import ReplayStream, binary_frame

from ..helpers.peers import Client, MemoryListener, read_to_eof

LIMIT = 10  # seconds (trio's clock) for any test

SMALL = HTTPConfig(max_header_bytes=4096, max_body_bytes=1000, keepalive_timeout=5.0,
                   request_timeout=3.0, shutdown_grace=2.0)


# -- peers and plumbing ------------------------------------------------------------------------------


def hdr(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


async def settled(predicate, rounds: int = 50) -> None:
    """Wait, without sleeping, until the server has processed what the kernel delivered (loopback
    delivers synchronously, and trio polls I/O before waking idle waiters), then check."""
    for _ in range(rounds):
        await trio.testing.wait_all_tasks_blocked()
        if predicate():
            return
    raise AssertionError("condition never became true")


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split raw bytes into responses (each to a GET), with an h11 client that 'sent' them."""
    conn, out = h11.Connection(h11.CLIENT), []
    conn.receive_data(data)
    while True:
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        event = conn.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return out
        body = b""
        while not isinstance(e := conn.next_event(), h11.EndOfMessage):
            body += e.data
        out.append((event.status_code, dict(event.headers), body))
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return out
        conn.start_next_cycle()


class App:
    """A test application: echoes the request and records what it saw."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        if request.path == "/empty":
            return Response(204, b"ignored body")
        if request.path == "/boom":
            raise RuntimeError("secret internals")
        if request.path == "/teapot":
            raise errors.Conflict("queue ended")
        if request.path == "/slow":
            await trio.sleep(1.0)
        text = f"{request.method} {request.path} {list(request.query)} {request.body.decode()}"
        return Response(200, text.encode(), [("Content-Type", "text/plain"), ("Content-Length", "999")])


@asynccontextmanager
async def tcp_server(app, ws_handler=None, config=SMALL, **kwargs):
    server = HTTPServer(app, ws_handler, config, **kwargs)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        yield server, port
        server.shutdown()


@asynccontextmanager
async def memory_server(app, ws_handler=None, config=SMALL, listener=None):
    server, listener = HTTPServer(app, ws_handler, config), listener or MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [listener])
        yield server, listener
        server.shutdown()


# -- parsing, keep-alive, framing ------------------------------------------------------------------

REQ = b"POST /a%20b?x=1&y=&x=2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nX-Thing: Yes\r\n\r\nhello"


@pytest.mark.parametrize("mode", ["whole", "bytewise", "pipelined"])
async def test_request_fed_whole_bytewise_and_pipelined(mode):
    with trio.fail_after(LIMIT):
        app = App()
        async with tcp_server(app) as (_, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            last = b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            if mode == "whole":
                await stream.send_all(REQ + last)
            elif mode == "bytewise":
                for i in range(len(REQ + last)):
                    await stream.send_all((REQ + last)[i:i + 1])
            else:  # the second request arrives in the same segment as the first one's body
                await stream.send_all(REQ[:-3])
                await stream.send_all(REQ[-3:] + REQ + last)
            responses = parse_responses(await read_to_eof(stream))
        expected = 3 if mode == "pipelined" else 2
        assert [r[0] for r in responses] == [200] * expected
        assert responses[0][2] == b"POST /a b [('x', '1'), ('y', ''), ('x', '2')] hello"
        assert responses[-1][2] == b"GET /last [] "
        first = app.seen[0]
        assert first.target == "/a%20b?x=1&y=&x=2"
        assert first.header("x-THING") == "Yes" and first.header("nope", "d") == "d"
        assert first.client is not None and first.client[0] == "127.0.0.1"


async def test_keepalive_content_length_and_204():
    with trio.fail_after(LIMIT):
        async with tcp_server(App()) as (server, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            for i in range(5):
                head, body = await client.request("POST", f"/n{i}", b"x" * i)
                assert head.status_code == 200
                assert hdr(head, b"content-length") == str(len(body)).encode()  # the app's 999 is replaced
                assert body == f"POST /n{i} [] {'x' * i}".encode()
            head, body = await client.request("GET", "/empty")
            assert head.status_code == 204 and body == b"" and hdr(head, b"content-length") is None
            head, body = await client.request("GET", "/after")  # nothing stray followed the 204
            assert head.status_code == 200 and body == b"GET /after [] "
            assert server.statistics()["requests_served"] == 7
            assert server.statistics()["connections_open"] == 1


async def test_head_gets_the_head_only_and_the_connection_goes_on(caplog):
    with trio.fail_after(LIMIT):
        finished = []
        streaming = streaming_app([b"x"], finished)

        async def app(request: Request) -> Response:
            if request.path == "/stream":
                return await streaming(request)
            return Response(405, b"not here\n", [("Allow", "GET")])

        async with tcp_server(app) as (_, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            with caplog.at_level(logging.ERROR, logger="qserve.http"):
                head, body = await client.request("HEAD", "/q")
                assert head.status_code == 405 and body == b"" and hdr(head, b"content-length") == b"9"
                head, body = await client.request("HEAD", "/stream")
                assert head.status_code == 200 and body == b"" and finished == []  # the stream is not run
                head, body = await client.request("GET", "/q")
                assert head.status_code == 405 and body == b"not here\n"
            assert caplog.records == []


class CountingStream(trio.abc.HalfCloseableStream):
    """A server-side stream that counts its writes (wraps a memory stream)."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, writes: list[bytes]) -> None:
        self._stream, self._writes = stream, writes

    async def send_all(self, data) -> None:
        self._writes.append(bytes(data))
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


async def test_one_write_per_response():
    with trio.fail_after(LIMIT):
        writes: list[bytes] = []

        def pair():
            client, server = trio.testing.memory_stream_pair()
            return client, CountingStream(server, writes)

        async with memory_server(App(), listener=MemoryListener(pair)) as (_, listener):
            client = Client(await listener.connect())
            for target in ("/a", "/empty", "/b"):
                await client.request("POST", target, b"data")
        assert len(writes) == 3  # head, body and end of each response in one send_all
        assert writes[0].startswith(b"HTTP/1.1 200 ") and writes[0].endswith(b"POST /a [] data")
        assert writes[1].startswith(b"HTTP/1.1 204 ") and writes[1].endswith(b"\r\n\r\n")


async def test_handler_errors_rendered_by_errors_module(caplog):
    with trio.fail_after(LIMIT):
        async with tcp_server(App()) as (server, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            head, body = await client.request("GET", "/teapot")
            assert (head.status_code, body) == (409, b"queue ended\n")
            with caplog.at_level(logging.ERROR, logger="qserve.http"):
                head, body = await client.request("GET", "/boom")
            assert head.status_code == 500 and b"secret" not in body
            assert len([r for r in caplog.records if r.name == "qserve.http"]) == 1
            head, _ = await client.request("GET", "/still-alive")
            assert head.status_code == 200
            assert server.statistics()["errors_by_status"] == {409: 1, 500: 1}


# -- 100-continue and body limits -------------------------------------------------------------------


async def test_expect_100_continue_accepted():
    with trio.fail_after(LIMIT):
        async with tcp_server(App()) as (_, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            await client.send(h11.Request(method="PUT", target="/up", headers=[
                ("Host", "t"), ("Content-Length", "3"), ("Expect", "100-continue")]))
            event = await client.next_event()
            assert isinstance(event, h11.InformationalResponse) and event.status_code == 100
            await client.send(h11.Data(data=b"abc"), h11.EndOfMessage())
            head, body = await client.response()
            assert head.status_code == 200 and body == b"PUT /up [] abc"


async def test_expect_100_continue_refused_with_413():
    with trio.fail_after(LIMIT):
        app = App()
        async with tcp_server(app) as (_, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            await client.send(h11.Request(method="PUT", target="/up", headers=[
                ("Host", "t"), ("Content-Length", "5000"), ("Expect", "100-continue")]))
            head, body = await client.response()  # no 100 first
            assert head.status_code == 413 and hdr(head, b"connection") == b"close"
            assert app.seen == []


async def test_declared_oversize_413_before_reading_and_client_reads_it():
    with trio.fail_after(LIMIT):
        app = App()
        async with tcp_server(app) as (server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n")
            try:  # the client keeps sending its body for a while: the server drains it
                for _ in range(20):
                    await stream.send_all(b"z" * 10000)
            except trio.BrokenResourceError:
                pass
            responses = parse_responses(await read_to_eof(stream))
            assert [r[0] for r in responses] == [413]
            assert app.seen == []
            # the server keeps serving
            head, _ = await Client(await trio.open_tcp_stream("127.0.0.1", port)).request("GET", "/ok")
            assert head.status_code == 200
            assert server.statistics()["errors_by_status"] == {413: 1}


async def test_body_limit_for_and_exact_limit():
    with trio.fail_after(LIMIT):
        app = App()
        limit_for = lambda request: 10 if request.path == "/tiny" else 1000  # noqa: E731
        async with tcp_server(app, body_limit_for=limit_for) as (_, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            head, _ = await client.request("POST", "/tiny", b"x" * 10)
            assert head.status_code == 200
            head, _ = await client.request("POST", "/tiny", b"x" * 11)
            assert head.status_code == 413
            assert app.seen[0].body == b"x" * 10 and len(app.seen) == 1


async def test_chunked_oversize_413():
    with trio.fail_after(LIMIT):
        app = App()
        async with tcp_server(app) as (_, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(3):
                await stream.send_all(b"190\r\n" + b"c" * 400 + b"\r\n")  # 1200 > 1000 bytes
            responses = parse_responses(await read_to_eof(stream))
            assert [r[0] for r in responses] == [413] and app.seen == []
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            await client.send(h11.Request(method="POST", target="/c", headers=[
                ("Host", "t"), ("Transfer-Encoding", "chunked")]),
                h11.Data(data=b"ab"), h11.Data(data=b"cd"), h11.EndOfMessage())
            head, body = await client.response()
            assert head.status_code == 200 and body == b"POST /c [] abcd"


# -- malformed and abandoned requests ----------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
async def test_header_flood_431(split):
    with trio.fail_after(LIMIT):
        app = App()
        async with tcp_server(app) as (_, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            flood = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(100))
            if split:  # the limit is hit while the head is still incomplete (h11's bound)
                try:
                    for i in range(0, len(flood), 1000):
                        await stream.send_all(flood[i:i + 1000])
                except trio.BrokenResourceError:
                    pass
            else:  # a complete head larger than the limit in one segment
                await stream.send_all(flood + b"\r\n")
            responses = parse_responses(await read_to_eof(stream))
            assert [r[0] for r in responses] == [431] and app.seen == []


async def test_garbage_400_and_close():
    with trio.fail_after(LIMIT):
        app = App()
        async with tcp_server(app) as (server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
            responses = parse_responses(await read_to_eof(stream))
            assert [r[0] for r in responses] == [400] and app.seen == []
            assert responses[0][2] == b"malformed HTTP request\n"
            head, _ = await Client(await trio.open_tcp_stream("127.0.0.1", port)).request("GET", "/")
            assert head.status_code == 200


async def test_client_stops_mid_body_handler_not_called():
    with trio.fail_after(LIMIT):
        app = App()
        async with tcp_server(app) as (server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /half HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly-some")
            await stream.send_eof()
            assert await read_to_eof(stream) == b""  # no response: the request was abandoned
            head, _ = await Client(await trio.open_tcp_stream("127.0.0.1", port)).request("GET", "/next")
            assert head.status_code == 200
            assert [r.path for r in app.seen] == ["/next"]
            assert server.statistics()["errors_by_status"] == {}


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


# -- streaming responses ----------------------------------------------------------------------------


def streaming_app(chunks: list[bytes], finished: list[str]):
    async def handler(request: Request) -> Response:
        async def stream(send):
            try:
                for chunk in chunks:
                    await send(len(chunk).to_bytes(4, "big") + chunk)
                if request.path == "/forever":
                    await trio.sleep_forever()
            finally:
                finished.append(request.path)
        return Response(200, headers=[("Content-Type", "application/octet-stream")], stream=stream)
    return handler


async def test_streaming_response_chunked_then_keepalive():
    with trio.fail_after(LIMIT):
        finished = []
        async with tcp_server(streaming_app([b"one", b"", b"three"], finished)) as (_, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            head, body = await client.request("GET", "/watch")
            assert head.status_code == 200 and hdr(head, b"transfer-encoding") == b"chunked"
            assert body == b"\0\0\0\x03one\0\0\0\0\0\0\0\x05three"
            head, body = await client.request("GET", "/again")
            assert head.status_code == 200 and finished == ["/watch", "/again"]


async def test_streaming_response_ends_when_client_leaves():
    with trio.fail_after(LIMIT):
        finished = []
        async with tcp_server(streaming_app([b"x"], finished)) as (server, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            await client.send(h11.Request(method="GET", target="/forever", headers=[("Host", "t")]),
                              h11.EndOfMessage())
            assert isinstance(await client.next_event(), h11.Response)
            await client.stream.aclose()
            await settled(lambda: finished == ["/forever"])


async def test_shutdown_ends_streaming_response_cleanly(autojump_clock):
    with trio.fail_after(LIMIT * 10):
        finished = []
        server, listener = HTTPServer(streaming_app([b"x"], finished), None, SMALL), MemoryListener()
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [listener])
            client = Client(await listener.connect())
            await client.send(h11.Request(method="GET", target="/forever", headers=[("Host", "t")]),
                              h11.EndOfMessage())
            assert isinstance(await client.next_event(), h11.Response)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            server.shutdown()
        assert trio.current_time() == start and finished == ["/forever"]
        assert isinstance(await client.next_event(), h11.Data)
        assert isinstance(await client.next_event(), h11.EndOfMessage)  # a complete chunked body


# -- WebSocket on the same port ---------------------------------------------------------------------


def ws_app(log: list):
    async def ws_handler(request: Request, upgrade) -> None:
        if request.header("authorization") == "explicit":
            await upgrade.reject(400, b"no such queue")
            return
        if request.header("authorization") != "ok":
            log.append("rejected")
            raise errors.Unauthorized("bad token")
        ws = await upgrade.accept()
        log.append(("accepted", request.path, request.query))
        try:
            while True:
                message = await ws.get_message()
                await ws.send_message(b"echo:" + message)
        except trio_websocket.ConnectionClosed:
            log.append("closed")
            raise
    return ws_handler


async def test_websocket_binary_echo_ping_and_plain_http_on_same_port():
    with trio.fail_after(LIMIT):
        seen = []
        async with tcp_server(App(), ws_app(seen)) as (server, port):
            url = f"ws://127.0.0.1:{port}/api/predict/svc?_watch_=true&_window_=5"
            async with trio_websocket.open_websocket_url(url, extra_headers=[(b"Authorization", b"ok")]) as ws:
                await ws.send_message(b"\x00\x01")
                assert await ws.get_message() == b"echo:\x00\x01"
                with trio.fail_after(2):
                    await ws.ping(b"ping")  # answered by trio-websocket
                assert server.statistics()["websockets_open"] == 1
                head, _ = await Client(await trio.open_tcp_stream("127.0.0.1", port)).request("GET", "/plain")
                assert head.status_code == 200
            assert seen[0] == ("accepted", "/api/predict/svc", (("_watch_", "true"), ("_window_", "5")))
            await settled(lambda: server.statistics()["websockets_open"] == 0)
            assert seen[-1] == "closed"


async def test_websocket_handshake_rejected_401():
    with trio.fail_after(LIMIT):
        seen = []
        async with tcp_server(App(), ws_app(seen)) as (_, port):
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/x"):
                    pass
            assert rejected.value.status_code == 401 and rejected.value.body == b"bad token\n"
            assert seen == ["rejected"]
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with trio_websocket.open_websocket_url(
                        f"ws://127.0.0.1:{port}/x", extra_headers=[(b"Authorization", b"explicit")]):
                    pass
            assert rejected.value.status_code == 400 and rejected.value.body == b"no such queue"


async def test_shutdown_closes_websocket_with_1001():
    with trio.fail_after(LIMIT):
        seen = []
        server = HTTPServer(App(), ws_app(seen), SMALL)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            async with trio_websocket.open_websocket_url(
                    f"ws://127.0.0.1:{port}/w", extra_headers=[(b"Authorization", b"ok")]) as ws:
                server.shutdown()
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1001
        assert server.statistics()["websockets_open"] == 0


async def test_websocket_abrupt_eof_ends_handler_with_connection_closed():
    with trio.fail_after(LIMIT):
        seen = []
        async with tcp_server(App(), ws_app(seen)) as (server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            frame = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT).send(
                wsproto.events.BytesMessage(data=b"hi"))
            handshake = (b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                         b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         b"Authorization: ok\r\n\r\n")
            for i in range(len(handshake)):  # the handshake, one byte at a time
                await stream.send_all(handshake[i:i + 1])
            data = b""
            while not data.endswith(b"\r\n\r\n"):
                data += await stream.receive_some(1000)
            assert data.startswith(b"HTTP/1.1 101 ")
            await stream.send_all(frame)  # RFC 6455 4.1: frames only after the 101
            data = b""
            while len(data) < 9:
                data += await stream.receive_some(1000)
            assert data == b"\x82\x07echo:hi"
            await stream.aclose()  # no close frame: the TCP connection just drops
            await settled(lambda: seen[-1:] == ["closed"] and server.statistics()["websockets_open"] == 0)


async def test_websocket_upgrade_after_keepalive_request():
    with trio.fail_after(LIMIT):
        seen = []
        async with tcp_server(App(), ws_app(seen)) as (_, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /first HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok")
            data = b""
            while not data.endswith(b"POST /first [] ok"):
                data += await stream.receive_some(1000)
            async with trio.open_nursery() as nursery:  # the upgrade is the second request
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, "t", "/second", extra_headers=[(b"Authorization", b"ok")])
                await ws.send_message(b"x")
                assert await ws.get_message() == b"echo:x"
                await ws.aclose()
            assert seen[0][:2] == ("accepted", "/second")


async def test_websocket_message_size_bounded():
    with trio.fail_after(LIMIT):
        async with tcp_server(App(), ws_app([])) as (_, port):
            async with trio_websocket.open_websocket_url(
                    f"ws://127.0.0.1:{port}/w", extra_headers=[(b"Authorization", b"ok")]) as ws:
                await ws.send_message(b"m" * (SMALL.ws_max_message_size + 1))
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1009


async def test_websocket_bad_handshake_400():
    with trio.fail_after(LIMIT):
        async with tcp_server(App(), ws_app([])) as (_, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                                  b"Sec-WebSocket-Version: 8\r\n\r\n")
            (status, headers, _), = parse_responses(await read_to_eof(stream))
            assert status == 400 and headers[b"sec-websocket-version"] == b"13"


# -- the replay stream ------------------------------------------------------------------------------


async def test_replay_stream_is_a_stream():
    with trio.fail_after(LIMIT):
        async def pair():
            a, b = trio.testing.memory_stream_pair()
            return ReplayStream(a), ReplayStream(b)
        await trio.testing.check_two_way_stream(pair, None)


async def test_replay_stream_replays_prefix_first():
    with trio.fail_after(LIMIT):
        a, b = trio.testing.memory_stream_pair()
        replay = ReplayStream(b, b"head")
        await a.send_all(b"tail")
        assert await replay.receive_some(3) == b"hea"
        assert await replay.receive_some() == b"d"
        assert await replay.receive_some() == b"tail"
        with pytest.raises(ValueError):
            await replay.receive_some(0)
        await replay.send_all(b"back")
        assert await a.receive_some() == b"back"
        await ReplayStream(a, b"left").aclose()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_binary_frame_is_what_wsproto_sends_for_a_server_message(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    server = wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER)
    assert binary_frame(payload) == server.send(wsproto.events.BytesMessage(data=payload))


async def test_replay_stream_serializes_writers_and_notes_close_frames():
    with trio.fail_after(LIMIT):
        writes: list[bytes] = []
        out = trio.testing.MemorySendStream()

        async def record_write():
            await trio.lowlevel.checkpoint()   # a write that yields: a second writer must wait
            writes.append(out.get_data_nowait())
        out.send_all_hook = record_write
        replay = ReplayStream(trio.StapledStream(out, trio.testing.MemoryReceiveStream()))
        await replay.send_all(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Extensions: x\r\n\r\n")
        assert replay.extensions and not replay.close_frame_sent   # the reply's "H" is no close opcode
        replay.close_reason = lambda: None                           # accepted
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay.send_all, b"\x82\x01a")
            nursery.start_soon(replay.send_all, b"\x8a\x00")       # a pong from another task
        assert sorted(writes[1:]) == [b"\x82\x01a", b"\x8a\x00"] and not replay.close_frame_sent
        await replay.send_all(b"\x88\x02\x03\xe8")
        assert replay.close_frame_sent


def test_response_heads_are_cached_unless_they_carry_a_request_id():
    """Repeating heads (every commit's 200) are built and validated by h11 once; a put's head,
    unique by its request id, is not cached, so puts cannot evict the heads that do repeat."""
    from qserve.server.edge import HeadCache
    heads = HeadCache()   # each server owns one (no module-level state)
    ok = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "2")]
    head = heads.response(200, ok)
    for i in range(200):
        put = heads.response(200, [*ok, ("X-Eas-Queueservice-Request-Id", f"rid-{i}")])
        assert put.headers[-1] == (b"x-eas-queueservice-request-id", f"rid-{i}".encode())
    assert heads.response(200, ok) is head
    assert HeadCache().response(200, ok) is not head
