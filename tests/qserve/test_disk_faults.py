"""Disk faults under a running server: ENOSPC, fsync failures and short writes, injected through
`storage.FileIO`, answered over HTTP and WebSocket.

The guarantees pinned here (README "Errors", FORMAT.md "Write and fsync faults", PROTOCOL.md
"Durability"): a full disk is a 507 and an I/O error a 503, each with a one-line reason; a failed
request stores nothing, not even part of a record; reads keep working during the fault; writes work
again once it clears, with the next index (a rolled-back index is never handed out again); a write
whose fsync failed is never answered 200, and an auto-committed frame goes out only once its delete
is durable.

These servers run with fsync="always" and so on real time (an fsync runs in a worker thread, which
trio's autojump clock would skip past); every test is bounded by `trio.fail_after`.
"""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest
import trio
import trio_websocket

import storage
from qserve.events import QueueRef
from qserve.queues import queue_dir
from tools._logscan import find_queues, verify_queue

from .inproc import next_frame, running_server
from .test_http_edge import Client

LIMIT = 20  # seconds (real time) for any test


class SwitchIO(storage.FileIO):
    """A FileIO with fault switches, flipped by the test while the server runs.

    - `full`: every write fails with ENOSPC (nothing written);
    - `fail_fsync`: every fsync fails with EIO;
    - `short`: the next write writes half its bytes and reports the short count (one-shot);
    - `gate`: when set, an fsync made off the trio thread (the group-commit flusher) waits for it
      to be released (`release()`); `gated` is set once one is waiting.
    """

    def __init__(self) -> None:
        self.full = False
        self.fail_fsync = False
        self.short = False
        self.writes = 0
        self.fsyncs = 0
        self.gate: threading.Event | None = None
        self.gated = threading.Event()

    def write(self, fd, data):
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.writes += 1
        if self.short:
            self.short = False
            return os.write(fd, bytes(data[: len(data) // 2]))
        return super().write(fd, data)

    def fsync(self, fd):
        gate = self.gate
        if gate is not None and threading.current_thread() is not threading.main_thread():
            self.gated.set()
            gate.wait(LIMIT)
        self.fsyncs += 1
        if self.fail_fsync:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fsync(fd)

    def hold(self) -> None:
        self.gated.clear()
        self.gate = threading.Event()

    def release(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.set()


def one_line(body: bytes) -> str:
    text = body.decode()
    assert text.endswith("\n") and text.count("\n") == 1 and text.strip(), body
    return text.strip()


def reopen(tmp_path, service: str, sink: bool = False) -> storage.QueueLog:
    """The queue's directory opened afresh with the plain FileIO (after the server stopped)."""
    return storage.QueueLog.open(queue_dir(tmp_path / "data", QueueRef(service, sink=sink)))


def assert_clean(tmp_path) -> None:
    """`qserve log verify` finds nothing wrong anywhere in the data directory."""
    for q in find_queues(str(tmp_path / "data")):
        res = verify_queue(q)
        assert not res.problems, [(p.path, p.offset, p.reason) for p in res.problems]


def contents(qlog: storage.QueueLog) -> list[tuple[int, bytes]]:
    return [(e.index, e.data) for e in qlog.scan()]


async def healthy(srv) -> bool:
    head, body = await Client(await srv.listener.connect()).request("GET", "/healthz")
    return (head.status_code, body) == (200, b"OK")


async def put(c, data: bytes, query: str = "") -> tuple[int, bytes]:
    return await c.call("POST", query, data)


async def get_index(c, index: int):
    """Non-deleting JSON get of exactly `index` (None if absent)."""
    status, body = await c.call("GET", f"_index_={index}&_raw_=false&_auto_delete_=false")
    if status == 204:
        return None
    assert status == 200, (status, body)
    doc = json.loads(body)
    return doc[0] if doc and doc[0]["index"] == index else None


async def test_enospc_while_creating_a_queue_is_507_and_leaves_no_half_queue(tmp_path):
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv:
            c = await srv.client("newq")
            io.full = True
            status, body = await put(c, b"x")
            assert status == 507 and "space" in one_line(body)
            assert await healthy(srv)
            io.full = False
            assert await put(c, b"y") == (200, b"1")
    qlog = reopen(tmp_path, "newq")
    assert contents(qlog) == [(1, b"y")]
    qlog.close()
    assert_clean(tmp_path)


async def test_a_put_rolled_back_by_a_failed_roll_fsync_is_not_answered_200(tmp_path):
    """Put A waits for the group-commit flusher, whose fsync is slow; meanwhile put B needs a new
    segment and the inline fsync of the old one (storage's `_roll`) fails. That rollback removes A's
    record too, so A must not be answered 200, although the flusher's own fsync then succeeds."""
    io = SwitchIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always", segment_bytes=1024) as srv:
            c = await srv.client("race")
            assert await put(c, b"durable") == (200, b"1")
            results = {}
            io.hold()   # the flusher's next fsync (for A) waits at the gate

            async def put_a():
                results["A"] = await put(await srv.client("race"), b"A" * 100)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(put_a)
                await trio.to_thread.run_sync(io.gated.wait, 5)
                assert io.gated.is_set(), "the flusher never started its fsync"
                io.fail_fsync = True          # only the inline fsync of B's segment roll sees this
                results["B"] = await put(c, b"B" * 900)   # too big for the active segment: a roll
                io.fail_fsync = False
                io.release()
            assert results["B"][0] == 503, results
            assert results["A"][0] in (200, 503), results
            acked = [1] + [int(r[1]) for r in results.values() if r[0] == 200]
            if results["A"][0] == 200:
                assert await get_index(c, int(results["A"][1])) is not None, \
                    f"put A answered {results['A']} but its entry is gone"
    qlog = reopen(tmp_path, "race")
    stored = [i for i, _ in contents(qlog)]
    qlog.close()
    assert set(acked) <= set(stored), f"answered 200 but not stored: {sorted(set(acked) - set(stored))}"
