"""Damage is fenced to its queue: a queue on disk that cannot be opened answers every request with a
503 naming the cause (and, for damage, the file, the offset and the repair command), its attributes
say it is fenced, every other queue serves, and once the cause is gone (`qserve log repair` run while
the server runs, a lock let go) the next request opens it, without a restart.

Queue directories are real files written by `storage.QueueLog` and damaged by flipping a byte; the
repair is the real `qserve log repair` (its Python entry point, in a worker thread, as a second
process would run it). The tests that wait for a fence to age run on trio's mock clock (`clock`);
the repair tests run on the real clock, bounded by `trio.fail_after`, and wait for nothing but answers.
"""

from __future__ import annotations

import json
import logging
import os
import shlex

import pytest
import trio
import trio.testing

from qserve import storage
from qserve.backends.local.fence import RETRY_AFTER, Fence, dir_stamp
from qserve.cli import main as cli_main
from qserve.core.events import QueueRef
from qserve.backends.local.queues import queue_dir

from ..helpers.inproc import running_server
from ..helpers.queue_files import ENTRIES, build_queue, damage_sealed_segment

LIMIT = 20   # seconds (real time) for any test on the real clock


@pytest.fixture
def clock():
    """trio's autojump clock, jumping only after 0.25 s of real idleness: a queue opened from disk
    recovers in a worker thread, and waiting for it must not let the clock jump to the test's limit."""
    return trio.testing.MockClock(autojump_threshold=0.25)


def errors_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "qserve" and r.levelno >= logging.ERROR]


async def test_a_damaged_queue_is_fenced_and_opens_once_repaired(tmp_path, caplog, capsys):
    data = tmp_path / "data"
    bad_dir = queue_dir(data, QueueRef("bad"))
    build_queue(bad_dir, ENTRIES)
    seg, off, lost = damage_sealed_segment(bad_dir)
    build_queue(queue_dir(data, QueueRef("good")), 2)
    reason = (f"queue bad is fenced: damage in {seg} at offset {off}: crc mismatch; "
              f"repair it with: qserve log repair {shlex.quote(str(bad_dir))}")
    caplog.set_level(logging.INFO, logger="qserve")
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path) as srv:   # the damaged queue does not stop the start
            good, bad = await srv.client("good"), await srv.client("bad")
            # every other queue serves
            assert await good.call("POST", body=b"third") == (200, b"3")
            assert await good.call("GET", "_auto_delete_=false&_index_=3") == (200, b"third")
            # the damaged one: every request a 503 with the one-line reason, attributes a 200
            for method, query in [("POST", ""), ("GET", ""), ("GET", "_count_=true"), ("GET", "_watch_=true"),
                                  ("GET", "_search_=true&_index_=1"), ("DELETE", "_index_=1"),
                                  ("PUT", "_indexes_=1"), ("POST", "_eos_=true")]:
                status, body = await bad.call(method, query)
                assert (status, body.decode()) == (503, reason + "\n"), (method, query)
            attrs = await bad.attrs()
            assert attrs["queue.state"] == "fenced" and attrs["queue.fenced"] == reason
            assert attrs["meta.header.user"] == "X-EAS-QueueService-Uid" and "stream.length" not in attrs
            assert (await good.attrs())["queue.state"] == "open"
            assert errors_logged(caplog) == [reason]   # one line per fence, not per request

            # the repair runs while the server runs: the fenced queue holds no lock
            status = await trio.to_thread.run_sync(cli_main, ["log", "repair", str(bad_dir)])
            out = capsys.readouterr().out
            assert status == 0 and out.startswith(f"REPAIRED {bad_dir}: dropped 1 damaged stretch"), out

            # the next requests (several at once: one open attempt) find it open, the survivors there
            answers = []

            async def count():
                answers.append(await (await srv.client("bad")).call("GET", "_count_=true"))

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(count)
            assert answers == [(200, str(ENTRIES - 1).encode())] * 4
            status, body = await bad.call("GET", f"_raw_=false&_auto_delete_=false&_length_={ENTRIES}")
            assert status == 200
            assert [e["index"] for e in json.loads(body)] == [i for i in range(1, ENTRIES + 1) if i != lost]
            assert (await bad.attrs())["queue.state"] == "open"
            assert await bad.call("POST", body=b"new") == (200, str(ENTRIES + 1).encode())
    opened = [r.getMessage() for r in caplog.records if r.getMessage().startswith("queue bad opened")]
    assert len(opened) == 1
    assert "queue bad is no longer fenced" in caplog.messages
    assert errors_logged(caplog) == [reason]


async def test_a_queue_held_by_another_process_is_fenced_until_let_go(tmp_path, caplog, clock):
    data = tmp_path / "data"
    held = queue_dir(data, QueueRef("held"))
    build_queue(held, 3)
    lock = storage.DirLock.acquire(held)   # what a running `qserve log repair` holds
    reason = (f"queue held is fenced: {held} is in use by process {os.getpid()} (another qserve serve, or a "
              "qserve log repair running now); the next request opens it once it is free")
    try:
        with trio.fail_after(60):
            async with running_server(tmp_path) as srv:
                c = await srv.client("held")
                assert await c.call("GET", "_count_=true") == (503, (reason + "\n").encode())
                await trio.sleep(2 * RETRY_AFTER)
                assert await c.call("GET", "_count_=true") == (503, (reason + "\n").encode())  # retried, still held
                assert errors_logged(caplog) == [reason]
                lock.release()
                await trio.sleep(RETRY_AFTER)
                assert await c.call("GET", "_count_=true") == (200, b"3")
    finally:
        lock.release()


async def test_an_io_error_fences_the_queue(tmp_path, caplog, clock):
    data = tmp_path / "data"
    broken = queue_dir(data, QueueRef("io"))
    build_queue(broken, 2)
    (broken / "LOCK").unlink()
    (broken / "LOCK").mkdir()   # the lock file cannot be opened: an I/O error, not damage
    with trio.fail_after(60):
        async with running_server(tmp_path) as srv:
            c = await srv.client("io")
            status, body = await c.call("POST", body=b"x")
            assert status == 503
            assert body.decode() == (f"queue io is fenced: cannot open {broken / 'LOCK'}: Is a directory; "
                                     "the next request tries again\n")
            assert len(errors_logged(caplog)) == 1
            (broken / "LOCK").rmdir()
            await trio.sleep(RETRY_AFTER)
            assert await c.call("POST", body=b"x") == (200, b"3")


def test_a_fence_is_due_after_a_second_or_when_the_files_change(tmp_path):
    d = tmp_path / "q"
    build_queue(d, 3)
    fence = Fence(QueueRef("q"), d, "reason", since=100.0, stamp=dir_stamp(d))
    assert not fence.due(100.5)
    assert fence.due(100.0 + RETRY_AFTER)
    (d / "LOCK").write_text("1234\n")   # every open attempt rewrites the lock file: not a change
    assert not fence.due(100.5)
    (d / "00000000000000000001.seg.broken").write_bytes(b"kept by a repair")
    assert fence.due(100.5)
