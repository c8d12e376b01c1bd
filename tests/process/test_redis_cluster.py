"""Two `qserve serve` nodes on a real 3-primary Redis Cluster (``--backend redis+cluster://``), used
through the official SDK.

What is checked: two queues whose hash tags map to different primaries really live there (their
stream is on the slot owner, and another primary answers MOVED for it), and both nodes serve both
queues (put through one node; get by index and by requestId, watch and commit through the other);
and a put through node A wakes, at once, a long-poll get and a watcher parked on node B for either
queue, so the cross-node wake-ups work over the Cluster's pub/sub whichever shard published.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

from qserve.backends.redis.keys import QueueKeys
from qserve.core.events import QueueRef

from ..helpers.process import ServerProcess
from ..helpers.redis_cluster import ClusterServers, start_nodes
from ..helpers.redis_server import RedisReplyError, RedisServer
from ..helpers.sdk import client, collect, wait_for

WAKE_LIMIT = 2.0   # seconds from a put to the woken get's answer (its own timeout is 8 s)


@pytest.fixture
def nodes(tmp_path, redis_cluster_url):
    """Two qserve nodes on the (emptied) session cluster; killed at the end."""
    servers = [ServerProcess(tmp_path / name, "--backend", redis_cluster_url) for name in ("a", "b")]
    yield start_nodes(servers)
    for server in servers:
        server.kill()


def on_two_shards(cluster: ClusterServers, base: str) -> list[tuple[str, RedisServer]]:
    """Two service names made from ``base`` whose queues' slots belong to different primaries, each
    with the node that owns it."""
    first = (f"{base}-0", cluster.owner(QueueKeys(QueueRef(f"{base}-0")).stream))
    for n in range(1, 64):
        name = f"{base}-{n}"
        owner = cluster.owner(QueueKeys(QueueRef(name)).stream)
        if owner is not first[1]:
            return [first, (name, owner)]
    raise AssertionError("64 names all hash to one primary")


def stored_on(cluster: ClusterServers, name: str) -> dict[int, object]:
    """XLEN of ``name``'s stream asked of every primary: the owner answers a length, the others
    MOVED."""
    found = {}
    for node in cluster.nodes:
        try:
            found[node.port] = node.call("XLEN", QueueKeys(QueueRef(name)).stream)
        except RedisReplyError as exc:
            found[node.port] = str(exc).split()[0]
    return found


def connections_open(server: ServerProcess) -> int:
    """The node's ``qserve_connections_open`` gauge (this scrape's own connection included)."""
    request = urllib.request.Request(server.url + "/metrics", headers={"Authorization": server.token})
    with urllib.request.urlopen(request, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("qserve_connections_open "):
                return int(float(line.split()[1]))
    raise AssertionError("no qserve_connections_open in /metrics")


def test_queues_on_two_primaries_are_served_by_both_nodes(redis_cluster, nodes, service):
    a, b = nodes
    shards = on_two_shards(redis_cluster, service)
    assert shards[0][1] is not shards[1][1]
    for name, owner in shards:
        producer, reader = client(a, name), client(b, name)
        sent = [producer.put(f"{name}:{i}".encode(), tags={"n": str(i)}) for i in range(3)]
        assert [int(index) for index, _ in sent] == [1, 2, 3]
        placed = stored_on(redis_cluster, name)
        assert placed.pop(owner.port) == 3 and set(placed.values()) == {"MOVED"}, placed
        for i, (index, rid) in enumerate(sent):
            [by_index] = reader.get(index=int(index), auto_delete=False, timeout="0s")
            [by_id] = reader.get(request_id=rid, auto_delete=False, timeout="0s")
            assert (by_index.index, by_index.data, by_index.tags["n"]) == (int(index), f"{name}:{i}".encode(), str(i))
            assert (by_id.index, by_id.tags["requestId"]) == (int(index), rid)
        worker = client(b, name)
        watcher = worker.watch(0, 2, auto_commit=False)
        got = collect(watcher, 3, on_frame=lambda df, q=producer: q.commit(df.index))   # commits through node A
        watcher.close()
        assert [(df.index, df.tags["requestId"]) for df in got] == [(int(i), rid) for i, rid in sent]
        assert wait_for(lambda: reader.attributes()["stream.length"] == "0")
        assert producer.attributes()["stream.length"] == "0"
        assert stored_on(redis_cluster, name)[owner.port] == 0


def test_a_put_through_one_node_wakes_a_long_poll_and_a_watcher_on_the_other(redis_cluster, nodes, service):
    a, b = nodes
    for name, _owner in on_two_shards(redis_cluster, service):
        producer = client(a, name)
        watcher = client(b, name, uid="watcher").watch(0, 1, auto_commit=False)   # keeps the entry for the get
        frames, seen_at = [], []
        collector = threading.Thread(
            target=lambda: frames.extend(collect(watcher, 1, timeout=30, on_frame=lambda _: seen_at.append(
                time.monotonic()))), daemon=True)
        collector.start()
        assert wait_for(lambda: producer.attributes().get("consumers.stats.total") == "1", timeout=20)

        answer = {}
        baseline = connections_open(b)
        poller = client(b, name)   # a fresh client: its long-poll is a new connection to node B

        def long_poll():
            answer["frames"] = poller.get(index=1, timeout="8s", auto_delete=False)
            answer["at"] = time.monotonic()

        thread = threading.Thread(target=long_poll, daemon=True)
        thread.start()
        assert wait_for(lambda: connections_open(b) > baseline, timeout=20)   # the get reached node B

        put_at = time.monotonic()
        index, rid = producer.put(b"wake up")
        thread.join(25)
        collector.join(35)
        watcher.close()
        assert not thread.is_alive() and not collector.is_alive()
        [got] = answer["frames"]
        assert (got.index, got.tags["requestId"], got.data) == (int(index), rid, b"wake up")
        assert answer["at"] - put_at < WAKE_LIMIT
        assert [(df.index, df.data) for df in frames] == [(int(index), b"wake up")]
        assert seen_at[0] - put_at < WAKE_LIMIT
