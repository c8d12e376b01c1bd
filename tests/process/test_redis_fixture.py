"""The real `redis-server` the Redis backend's tests run against (`tests/helpers/redis_server.py` and
the `redis_server` / `redis_url` fixtures): it is a real, durable Redis, and its processes end.

What is checked: writes through coredis under trio land in the session's server, which runs with the
append-only file and ``appendfsync always`` and is empty at the start of each test that asks for its
URL; a server killed with SIGKILL and restarted on its port and directory still has every write it
answered; `stop()` ends the process by its pid (a separate instance, so the session's server stays
up); a server that cannot start is reported with Redis's own reason instead of hanging; and a machine
without `redis-server` skips (fails under CI) with the one-line reason.
"""

from __future__ import annotations

import os

import coredis
import pytest
import trio

from ..helpers.machine import command_missing
from ..helpers.redis_server import redis_server_missing

LIMIT = 30  # seconds of trio time for any one test


async def _config(client: coredis.Redis, name: str) -> bytes:
    return (await client.config_get([name]))[name.encode()]


async def test_the_session_server_is_real_durable_and_empty_per_test(redis_url):
    with trio.fail_after(LIMIT):
        async with coredis.Redis.from_url(redis_url) as client:
            assert await client.dbsize() == 0                     # FLUSHALL before each test
            assert await _config(client, "appendonly") == b"yes"
            assert await _config(client, "appendfsync") == b"always"
            assert await client.set("k", "v") and await client.get("k") == b"v"
            assert await client.xadd("s", {"f": "1"}, identifier="1-0") == b"1-0"
            [entry] = await client.xrange("s")
            assert (entry.identifier, dict(entry.field_values)) == (b"1-0", {b"f": b"1"})


async def test_each_test_gets_an_empty_database(redis_url):
    """The test above left keys behind; this one (either order) starts empty all the same."""
    with trio.fail_after(LIMIT):
        async with coredis.Redis.from_url(redis_url) as client:
            assert await client.dbsize() == 0
            await client.set("left-behind", "x")


async def test_kill9_and_restart_keeps_every_answered_write(fresh_redis_server):
    srv = fresh_redis_server
    with trio.fail_after(LIMIT):
        await trio.to_thread.run_sync(srv.start)
        async with coredis.Redis.from_url(srv.url) as client:
            for i in range(1, 51):
                await client.xadd("s", {"n": str(i)}, identifier=f"{i}-0")
            await client.set("k", "v")
        old_pid, port = srv.pid, srv.port
        await trio.to_thread.run_sync(srv.kill9)
        assert srv.proc.returncode == -9
        await trio.to_thread.run_sync(srv.restart)                 # replays the append-only file
        assert srv.pid != old_pid and srv.port == port
        async with coredis.Redis.from_url(srv.url) as client:
            assert await client.get("k") == b"v"
            entries = await client.xrange("s")
            assert [e.identifier for e in entries] == [f"{i}-0".encode() for i in range(1, 51)]


def test_stop_ends_the_process_by_pid(fresh_redis_server):
    srv = fresh_redis_server.start()
    pid = srv.pid
    assert srv.call("PING") == b"PONG"
    srv.stop()
    assert srv.proc.returncode == 0 and not srv.running()     # SIGTERM: a clean shutdown, reaped
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        srv.call("PING")
    srv.stop()                                                # a second stop is a no-op


def test_a_server_that_cannot_start_is_reported_with_its_reason(fresh_redis_server, redis_server):
    clash = fresh_redis_server
    clash.port = redis_server.port                            # taken: Redis exits at once
    with pytest.raises(RuntimeError, match="did not start") as caught:
        clash.start()
    assert "Address already in use" in str(caught.value)      # the end of Redis's log
    assert not clash.running()
    assert redis_server.call("PING") == b"PONG"              # the session's server is untouched


def test_without_redis_server_the_reason_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))                 # an empty PATH: no redis-server
    reason = redis_server_missing()
    assert reason == "redis-server not installed (apt-get install redis-server)"
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="redis-server not installed"):
        command_missing(reason)
    monkeypatch.setenv("CI", "true")                          # .ci/run: the Redis tests must run
    with pytest.raises(pytest.fail.Exception, match="redis-server not installed"):
        command_missing(reason)
