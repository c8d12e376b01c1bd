"""The edge's long-lived exchanges (`qserve.server.http`, `qserve.server.websocket`): streaming
(chunked) responses and how they end, WebSocket on the same port as HTTP (echo, ping, refused and bad
handshakes, 1001 on shutdown, abrupt EOF, message size bound), and the replay stream and server
frames the WebSocket side is built on.

Peers are h11 client connections, raw bytes, and trio-websocket clients, over a real loopback socket
(`serve_tcp` on 127.0.0.1, port 0), or over memory streams through a `MemoryListener` when a test
waits for a timeout (`autojump_clock` then owns time and nothing sleeps for real). Every test runs
under `trio.fail_after`.
"""

from __future__ import annotations

from http import HTTPStatus

import h11
import pytest
import trio
import trio.testing
import trio_websocket
import wsproto.connection
import wsproto.events

from qserve.core import errors
from qserve.server.http import HTTPServer
from qserve.server.types import Request
from qserve.server.websocket import ReplayStream, binary_frame

from ..helpers.http_edge import LIMIT, SMALL, App, hdr, parse_responses, settled, streaming_app, tcp_server
from ..helpers.peers import Client, MemoryListener, read_to_eof


# -- streaming responses ----------------------------------------------------------------------------


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


async def test_an_accept_cut_off_mid_handshake_closes_the_connection_without_an_internal_error(caplog):
    """The handler's scope cancelled while `accept` runs (a watch session cancelled as it attaches):
    the handshake may be half-sent, so the connection just closes; nothing is logged as failed."""
    with trio.fail_after(LIMIT):
        handled = []

        async def ws_handler(request: Request, upgrade) -> None:
            with trio.CancelScope() as scope:
                scope.cancel()
                await upgrade.accept()
            handled.append(upgrade.state)

        async with tcp_server(App(), ws_handler) as (server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            assert await read_to_eof(stream) == b""   # no 101 went out: closed, not answered
            await settled(lambda: server.statistics()["websockets_open"] == 0)
            head, _ = await Client(await trio.open_tcp_stream("127.0.0.1", port)).request("GET", "/plain")
            assert head.status_code == 200   # the server goes on
        assert handled == ["broken"]
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


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


_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}


def _h11_wire(status: int, headers: list[tuple[str, str]], body: bytes, request: bytes = b"GET") -> bytes:
    """What h11 writes for this answer to a keep-alive HTTP/1.1 request."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event(), conn.next_event()
    head = h11.Response(status_code=status, headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in
                                                     [*headers, ("Content-Length", str(len(body)))]],
                        reason=_PHRASES.get(status, b""))
    return b"".join([*conn.send_with_data_passthrough(head), *conn.send_with_data_passthrough(h11.Data(data=body)),
                     *conn.send_with_data_passthrough(h11.EndOfMessage())])


def test_response_heads_are_cached_and_a_put_head_keeps_only_its_template():
    """Repeating heads (every commit's 200) are built by h11 once and kept as bytes; a put's head,
    unique by its request id, is kept as the bytes around the id, so puts cannot evict the heads
    that do repeat."""
    from qserve.server.heads import HeadCache
    heads = HeadCache(size=4)   # each server owns one (no module-level state)
    ok = [("Content-Type", "text/plain; charset=utf-8")]
    head = heads.wire(200, ok)
    for i in range(200):
        put = heads.wire(200, [*ok, ("X-Eas-Queueservice-Request-Id", f"rid-{i}")])
        assert put.endswith(f"X-Eas-Queueservice-Request-Id: rid-{i}\r\n".encode())
    assert heads.wire(200, ok) is head
    assert HeadCache().wire(200, ok) is not head


@pytest.mark.parametrize("status, headers, body", [
    (200, [("Content-Type", "text/plain; charset=utf-8")], b"OK"),
    (200, [("Content-Type", "application/json"), ("Cache-Control", "no-cache")], b"{}"),
    (200, [], b""),
    (404, [("Content-Type", "text/plain; charset=utf-8")], b"no such queue\n"),
    (599, [("X-Odd", "v")], b"x"),                     # no reason phrase
    (200, [("x-lower", "a"), ("X-MiXeD", "b c")], b"y"),  # names as given
])
def test_a_cached_head_is_the_head_h11_writes(status, headers, body):
    """The edge writes the usual answer itself (`heads`): byte for byte what h11 would send."""
    from qserve.server.heads import HeadCache
    heads = HeadCache()
    for _ in range(2):   # built, then from the cache
        mine = heads.wire(status, headers) + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        assert mine == _h11_wire(status, headers, body)


def test_a_put_head_from_the_cache_is_the_head_h11_builds_and_checks_its_request_id():
    """A put's head reuses the validated other headers and checks only its request id: the head
    is the one h11 writes, a value h11 refuses is still refused, a valid one outside the fast
    path's visible ASCII (a space, latin-1) still goes out; heads whose framing or connection
    header is the edge's, and bodiless statuses, are left to h11 (None)."""
    from qserve.server.heads import HeadCache
    heads = HeadCache()
    base = [("Content-Type", "text/plain; charset=utf-8")]
    for rid in ("r1", "r2", "0f8fad5b-d9cb-469f-a165-70867728950e", "with space", "caf\u00e9"):
        for headers in ([*base, ("X-Eas-Queueservice-Request-Id", rid)],
                        [*base, ("X-Eas-Queueservice-Request-Id", rid), ("X-Qserve-Duplicate", "1")]):
            assert heads.wire(200, headers) + b"Content-Length: 2\r\n\r\n17" == _h11_wire(200, headers, b"17")
    for bad in ("a\r\nX-Injected: 1", "trailing ", "\x00"):
        with pytest.raises(h11.LocalProtocolError):
            heads.wire(200, [*base, ("X-Eas-Queueservice-Request-Id", bad)])
    for owned in (("Connection", "close"), ("Content-Length", "2"), ("transfer-encoding", "chunked")):
        assert heads.wire(200, [*base, owned]) is None
        assert heads.wire(200, [*base, owned, ("X-Eas-Queueservice-Request-Id", "r")]) is None
    assert heads.wire(204, base) is None and heads.wire(304, []) is None
