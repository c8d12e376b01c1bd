"""Shutdown of `qserve serve` and its start-up failures: what clients and the log see.

In-process servers (`Server` over a `MemoryListener`, autojump_clock where a timeout matters; real
time where an fsync has to be held, bounded by `trio.fail_after`) pin each drain behaviour: a
long-poll answered 204 at once, watchers closed with 1001, an in-flight durable put answered 200
and on disk, idle keep-alive connections closed, the drain deadline cutting a slow client, abort,
an auto-commit batch in hand delivered, and the start-up refusals. Real `qserve serve` processes
pin the signals in tests/process/test_shutdown.py.
"""

from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager

import h11
import pytest
import trio
import trio.testing
import trio_websocket

from qserve import storage
from qserve.config import Config
from qserve.core.events import QueueRef
from qserve.backends.local.queues import queue_dir
from qserve.server.server import Server
from qserve.server.startup import StartupError
from qserve.server.websocket import ReplayStream, binary_frame

from ..helpers.inproc import TOKEN, Harness, next_frame
from ..helpers.queue_files import SwitchIO, contents, damaged_queue, reopen
from ..helpers.peers import Client, MemoryListener, read_to_eof

REAL = 20    # seconds (real time) for a test that holds an fsync or runs a process
VIRTUAL = 120  # seconds (trio's clock) for the autojump tests


@asynccontextmanager
async def serving(tmp_path, *, fileio=None, **settings):
    """A `Server` over a `MemoryListener`; yields (harness, done), ``done["at"]`` being the trio
    time `Server.run` returned."""
    settings.setdefault("data_dir", tmp_path / "data")
    settings.setdefault("token", TOKEN)
    settings.setdefault("fsync", "never")
    listener = MemoryListener()
    server = Server(Config(**settings), listeners=[listener], fileio=fileio)
    done: dict[str, float] = {}

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await server.run(task_status=task_status)
        done["at"] = trio.current_time()

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        try:
            yield Harness(server, listener), done
        finally:
            server.shutdown()


def messages(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


def watch_request(service: str, user: str) -> h11.Request:
    return h11.Request(method="GET", target=f"/api/predict/{service}?_watch_=true", headers=[
        ("Host", "t"), ("Authorization", TOKEN), ("X-EAS-QueueService-Gid", "g"),
        ("X-EAS-QueueService-Uid", user)])


# -- draining ---------------------------------------------------------------------------------------


async def test_long_poll_answers_204_at_shutdown_not_at_its_timeout(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="qserve")
    with trio.fail_after(VIRTUAL):
        result = {}
        async with serving(tmp_path) as (srv, done):
            c = await srv.client("lp")

            async def long_poll():
                result["answer"] = await c.call("GET", "_timeout_=20s&_raw_=false")
                result["at"] = trio.current_time()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll)
                await trio.sleep(3)   # virtual: the get is parked, 17 s before its timeout
                assert not result
                t0 = trio.current_time()
                srv.server.shutdown()
        assert result == {"answer": (204, b""), "at": t0}
        assert done["at"] == t0
    assert messages(caplog, "draining") == ["draining 1 connection (up to 10 s)"]
    assert messages(caplog, "stopped") == ["stopped; all queues synced and closed"]


async def test_a_get_arriving_while_draining_does_not_wait(tmp_path, autojump_clock):
    with trio.fail_after(VIRTUAL):
        async with serving(tmp_path) as (srv, _):
            c = await srv.client("lp")
            assert (await c.call("GET", "_timeout_=0"))[0] == 204   # the connection is open, idle
            slow = await srv.client("lp")   # sends its request head and body in two parts
            head = (b"GET /api/predict/lp?_timeout_=20s HTTP/1.1\r\nHost: t\r\nAuthorization: tok\r\n"
                    b"Content-Length: 2\r\n\r\n")
            await slow.stream.send_all(head + b"x")
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            srv.server.shutdown()
            await slow.stream.send_all(b"y")   # the request completes during the drain
            status = (await slow.response())[0].status_code
            assert (status, trio.current_time()) == (204, t0)


async def test_watchers_get_1001_and_streamed_watches_end(tmp_path, autojump_clock):
    with trio.fail_after(VIRTUAL):
        async with serving(tmp_path) as (srv, done):
            async with trio.open_nursery() as nursery:
                ws = await srv.watch(nursery, "w", "_window_=2", user="ws")
                streamed = Client(await srv.listener.connect())
                await streamed.send(watch_request("w", "http"), h11.EndOfMessage())
                assert (await streamed.next_event()).status_code == 200
                await trio.testing.wait_all_tasks_blocked()
                t0 = trio.current_time()
                srv.server.shutdown()
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1001
                assert isinstance(await streamed.next_event(), h11.EndOfMessage)   # a complete body
                assert await read_to_eof(streamed.stream) == b""
            assert srv.server.app.watch.statistics() == {"sessions": 0}
        assert done["at"] == t0


