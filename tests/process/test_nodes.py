"""Three `qserve serve` nodes on one Redis (the session's `redis-server`), used through the official
SDK as a service behind a load balancer would be: each client talks to one node, none knows of the
others.

What is checked: the SDK's whole flow (put, watch, put the result into the sink, commit, get the
result by requestId) with the producer, the worker and the result readers each on a different
node; one consumer group whose three members are on three nodes splits the entries (no entry to two
members, every window respected, every node listing all three consumers); and the entries held by
a consumer whose node is killed with SIGKILL reach the group's member on another node within the
node lease (``--node-lease 2``) plus one second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from eas_prediction import QueueClient

from qserve.server.metrics import parse_groups

from ..helpers.process import ServerProcess
from ..helpers.redis_cluster import start_nodes
from ..helpers.sdk import client, collect, wait_for

LEASE = 2.0   # seconds: every node's --node-lease


@pytest.fixture
def nodes(tmp_path, redis_url):
    """Three qserve nodes on the (emptied) session Redis; killed at the end."""
    servers = [ServerProcess(tmp_path / name, "--backend", redis_url, "--node-lease", f"{LEASE:g}")
               for name in ("a", "b", "c")]
    yield start_nodes(servers)
    for server in servers:
        server.kill()


class Reader:
    """Reads ``n`` frames of an SDK watcher's ``run()`` generator in a thread, each with the time it
    arrived; `result` waits for them (bounded). The generator is left suspended between frames, so
    the watcher can be read again or closed without its reconnect loop running."""

    def __init__(self, frames: Iterator, n: int) -> None:
        self.got: list[tuple[object, float]] = []
        self.n = n
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(frames,), daemon=True).start()

    def _run(self, frames: Iterator) -> None:
        try:
            for _ in range(self.n):
                self.got.append((next(frames), time.monotonic()))
        finally:
            self._done.set()

    def result(self, timeout: float) -> list[tuple[object, float]]:
        assert self._done.wait(timeout) and len(self.got) == self.n, \
            f"only {len(self.got)} of {self.n} frames in {timeout} s"
        return self.got


def take(frames: Iterator, n: int, timeout: float = 20.0) -> list:
    """The next ``n`` frames of a watcher's generator (bounded)."""
    return [df for df, _ in Reader(frames, n).result(timeout)]


def close(watcher) -> None:
    """Close an SDK watcher if it ever connected (the SDK's close needs a socket)."""
    if watcher.queue.watch_sock is not None:
        watcher.close()


def consumers(q: QueueClient) -> dict[str, tuple[int, int]]:
    """Each consumer of the queue as its attributes list it: id -> (pending, window)."""
    return {c["id"]: (c["pending"], c["window"]) for c in parse_groups(q.attributes())[1]}


def test_the_sdk_flow_with_producer_worker_and_readers_on_three_nodes(nodes, service):
    producer_node, worker_node, reader_node = nodes
    producer = client(producer_node, service)
    jobs = {producer.put(f"job {i}".encode())[1]: f"job {i}".encode() for i in range(6)}

    results: dict[str, list] = {}
    sink_reader = client(reader_node, service + "/sink")

    def wait_for_result(rid: str) -> None:   # the caller's long-poll for its result, on node C
        results[rid] = sink_reader.get(request_id=rid, timeout="8s")

    readers = [threading.Thread(target=wait_for_result, args=(rid,), daemon=True) for rid in jobs]
    for thread in readers:
        thread.start()

    worker, sink_writer = client(worker_node, service), client(worker_node, service + "/sink")

    def work(df) -> None:   # the worker on node B: the result into the sink, then the commit
        sink_writer.put(b"done: " + df.data, tags={"requestId": df.tags["requestId"]})
        assert worker.commit(df.index) == b"OK"

    watcher = worker.watch(0, 2, auto_commit=False)
    got = collect(watcher, len(jobs), on_frame=work)
    watcher.close()
    for thread in readers:
        thread.join(15)
    assert sorted(df.tags["requestId"] for df in got) == sorted(jobs)
    for rid, data in jobs.items():
        [result] = results[rid]
        assert (result.data, result.tags["requestId"]) == (b"done: " + data, rid)
    assert producer.attributes()["stream.length"] == "0"      # every job committed
    assert sink_reader.attributes()["stream.length"] == "0"   # every result read (and deleted) once


def test_one_group_over_three_nodes_splits_the_entries_within_windows(nodes, service):
    producer = client(nodes[0], service)
    indexes = [int(producer.put(f"e{i}".encode())[0]) for i in range(12)]
    windows = (1, 2, 3)
    members = [client(node, service, uid=f"m{w}", gid="g") for node, w in zip(nodes, windows)]
    watchers = [member.watch(0, w, auto_commit=False) for member, w in zip(members, windows)]
    streams = [watcher.run() for watcher in watchers]
    try:
        seen: list[int] = []
        for _round in range(2):
            held = [[df.index for df in take(stream, w)] for stream, w in zip(streams, windows)]
            seen += [index for indexes_held in held for index in indexes_held]
            assert len(seen) == len(set(seen))                # no entry to two members
            want = {f"g.m{w}": (w, w) for w in windows}       # each window full, none exceeded
            for node in nodes:                                # every node lists every node's consumers
                assert consumers(client(node, service)) == want
            for member, indexes_held in zip(members, held):   # each commits through its own node
                assert member.commit(indexes_held) == b"OK"
        assert sorted(seen) == indexes
        assert producer.attributes()["stream.length"] == "0"
    finally:
        for watcher in watchers:
            close(watcher)


def test_entries_held_on_a_killed_node_reach_the_member_on_another_within_the_lease(nodes, service):
    a, b, doomed_node = nodes
    producer = client(a, service)
    indexes = [int(producer.put(f"e{i}".encode())[0]) for i in range(3)]
    doomed = client(doomed_node, service, uid="doomed", gid="g").watch(0, 3, auto_commit=False)
    survivor = client(b, service, uid="survivor", gid="g").watch(0, 3, auto_commit=False)
    try:
        assert sorted(df.index for df in take(doomed.run(), 3)) == indexes
        reading = Reader(survivor.run(), 3)
        assert wait_for(lambda: consumers(producer) == {"g.doomed": (3, 3), "g.survivor": (0, 3)}, timeout=20)

        killed_at = time.monotonic()
        doomed_node.kill()                                    # SIGKILL: nothing is given back by that node
        got = reading.result(LEASE + 10)
        assert sorted(df.index for df, _ in got) == indexes
        late = max(at for _, at in got) - killed_at
        assert late <= LEASE + 1, f"the last entry came {late:.2f} s after the kill"
        assert wait_for(lambda: consumers(producer) == {"g.survivor": (3, 3)})
    finally:
        close(survivor)
        close(doomed)
