"""A `qserve serve` node on Redis behind Sentinels (``--backend redis+sentinel://s1,s2,s3/mymaster``):
the primary killed with SIGKILL under load, a fail-over to the replica, and nothing acknowledged lost.
The deployment is real (tests/helpers/redis_cluster.py `SentinelServers`: a primary, one replica, three
Sentinels, all redis-server processes on loopback), and it is what it says: checked here too, with its
end (every process stopped by its pid) and the reason it gives where `redis-cli` is missing."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
from eas_prediction.exception import PredictException

from ..helpers.process import ServerProcess
from ..helpers.redis_cluster import info_fields, redis_cluster_missing
from ..helpers.redis_server import require_redis_server
from ..helpers.sdk import client

PRODUCERS = 3
PUTS_EACH = 40      # puts answered 200 that each producer makes
KILL_AFTER = 30     # puts answered 200 (all producers) before the primary is killed
BACKOFF = 0.05      # seconds a producer waits after a refused put
LIMIT = 90.0        # seconds for the whole load, fail-over included


def test_a_sentinel_fail_over_under_load_loses_no_acknowledged_put(tmp_path, redis_sentinels, service):
    """The guarantee tested, exactly: with ``--redis-wait 1`` a put is answered 200 only once the
    replica has it too (a WAIT 1 after the put's script), so when the primary is killed with SIGKILL
    and the Sentinels promote that replica, every put answered 200 is in the new primary, at the
    index and under the requestId its answer named. What is not promised, and not checked: a put
    answered 503 during the fail-over may or may not be stored (the script may have run before the
    primary died or the WAIT gave up; the producers retry it as a new entry).

    Also what a client sees meanwhile: the node itself keeps running and answers every put, 200 or
    503 (never a hang, never a dropped connection); with one replica and ``--redis-wait 1`` writes
    are refused (503) from the primary's death until a replica follows the new primary: here the
    old primary comes back (restarted on its port and directory, as after a crash) and the Sentinels
    make it the new primary's replica, after which puts through the same node answer 200 again (the
    node found the new primary through the Sentinels by itself).
    """
    deployment = redis_sentinels
    node = ServerProcess(tmp_path / "node", "--backend", deployment.url, "--redis-wait", "1").start()
    acked: list[tuple[int, str, bytes]] = []      # (index, requestId, payload) of each put answered 200
    refused: list[int] = []                       # the status of each refused put
    progress = threading.Condition()
    stop = threading.Event()

    def produce(p: int) -> None:
        q = client(node, service)
        q.set_retry_count(0)    # the SDK would retry a 503 at once; this producer backs off instead
        q.set_timeout(5000)
        made = attempt = 0
        while made < PUTS_EACH and not stop.is_set():
            data = f"p{p}-{attempt}".encode()
            attempt += 1
            try:
                index, rid = q.put(data)
            except PredictException as exc:
                refused.append(exc.code)
                stop.wait(BACKOFF)
                continue
            made += 1
            with progress:
                acked.append((int(index), rid, data))
                progress.notify_all()

    producers = [threading.Thread(target=produce, args=(p,), daemon=True) for p in range(PRODUCERS)]
    try:
        for thread in producers:
            thread.start()
        with progress:
            assert progress.wait_for(lambda: len(acked) >= KILL_AFTER, timeout=30), f"only {len(acked)} puts"
        old = deployment.primary
        old.kill9()
        new = deployment.wait_failover(old)
        assert new is deployment.replica
        deployment.wait_seen(new)                     # every Sentinel has switched before the old one is back
        old.restart()                                 # the Sentinels turn it into the new primary's replica
        deployment.wait_replicating(new, old)
        deadline = time.monotonic() + LIMIT
        for thread in producers:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in producers), f"{len(acked)} puts answered 200 in {LIMIT} s"
        assert node.proc.poll() is None, "\n".join(node.lines)
        assert len(acked) == PRODUCERS * PUTS_EACH
        assert refused and set(refused) == {503}      # the load ran through the fail-over; nothing else
        assert len({index for index, _, _ in acked}) == len(acked)
        reader = client(node, service)                # every put answered 200, from the new primary
        for index, rid, data in acked:
            [by_index] = reader.get(index=index, auto_delete=False, timeout="0s")
            assert (by_index.index, by_index.tags["requestId"], by_index.data) == (index, rid, data)
            [by_id] = reader.get(request_id=rid, auto_delete=False, timeout="0s")
            assert (by_id.index, by_id.data) == (index, data)
    finally:
        stop.set()
        for thread in producers:
            thread.join(10)
        node.kill()


def test_the_deployment_is_a_primary_a_replica_and_three_sentinels_stopped_by_pid(redis_sentinels):
    deployment = redis_sentinels
    assert deployment.current_primary() is deployment.primary
    assert info_fields(deployment.primary.call("INFO", "replication"))["connected_slaves"] == "1"
    assert info_fields(deployment.sentinels[0].call("INFO", "server"))["redis_mode"] == "sentinel"
    pids = [server.pid for server in deployment.redis + deployment.sentinels]
    assert len(set(pids)) == 5
    deployment.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_without_redis_cli_the_reason_is_one_line(tmp_path, monkeypatch):
    require_redis_server()
    (tmp_path / "redis-server").symlink_to(shutil.which("redis-server"))
    monkeypatch.setenv("PATH", str(tmp_path))                 # redis-server only
    assert redis_cluster_missing() == "redis-cli not installed (apt-get install redis-tools)"