async def test_idle_keepalive_connections_close_at_once(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="qserve")
    with trio.fail_after(VIRTUAL):
        async with serving(tmp_path) as (srv, done):
            idle = [await srv.client("ka") for _ in range(3)]
            for c in idle:
                assert (await c.call("POST", "", b"x"))[0] == 200
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            srv.server.shutdown()
            for c in idle:
                assert await c.stream.receive_some(100) == b""
            assert trio.current_time() == t0
        assert done["at"] == t0
    assert messages(caplog, "draining") == ["draining 3 connections (up to 10 s)"]


async def test_drain_deadline_cuts_a_slow_client(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="qserve")
    with trio.fail_after(VIRTUAL):
        async with serving(tmp_path, shutdown_timeout=2.5) as (srv, done):
            slow = await srv.client("slow")   # 10 of 100 body bytes: in flight, within request_timeout
            await slow.stream.send_all(b"POST /api/predict/slow HTTP/1.1\r\nHost: t\r\nAuthorization: tok\r\n"
                                       b"Content-Length: 100\r\n\r\n" + b"x" * 10)
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            srv.server.shutdown()
            assert await read_to_eof(slow.stream) == b""   # cut: no response
            assert trio.current_time() - t0 == pytest.approx(2.5)
        assert done["at"] - t0 == pytest.approx(2.5)
    assert messages(caplog, "draining") == ["draining 1 connection (up to 2.5 s)"]
    assert messages(caplog, "cutting") == ["shutdown timeout (2.5 s) reached: cutting 1 connection still open"]


async def test_abort_during_the_drain_cuts_at_once(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="qserve")
    with trio.fail_after(VIRTUAL):
        async with serving(tmp_path, shutdown_timeout=60) as (srv, done):
            slow = await srv.client("slow")
            await slow.stream.send_all(b"POST /api/predict/slow HTTP/1.1\r\nHost: t\r\nAuthorization: tok\r\n"
                                       b"Content-Length: 100\r\n\r\n")
            await trio.testing.wait_all_tasks_blocked()
            srv.server.shutdown()
            await trio.sleep(1)
            t1 = trio.current_time()
            srv.server.abort()
            assert await read_to_eof(slow.stream) == b""
            assert trio.current_time() == t1
        assert done["at"] == t1
    assert len(messages(caplog, "draining")) == 1 and not messages(caplog, "cutting")
    assert messages(caplog, "stopped") == ["stopped; all queues synced and closed"]


async def test_in_flight_durable_put_is_answered_and_on_disk(tmp_path):
    io = SwitchIO()
    with trio.fail_after(REAL):
        result = {}
        async with serving(tmp_path, fileio=io, fsync="always") as (srv, done):
            c = await srv.client("dur")
            assert await c.call("POST", "", b"first") == (200, b"1")
            # the flusher's round, which the gate can hold (a lone client's put would fsync in its
            # own task, on the trio thread: `GroupCommit._round_here`)
            srv.server.queues.clients = lambda: 2
            io.hold()   # the next fsync round waits for release()

            async def put():
                result["put"] = await c.call("POST", "", b"in flight")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(put)
                await trio.to_thread.run_sync(io.gated.wait, 5)
                assert io.gated.is_set(), "the put's fsync never started"
                srv.server.shutdown()
                await trio.testing.wait_all_tasks_blocked()
                assert not result and not done   # the drain waits for the put
                with pytest.raises(trio.BrokenResourceError):
                    await srv.listener.connect()  # no longer accepting
                io.release()
        assert result["put"] == (200, b"2")
    qlog = reopen(tmp_path, "dur")
    try:
        assert contents(qlog) == [(1, b"first"), (2, b"in flight")]
    finally:
        qlog.close()


async def test_auto_commit_batch_in_hand_is_delivered_before_the_1001(tmp_path):
    """The watcher's batch is deleted (auto-commit) and waits for that delete's fsync when the
    drain begins: it cannot go back to the queue, so it still goes out, then the close."""
    io = SwitchIO()
    with trio.fail_after(REAL):
        async with serving(tmp_path, fileio=io, fsync="always") as (srv, _):
            async with trio.open_nursery() as nursery:
                ws = await srv.watch(nursery, "ac", "_window_=5&_auto_commit_=true", user="u")
                queue = await srv.server.queues.get(QueueRef("ac"))
                await trio.testing.wait_all_tasks_blocked()
                io.hold()
                c = await srv.client("ac")
                nursery.start_soon(c.call, "POST", "", b"handed out")
                await trio.to_thread.run_sync(io.gated.wait, 5)
                await trio.testing.wait_all_tasks_blocked()
                assert queue.log.length == 0   # taken and deleted by the watcher, not yet sent
                srv.server.shutdown()
                await trio.testing.wait_all_tasks_blocked()
                io.release()
                assert (await next_frame(ws)).data == b"handed out"
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1001
    qlog = reopen(tmp_path, "ac")
    try:
        assert qlog.length == 0 and qlog.next_index == 2
    finally:
        qlog.close()


