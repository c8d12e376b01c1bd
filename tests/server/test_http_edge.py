"""The HTTP/1.1 edge (`qserve.server.http`), talked to by real peers: request parsing fed whole,
bytewise and pipelined, keep-alive, HEAD, one write per response, handler errors, 100-continue, body
limits, header floods, garbage and abandoned requests. Timeouts, shutdown and connection limits are
in test_http_edge_timeouts.py; streaming responses, WebSocket and the replay stream in
test_http_edge_streams.py.

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

from qserve.server.types import Request, Response

from ..helpers.http_edge import LIMIT, App, hdr, memory_server, parse_responses, streaming_app, tcp_server
from ..helpers.peers import Client, MemoryListener, read_to_eof


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


@pytest.mark.parametrize("closing", [
    b"GET /c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"GET /c HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\nConnection: Foo, CLOSE\r\n\r\n",
    b"GET /c HTTP/1.0\r\n\r\n",
])
async def test_the_request_that_ends_the_connection_is_answered_so_and_the_ones_before_are_not(closing):
    """Answers written by the edge itself (`heads`) and by h11 follow h11's keep-alive rule: a
    pipelined keep-alive request is answered without ``Connection: close`` and the next one is
    served; a request with ``close`` among its Connection tokens, or an HTTP/1.0 one, is answered
    with ``Connection: close`` and the connection ends; bytes after it are not served."""
    with trio.fail_after(LIMIT):
        app = App()
        async with tcp_server(app) as (_, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            keep = b"POST /k HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nab"
            await stream.send_all(keep + keep + closing + keep)
            responses = parse_responses(await read_to_eof(stream))
        assert [(r[0], r[1].get(b"connection")) for r in responses] == [(200, None), (200, None), (200, b"close")]
        assert [r.path for r in app.seen] == ["/k", "/k", "/c"]


async def test_keepalive_content_length_and_204():
    with trio.fail_after(LIMIT):
        async with tcp_server(App()) as (server, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            for i in range(5):   # answers the edge writes itself and (/framed) ones h11 sends
                path = f"/n{i}" if i % 2 else f"/framed{i}"
                head, body = await client.request("POST", path, b"x" * i)
                assert head.status_code == 200
                assert hdr(head, b"content-length") == str(len(body)).encode()  # the app's 999 is replaced
                assert body == f"POST {path} [] {'x' * i}".encode()
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
