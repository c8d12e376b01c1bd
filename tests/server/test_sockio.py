"""`qserve.server.sockio` over real loopback sockets. `send_all`: the whole write, followed by a
scheduler pass as trio's own, or without one (``then_pass=False``) when it goes out at once; trio's
own semantics otherwise (a cancelled task writes nothing, a write larger than the socket takes
waits for the reader, errors are stream errors).
`receive_some`: trio's checkpoints (a pass after bytes that were there at once, a cancelled task
reads nothing), end of stream as b""."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import qserve.server.writing as writing
from qserve.server.sockio import receive_some, send_all

from ..helpers.http_edge import App, tcp_server
from ..helpers.peers import Client

LIMIT = 10


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream, trio.SocketListener]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    return server, client, listener


async def _read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(65536)
        assert chunk, "EOF before all bytes came"
        got += chunk
    return bytes(got)


async def test_a_write_that_goes_out_at_once_takes_no_scheduler_pass():
    with trio.fail_after(LIMIT):
        server, client, listener = await _pair()
        ran = []
        async with trio.open_nursery() as nursery:
            # runnable from now on: a scheduler pass runs it (trio orders a batch at random, so
            # twenty writes that each took a pass would have let it run, but for 2**-20)
            nursery.start_soon(_note, ran)
            for _ in range(20):
                await send_all(server, b"HTTP/1.1 200 OK\r\n\r\n", then_pass=False)
            assert ran == []
            await trio.testing.wait_all_tasks_blocked()
            assert ran == [True]
        assert await _read_exactly(client, 20 * 19) == b"HTTP/1.1 200 OK\r\n\r\n" * 20
        for s in (server, client, listener):
            await s.aclose()


async def test_a_write_with_a_pass_lets_the_others_run():
    with trio.fail_after(LIMIT):
        server, client, listener = await _pair()
        ran = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_note, ran)
            for _ in range(20):   # each write is followed by a pass: the other task ran, but for 2**-20
                await send_all(server, b"HTTP/1.1 200 OK\r\n\r\n")
            assert ran == [True]
        assert await _read_exactly(client, 20 * 19) == b"HTTP/1.1 200 OK\r\n\r\n" * 20
        for s in (server, client, listener):
            await s.aclose()


async def _note(ran: list) -> None:
    ran.append(True)


async def test_a_cancelled_task_writes_nothing():
    with trio.fail_after(LIMIT):
        server, client, listener = await _pair()
        with trio.CancelScope() as scope:
            scope.cancel()
            await send_all(server, b"never", then_pass=False)
            pytest.fail("not cancelled")
        await server.send_all(b"after")
        assert await _read_exactly(client, 5) == b"after"
        for s in (server, client, listener):
            await s.aclose()


async def test_a_write_larger_than_the_socket_takes_waits_for_the_reader():
    with trio.fail_after(LIMIT):
        server, client, listener = await _pair()
        data = bytes(range(256)) * (32 * 1024)     # 8 MiB: more than loopback's buffers hold
        async with trio.open_nursery() as nursery:
            got = []

            async def read() -> None:
                got.append(await _read_exactly(client, len(data)))
            nursery.start_soon(read)
            await send_all(server, data, then_pass=False)
        assert got == [data]
        for s in (server, client, listener):
            await s.aclose()


async def test_errors_are_stream_errors():
    with trio.fail_after(LIMIT):
        server, client, listener = await _pair()
        await client.aclose()                      # the peer is gone: a write ends in EPIPE/ECONNRESET
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):                   # the first write may still be accepted
                await send_all(server, b"x" * 65536)
                await trio.lowlevel.checkpoint()
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await send_all(server, b"x")
        await listener.aclose()


async def test_another_stream_goes_through_its_own_send_all():
    with trio.fail_after(LIMIT):
        left, right = trio.testing.memory_stream_pair()
        await send_all(left, b"through memory")
        assert await right.receive_some(100) == b"through memory"


async def test_receive_some_yields_after_bytes_that_were_there():
    with trio.fail_after(LIMIT):
        server, client, listener = await _pair()
        await client.send_all(b"x" * 20)
        await trio.testing.wait_all_tasks_blocked()
        ran = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_note, ran)
            # twenty reads of bytes already there, each followed by a pass (as a pipelining client's
            # requests are): the other task ran during them, but for 2**-20
            assert [await receive_some(server, 1) for _ in range(20)] == [b"x"] * 20
            assert ran == [True]

            async def later() -> None:
                await trio.testing.wait_all_tasks_blocked()
                await client.send_all(b"waited for")
            nursery.start_soon(later)
            assert await receive_some(server, 100) == b"waited for"
        with trio.CancelScope() as scope:
            await client.send_all(b"left")
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await receive_some(server, 100)
            pytest.fail("not cancelled")
        assert await receive_some(server, 100) == b"left"   # the cancelled call read nothing
        await client.aclose()
        assert await receive_some(server, 100) == b""
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await receive_some(server, 100)
        await listener.aclose()


async def test_the_edge_skips_the_pass_only_for_its_only_connection(monkeypatch):
    """The edge's rule (`Writing._write`): a response's last write skips the pass while the
    connection is the server's only one; with a second connection open, it takes the pass (which
    lets the client's next request arrive before the read)."""
    passes = []

    async def counting(stream, data, *, then_pass=True):
        passes.append(then_pass)
        await send_all(stream, data, then_pass=then_pass)
    monkeypatch.setattr(writing, "send_all", counting)
    with trio.fail_after(LIMIT):
        async with tcp_server(App()) as (_, port):
            alone = Client(await trio.open_tcp_stream("127.0.0.1", port))
            for i in range(3):
                head, body = await alone.request("POST", f"/alone{i}", b"x")
                assert head.status_code == 200 and body == f"POST /alone{i} [] x".encode()
            assert passes == [False] * 3
            other = Client(await trio.open_tcp_stream("127.0.0.1", port))
            head, _ = await other.request("GET", "/other")
            assert head.status_code == 200
            for i in range(3):
                head, body = await alone.request("POST", f"/shared{i}", b"y")
                assert head.status_code == 200 and body == f"POST /shared{i} [] y".encode()
            assert passes == [False] * 3 + [True] * 4   # two connections open: a pass each time
            await other.stream.aclose()
            await alone.stream.aclose()