# -- start-up ---------------------------------------------------------------------------------------


def no_listening_or_stopped_line(caplog) -> bool:
    return not messages(caplog, "listening on") and not messages(caplog, "stopped; all queues")


async def test_a_named_queue_with_damaged_data_stops_the_start(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qserve")
    damaged_queue(tmp_path / "data", "bad")
    server = Server(Config(data_dir=tmp_path / "data", token=TOKEN, fsync="never", queues=("bad",)),
                    listeners=[MemoryListener()])
    with trio.fail_after(REAL), pytest.raises(StartupError) as failed:
        await server.run()
    message = str(failed.value)
    where = queue_dir(tmp_path / "data", QueueRef("bad"))
    segment = sorted(where.glob("*.seg"))[0]
    assert message == (f"queue bad cannot be opened: damage in {segment} at offset 0: crc mismatch; "
                       f"repair it with: qserve log repair {where}")
    assert no_listening_or_stopped_line(caplog)


async def test_a_named_queue_held_by_another_process_stops_the_start(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qserve")
    qdir = queue_dir(tmp_path / "data", QueueRef("held", sink=True))
    qdir.mkdir(parents=True)
    lock = storage.DirLock.acquire(qdir)
    try:
        server = Server(Config(data_dir=tmp_path / "data", token=TOKEN, fsync="never", root_service="held"),
                        listeners=[MemoryListener()])
        with trio.fail_after(REAL), pytest.raises(StartupError) as failed:
            await server.run()
    finally:
        lock.release()
    assert re.fullmatch(r"queue held/sink cannot be opened: \S+ is in use by process \d+ \(another qserve "
                        r"serve, or a qserve log repair running now\)", str(failed.value)), str(failed.value)
    assert no_listening_or_stopped_line(caplog)


async def test_a_damaged_queue_nobody_named_does_not_stop_the_start(tmp_path):
    damaged_queue(tmp_path / "data", "other")   # opened (and fenced) at start: in a thread, real time
    with trio.fail_after(REAL):
        async with serving(tmp_path) as (srv, _):
            c = await srv.client("fine")
            assert (await c.call("POST", "", b"x"))[0] == 200


async def test_shutdown_before_listening_stops_the_start_quietly(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qserve")
    server = Server(Config(data_dir=tmp_path / "data", token=TOKEN, fsync="never", queues=("a", "b")),
                    listeners=[MemoryListener()])
    server.shutdown()
    with trio.fail_after(REAL):
        await server.run()
    assert no_listening_or_stopped_line(caplog)
    assert messages(caplog, "stopped") == ["stopped before listening; the queues opened so far are synced "
                                           "and closed"]
    assert server.port is None and server.http is None


async def test_given_listeners_log_their_real_port(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qserve")
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen()
    bound = sock.getsockname()[1]
    server = Server(Config(data_dir=tmp_path / "data", token=TOKEN, fsync="never", port=0),
                    listeners=[trio.SocketListener(sock)])
    with trio.fail_after(REAL):
        async with trio.open_nursery() as nursery:
            assert await nursery.start(server.run) == bound
            head, body = await Client(await trio.open_tcp_stream("127.0.0.1", bound)).request("GET", "/healthz")
            assert (head.status_code, body) == (200, b"OK")
            server.shutdown()
    [line] = messages(caplog, "listening")
    assert line.startswith(f"qserve listening on http://127.0.0.1:{bound} (data in ")


async def test_a_websocket_send_cut_inside_a_frame_lets_nothing_follow_it():
    """Shutdown cancels a watch whose write is blocked on a client that does not read: the client
    holds part of a frame, so the close frame must not follow (it would land inside that frame)."""
    with trio.fail_after(REAL):
        server_side, client_side = trio.testing.lockstep_stream_pair()   # a write waits for the reader
        replay = ReplayStream(server_side)
        replay.close_reason = lambda: None   # the handshake was accepted
        with trio.CancelScope() as before:
            before.cancel()
            await replay.send_all(binary_frame(b"never sent"))   # cancelled before any byte: harmless
        assert before.cancelled_caught
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay.send_all, binary_frame(b"whole"))
            assert await client_side.receive_some(100) == binary_frame(b"whole")
        frame = binary_frame(b"x" * 100)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay.send_all, frame)
            assert await client_side.receive_some(10) == frame[:10]   # the client reads no further
            nursery.cancel_scope.cancel()
        with pytest.raises(trio.BrokenResourceError):
            await replay.send_all(b"\x88\x02\x03\xe9")   # the 1001 close frame
        await replay.aclose()
        rest = await read_to_eof(client_side)   # what the cut send had handed over, then nothing
        assert frame[10:].startswith(bytes(rest))
