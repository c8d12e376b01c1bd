"""The official SDK's watcher against a real server process and an in-process one: push, commits,
auto-commit, one watcher per client; on every queue backend (local and Redis: the `server` fixture
below)."""

from __future__ import annotations

import threading

import pytest
from eas_prediction.exception import PredictException

from ..helpers.sdk import client, collect, wait_for


@pytest.fixture
def server(sdk_server):
    """The session's server on the backend under test, as a process and in-process: this module
    runs on every combination."""
    return sdk_server


def test_ten_entries_in_order_with_auto_commit(server, service):
    q = client(server, service)
    ids = [q.put(str(i).encode())[1] for i in range(10)]
    watcher = q.watch(0, 5, auto_commit=True)
    got = collect(watcher, 10)
    watcher.close()
    assert [df.data for df in got] == [str(i).encode() for i in range(10)]
    assert [df.tags["requestId"] for df in got] == ids
    assert wait_for(lambda: q.attributes()["stream.length"] == "0")


def test_manual_commit_empties_the_queue(server, service):
    q = client(server, service)
    for i in range(10):
        q.put(str(i).encode())
    watcher = q.watch(0, 3, auto_commit=False)
    got = collect(watcher, 10, on_frame=lambda df: q.commit(df.index))
    watcher.close()
    assert [df.data for df in got] == [str(i).encode() for i in range(10)]
    assert wait_for(lambda: q.attributes()["stream.length"] == "0")


def test_index_only_frames_carry_no_data(server, service):
    q = client(server, service)
    q.put(b"payload", tags={"k": "v"})
    watcher = q.watch(0, 5, index_only=True, auto_commit=True)
    [df] = collect(watcher, 1)
    watcher.close()
    assert df.index == 1 and df.data == b"" and df.tags["k"] == "v"


def test_second_run_on_one_client_raises(server, service):
    q = client(server, service)
    q.put(b"x")
    watcher = q.watch(0, 5)
    collect(watcher, 1)
    with pytest.raises(PredictException):
        next(q.watch(0, 5).run())
    watcher.close()


def test_five_hundred_entries_while_watching(server, service):
    producer = client(server, service)
    consumer = client(server, service)
    n = 500
    sent: list[str] = []

    def produce():
        for i in range(n):
            sent.append(producer.put(f"{i}".encode())[1])

    watcher = consumer.watch(0, 10, auto_commit=True)
    t = threading.Thread(target=produce, daemon=True)
    t.start()
    got = collect(watcher, n, timeout=120)
    watcher.close()
    t.join(30)
    ids = [df.tags["requestId"] for df in got]
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == set(sent)
    assert wait_for(lambda: consumer.attributes()["stream.length"] == "0")
