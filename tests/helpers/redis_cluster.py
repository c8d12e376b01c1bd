"""Real Redis deployments of several processes on loopback, for the tests of several nodes (#16): a
3-primary Redis Cluster (`ClusterServers`) and a primary with one replica watched by three Sentinels
(`SentinelServers`); and `start_nodes`, which starts several `qserve serve` processes at once.

Strategy: every redis-server is a `RedisServer` (tests/helpers/redis_server.py) with its own
directory, free loopback port, append-only file with ``appendfsync always`` and log; this module
adds only the options that make it a cluster node, a replica or a Sentinel, and the waits that make
the whole deployment usable. Every wait is on a condition Redis reports (CLUSTER INFO, INFO
replication, INFO sentinel), polled with a 20 ms pause spent on the processes' pidfds (a server
that dies is seen at once) and bounded by a deadline; a deployment that does not come up raises
RuntimeError naming what was missing and the log to read. `stop()` ends every process by its pid
(RedisServer's SIGTERM, then SIGKILL), whatever state the test left it in.

The cluster: three primaries, no replicas, created with ``redis-cli --cluster create`` (which
assigns the 16384 slots in three ranges); each node's bus port is picked free like its port
(``--cluster-port``: port + 10000 may not exist). Creating one takes a few seconds, so the
session shares one (tests empty it with `flushall`, and use their own service names).

The Sentinels: ``down-after-milliseconds`` 3000 and a short ``failover-timeout``, and (SENTINEL
DEBUG, Redis 7) INFO and hello messages every 200 ms instead of 10 s and 2 s, so the Sentinels
find the replica and each other, and turn a restarted old primary into a replica, in about a
second instead of ten; ``tilt-period`` 1 s, so a clock hiccup pauses them for a second, not 30.
With 1000 ms a loaded CI machine once saw a Sentinel judge the just-promoted replica down (no
answer to its pings within the second after the switch) and fail over back to the restarted old
primary, which then resynced the promoted one from its own older data; 3 s costs the fail-over
test two seconds.
The replica starts once the primary answers and the Sentinels once the replica is in sync, so
their first look at the primary already lists it. Not task-safe: one test (or fixture) owns an
instance.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .process import ServerProcess
from .redis_server import HOST, RedisReplyError, RedisServer, redis_server_missing

__all__ = ["ClusterServers", "SentinelServers", "REDIS_CLI", "redis_cluster_missing", "start_nodes",
           "info_fields"]

REDIS_CLI = "redis-cli"
PRIMARY_NAME = "mymaster"
#: SENTINEL DEBUG settings (milliseconds): see the module docstring
SENTINEL_PERIODS = ("info-period", "200", "publish-period", "200", "tilt-period", "1000")


def redis_cluster_missing() -> str | None:
    """The one-line reason these deployments cannot run here (no `redis-server` or no `redis-cli`),
    or None."""
    reason = redis_server_missing()
    if reason is None and shutil.which(REDIS_CLI) is None:
        reason = f"{REDIS_CLI} not installed (apt-get install redis-tools)"
    return reason


def _distinct_free_ports(n: int) -> list[int]:
    """``n`` different ports nothing listens on right now (the kernel's picks, all held at once)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def info_fields(text: bytes | str | None) -> dict[str, str]:
    """The ``name:value`` lines of an INFO or CLUSTER INFO reply, as a dict."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    fields = {}
    for line in (text or "").splitlines():
        name, colon, value = line.partition(":")
        if colon and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def _ask(server: RedisServer, *command: str) -> dict[str, str]:
    """INFO-like ``command`` on ``server`` as fields; {} while it cannot answer (down, loading)."""
    try:
        return info_fields(server.call(*command, timeout=2.0))
    except (OSError, RedisReplyError):
        return {}


def _wait_until(check: Callable[[], bool], what: str, servers: Iterable[RedisServer], timeout: float) -> None:
    """Until ``check()`` is true; between attempts, 20 ms on the running servers' pidfds (a death is
    an error at once). Raises RuntimeError naming ``what`` after ``timeout`` seconds."""
    servers = list(servers)
    deadline = time.monotonic() + timeout
    while not check():
        dead = [s for s in servers if s.proc is not None and s.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"{what}: redis-server on port {dead[0].port} exited ({dead[0].proc.returncode}); "
                               f"see {dead[0].log_path}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s; logs in {servers[0].directory.parent}")
        fds = [os.pidfd_open(s.pid) for s in servers if s.running()]
        try:
            select.select(fds, [], [], 0.02)
        finally:
            for fd in fds:
                os.close(fd)


def _stop_all(servers: Iterable[RedisServer]) -> None:
    """Stop each server by its pid; every one is tried, the first failure is raised after."""
    failure = None
    for server in servers:
        try:
            server.stop()
        except Exception as exc:   # the next ones must still be stopped
            failure = failure or exc
    if failure is not None:
        raise failure


class ClusterServers:
    """A Redis Cluster of three primaries (no replicas) on 127.0.0.1, each in ``directory/nodeN``.

    `start()` creates it and waits until every node says ``cluster_state:ok``; `url` is the
    ``redis+cluster://`` URL naming all three; `owner(key)` is the node that holds ``key``.
    """

    def __init__(self, directory: Path, primaries: int = 3) -> None:
        self.directory = directory.resolve()
        self.nodes: list[RedisServer] = []
        ports = _distinct_free_ports(2 * primaries)
        for n in range(primaries):
            node = RedisServer(self.directory / f"node{n}", "--cluster-enabled", "yes", "--cluster-config-file",
                               "nodes.conf", "--cluster-port", str(ports[primaries + n]))
            node.port = ports[n]
            self.nodes.append(node)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{node.port}" for node in self.nodes)

    def start(self, timeout: float = 60.0) -> "ClusterServers":
        """Start the nodes, join them into one cluster (``redis-cli --cluster create``) and wait
        until each serves all 16384 slots. Raises RuntimeError with the reason if it does not."""
        try:
            for node in self.nodes:
                node.start()
            create = subprocess.run(
                [REDIS_CLI, "--cluster", "create", *(f"{HOST}:{node.port}" for node in self.nodes), "--cluster-yes"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({create.returncode}):\n"
                                   f"{create.stdout[-2000:]}{create.stderr[-2000:]}")
            _wait_until(self._ready, "the cluster's state ok on every node", self.nodes, timeout)
        except BaseException:
            _stop_all(self.nodes)
            raise
        return self

    def _ready(self) -> bool:
        for node in self.nodes:
            info = _ask(node, "CLUSTER", "INFO")
            if (info.get("cluster_state"), info.get("cluster_slots_ok"), info.get("cluster_known_nodes")) != \
                    ("ok", "16384", str(len(self.nodes))):
                return False
        return True

    def keyslot(self, key: str) -> int:
        """The slot of ``key`` (CLUSTER KEYSLOT: its hash tag's, if it has one)."""
        return self.nodes[0].call("CLUSTER", "KEYSLOT", key)

    def owner(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot (from CLUSTER NODES)."""
        slot = self.keyslot(key)
        for line in self.nodes[0].call("CLUSTER", "NODES").decode().splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return next(node for node in self.nodes if node.port == port)
        raise RuntimeError(f"no node serves slot {slot} of {key!r}")

    def flushall(self) -> None:
        """Empty every node (each holds its own slots' keys)."""
        for node in self.nodes:
            node.flushall()

    def stop(self) -> None:
        _stop_all(self.nodes)


class SentinelServers:
    """A primary, one replica (``--replicaof``) and three Sentinels watching the primary as
    ``mymaster`` (quorum 2), on 127.0.0.1, in ``directory/{primary,replica,sentinelN}``.

    `primary` and `replica` are the servers that started in those roles; after a fail-over
    `current_primary()` says which one the Sentinels name now. `url` is the ``redis+sentinel://``
    URL naming the three Sentinels and the primary's name.
    """

    name = PRIMARY_NAME

    def __init__(self, directory: Path, down_after_ms: int = 3000, failover_timeout_ms: int = 3000) -> None:
        self.directory = directory.resolve()
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        # a full sync starts at once instead of after 5 s (in case another replica joins)
        self.primary = RedisServer(self.directory / "primary", "--repl-diskless-sync-delay", "0")
        self.replica: RedisServer | None = None
        self.sentinels: list[RedisServer] = []

    @property
    def redis(self) -> list[RedisServer]:
        """The two data servers (primary first as started), not the Sentinels."""
        return [self.primary] + ([self.replica] if self.replica else [])

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"{HOST}:{s.port}" for s in self.sentinels) + f"/{self.name}"

    def start(self, timeout: float = 60.0) -> "SentinelServers":
        """Start the primary, then the replica (until it is in sync), then the Sentinels (until each
        sees the primary up, the replica and the two other Sentinels). Raises RuntimeError."""
        try:
            self.primary.start()
            self.replica = RedisServer(self.directory / "replica", "--repl-diskless-sync-delay", "0",
                                       "--replicaof", HOST, str(self.primary.port)).start()
            self.wait_replicating(self.primary, self.replica, timeout)
            for n in range(3):
                folder = self.directory / f"sentinel{n}"
                folder.mkdir(parents=True, exist_ok=True)
                config = folder / "sentinel.conf"
                config.write_text(f"sentinel monitor {self.name} {HOST} {self.primary.port} 2\n"
                                  f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                                  f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}\n")
                sentinel = RedisServer(folder, "--sentinel", config=config)
                self.sentinels.append(sentinel)
                sentinel.start()
                sentinel.call("SENTINEL", "DEBUG", *SENTINEL_PERIODS)
            self.wait_seen(self.primary, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_seen(self, primary: RedisServer, timeout: float = 30.0) -> None:
        """Until every Sentinel names ``primary``, sees it up, one replica and the two other Sentinels."""
        running = [s for s in self.sentinels + self.redis if s.running()]   # a killed old primary is not watched
        _wait_until(lambda: self._seen(primary.port), f"every Sentinel seeing port {primary.port} as the primary, "
                    "one replica and the other Sentinels", running, timeout)

    def _master0(self, sentinel: RedisServer) -> dict[str, str]:
        """INFO sentinel's ``master0`` line of ``sentinel``: name, status, address, slaves, sentinels."""
        line = _ask(sentinel, "INFO", "sentinel").get("master0", "")
        return dict(part.split("=", 1) for part in line.split(",") if "=" in part)

    def _seen(self, port: int) -> bool:
        want = {"name": self.name, "status": "ok", "address": f"{HOST}:{port}", "slaves": "1", "sentinels": "3"}
        return all(self._master0(s) == want for s in self.sentinels)

    def current_primary(self) -> RedisServer | None:
        """The data server every Sentinel names as the primary now (None while they disagree)."""
        addresses = {self._master0(s).get("address") for s in self.sentinels}
        if len(addresses) != 1:
            return None
        address = addresses.pop()
        return next((r for r in self.redis if f"{HOST}:{r.port}" == address), None)

    def wait_failover(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Until every Sentinel names another server than ``old`` as the primary and that server
        says ``role:master``; returns it."""
        def promoted() -> bool:
            now = self.current_primary()
            return now is not None and now is not old and _ask(now, "INFO", "replication").get("role") == "master"

        _wait_until(promoted, f"a fail-over away from port {old.port}", self.sentinels, timeout)
        return self.current_primary()

    def wait_replicating(self, primary: RedisServer, replica: RedisServer, timeout: float = 30.0) -> None:
        """Until ``replica`` follows ``primary`` with its link up and ``primary`` lists it online
        (so a WAIT 1 on ``primary`` can be met)."""
        def following() -> bool:
            mine = _ask(replica, "INFO", "replication")
            theirs = _ask(primary, "INFO", "replication")
            return (mine.get("role") == "slave" and mine.get("master_port") == str(primary.port)
                    and mine.get("master_link_status") == "up" and theirs.get("role") == "master"
                    and f"port={replica.port},state=online" in theirs.get("slave0", ""))

        _wait_until(following, f"port {replica.port} replicating port {primary.port}", [primary, replica], timeout)

    def stop(self) -> None:
        _stop_all(self.sentinels + self.redis)


def start_nodes(servers: list[ServerProcess], timeout: float = 60.0) -> list[ServerProcess]:
    """Start several `qserve serve` processes at once (each start waits for its listening line, a
    second of Python start-up); if one fails, the others are killed and its error is raised."""
    errors: list[BaseException] = []

    def start(server: ServerProcess) -> None:
        try:
            server.start(timeout)
        except BaseException as exc:   # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,), daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    if errors or any(thread.is_alive() for thread in threads):
        for server in servers:
            server.kill()
        raise errors[0] if errors else RuntimeError("a qserve node did not start in time")
    return servers
