"""Fixtures more than one layer uses: a real `qserve serve` process on loopback (process/ and tools/;
one per backend for the suites parametrized by backend: `backend_server`), service names per test
(process/, server/ and tools/), a real `redis-server` for the Redis backend (one per session,
emptied before each test that asks for its URL), and the parametrization of a test by queue
backend (`backend_name`, `backend_url`)."""

from __future__ import annotations

import itertools
import uuid

import pytest
from trio.testing import MockClock

from .helpers.backends import BACKENDS
from .helpers.machine import command_missing
from .helpers import process
from .helpers.process import ServerProcess
from .helpers.redis_cluster import ClusterServers, SentinelServers, redis_cluster_missing
from .helpers.redis_server import RedisServer, require_redis_server
from .helpers.thread_server import ThreadServer


LOG_LINES_REPORTED = 200   # the end of each server's log in a failed test's report


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    process.started_in_test.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report shows the log of each `qserve serve` process it started: whether a
    node died, and why, is there and not only in a "connection refused" of the test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when == "call":
        for srv in process.started_in_test:
            if srv.proc is None or srv.proc.poll() is None:
                status = "running"
            else:
                status = "killed by the test" if srv.killed else f"exited with status {srv.proc.returncode}"
            report.sections.append((f"qserve serve on port {srv.port} ({status}), the last of its log",
                                    "\n".join(srv.lines[-LOG_LINES_REPORTED:])))


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real server for the session; tests use their own service names."""
    srv = ServerProcess(tmp_path_factory.mktemp("qserve-data")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def redis_backed_server(tmp_path_factory):
    """One real server on the Redis backend for the session, on a `redis-server` of its own (the
    shared `redis_server` is emptied by every test that asks for `redis_url`, which would pull the
    queues and the node's keys from under a server that outlives the test); tests use their own
    service names. Skipped like `redis_server` where there is none."""
    require_redis_server()
    redis = RedisServer(tmp_path_factory.mktemp("redis-for-server")).start()
    try:
        srv = ServerProcess(tmp_path_factory.mktemp("qserve-redis-data"), "--backend", redis.url).start()
        yield srv
        srv.stop()
    finally:
        redis.stop()


@pytest.fixture
def backend_server(request, backend_name):
    """The session's server on the backend under test (once per `BACKENDS` entry): `server` for
    "local", `redis_backed_server` for "redis"."""
    return request.getfixturevalue("server" if backend_name == "local" else "redis_backed_server")


@pytest.fixture
def fresh_server(tmp_path):
    """A server of this test's own, for kill/restart scenarios."""
    srv = ServerProcess(tmp_path / "data")
    yield srv
    srv.kill()


_names = itertools.count()


@pytest.fixture
def service() -> str:
    """A service name no other test uses."""
    return f"svc{next(_names)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real `redis-server` for the session (append-only file, fsync always), stopped at the end.
    Without `redis-server` on PATH the tests that need it are skipped with the reason (failed under CI)."""
    require_redis_server()
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, emptied (FLUSHALL) for this test: its URL, database 0."""
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def fresh_redis_server(tmp_path):
    """A `redis-server` of this test's own, not started yet, for kill -9 / restart scenarios; stopped
    (by pid) at the end. Skipped like `redis_server` where there is none."""
    require_redis_server()
    srv = RedisServer(tmp_path / "redis")
    yield srv
    srv.stop()


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    """Runs the test once per queue backend of `helpers.backends.BACKENDS` ("local", "redis")."""
    return request.param


@pytest.fixture
def backend_url(request, backend_name) -> str | None:
    """The Redis URL for "redis" (the `redis_url` fixture, requested only then, so a machine without
    `redis-server` skips just the Redis cases); None for "local"."""
    return request.getfixturevalue("redis_url") if backend_name == "redis" else None


@pytest.fixture
def backend(backend_name, backend_url) -> dict:
    """The server settings of the backend under test (once per `BACKENDS` entry): ``{}`` for the
    local segment log, ``{"backend": url}`` for Redis. Pass them on: ``running_server(tmp_path,
    **backend)``."""
    return {"backend": backend_url} if backend_name == "redis" else {}


@pytest.fixture
def autojump_clock(request):
    """trio's autojump clock (pytest-trio's fixture of the same name), made safe for a Redis backend:
    a task waiting for Redis's reply looks idle to the clock, so with Redis under test the clock
    jumps only after 0.1 s of real idleness (Redis answers in well under a millisecond here; each
    of the node's lease rounds, every 0.5 s of the clock, costs that much real time)."""
    redis = ("redis_url" in request.fixturenames
             or "backend_name" in request.fixturenames and request.getfixturevalue("backend_name") == "redis")
    return MockClock(autojump_threshold=0.1 if redis else 0)


@pytest.fixture(scope="session")
def inprocess_server(tmp_path_factory):
    """One server running in a thread of this process (`ThreadServer`), local backend, for the
    session; tests use their own service names."""
    srv = ThreadServer(tmp_path_factory.mktemp("qserve-inprocess")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def inprocess_redis_server(tmp_path_factory):
    """`inprocess_server` on the Redis backend, on a `redis-server` of its own (as
    `redis_backed_server`, for the same reason). Skipped like `redis_server` where there is none."""
    require_redis_server()
    redis = RedisServer(tmp_path_factory.mktemp("redis-for-inprocess")).start()
    try:
        srv = ThreadServer(tmp_path_factory.mktemp("qserve-inprocess-redis"), backend=redis.url).start()
        yield srv
        srv.stop()
    finally:
        redis.stop()


@pytest.fixture(params=["process", "in-process"])
def sdk_server(request, backend_name):
    """The server the official SDK suites run against: a real `qserve serve` process or a server in a
    thread of the test process, on the backend under test (every combination)."""
    if request.param == "process":
        return request.getfixturevalue("backend_server")
    return request.getfixturevalue("inprocess_server" if backend_name == "local" else "inprocess_redis_server")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A 3-primary Redis Cluster for the session (`helpers.redis_cluster.ClusterServers`), stopped
    by pid at the end. Without `redis-server` or `redis-cli` the tests that need it are skipped with
    the reason (failed under CI)."""
    reason = redis_cluster_missing()
    if reason:
        command_missing(reason)
    cluster = ClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster) -> str:
    """The session's Redis Cluster, emptied (FLUSHALL on every node) for this test: its
    ``redis+cluster://`` URL."""
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture
def redis_sentinels(tmp_path):
    """A primary, a replica and three Sentinels of this test's own (`helpers.redis_cluster.
    SentinelServers`), started; stopped by pid at the end. Skipped like `redis_cluster`."""
    reason = redis_cluster_missing()
    if reason:
        command_missing(reason)
    deployment = SentinelServers(tmp_path / "sentinel")
    try:
        yield deployment.start()
    finally:
        deployment.stop()
