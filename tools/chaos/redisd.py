"""The Redis that `qserve chaos --kill-redis` starts and kills: one primary, or a primary, a replica and
three Sentinels (``--replica``).

Strategy: every process is a `redis-server` child on 127.0.0.1 with a port picked once and a
directory and configuration file of its own (Sentinels rewrite theirs, and a data server's role
after a fail-over is written back to its file by the Sentinels' CONFIG REWRITE, so a restart from
the same file comes back as what it last was). Data servers run with the durable settings the
README recommends (append-only file, ``appendfsync always``), so a SIGKILL loses nothing Redis
answered. Readiness and roles are read with a few RESP commands over a trio socket (`call`); every
wait is bounded and every process is stopped by its pid.

With the Sentinels, `RedisSetup.kill_primary` kills whichever server the Sentinels name as
primary, waits (bounded) until all of them name the other one, restarts the killed one from its
own file, makes it a replica of the new primary (REPLICAOF, as an operator's restart script would;
the Sentinels would only convert it at their next INFO round) and waits until the new primary sees
it online, so the next kill always has an up-to-date replica to fail over to.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import trio

from .server import free_port

__all__ = ["RedisProcess", "RedisSetup", "RedisStartError", "call", "redis_server_missing"]

HOST = "127.0.0.1"
PRIMARY_NAME = "chaos"
#: Sentinel timing: a primary silent this long is down; a fail-over attempt may take this long
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000


class RedisStartError(RuntimeError):
    """A redis-server did not start, exited on its own, or a fail-over did not finish in time; one line."""


def redis_server_missing() -> str | None:
    """Why `--kill-redis` cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "--kill-redis needs redis-server on PATH (apt-get install redis-server)"
    return None


async def call(port: int, *args: str, timeout: float = 2.0):
    """One command to ``127.0.0.1:port``; its reply (bytes, int, None or a list; an error reply is
    returned as a `RedisStartError`, not raised). Raises OSError or trio.TooSlowError when the
    server does not answer."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            out = [b"*%d\r\n" % len(args)]
            for arg in args:
                out.append(b"$%d\r\n%s\r\n" % (len(arg.encode()), arg.encode()))
            await stream.send_all(b"".join(out))
            reader = _Reader(stream)
            return await reader.reply()


class _Reader:
    """Just enough of RESP2 for the replies of PING, INFO, SENTINEL and ROLE."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""

    async def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise OSError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    async def reply(self):
        line = await self._line()
        kind, body = line[:1], line[1:]
        if kind == b"+":
            return body
        if kind == b"-":
            return RedisStartError(body.decode(errors="replace"))
        if kind == b":":
            return int(body)
        if kind in (b"$", b"*") and int(body) < 0:
            return None
        if kind == b"*":
            return [await self.reply() for _ in range(int(body))]
        if kind == b"$":
            size = int(body)
            while len(self.buf) < size + 2:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise OSError("redis closed the connection")
                self.buf += chunk
            data, self.buf = self.buf[:size], self.buf[size + 2:]
            return data
        raise OSError(f"unexpected reply {line[:80]!r}")


def _info(reply) -> dict[str, str]:
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else ""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


class RedisProcess:
    """One `redis-server` (a data server, or a Sentinel with ``sentinel=True``) on a fixed port, with
    ``directory/redis.conf``. Used from one trio task.

    Attributes:
        starts, kills: counts, as `server.ChaosServer` keeps them.
    """

    def __init__(self, directory: Path, *, config: str, sentinel: bool = False, name: str = "redis") -> None:
        self.directory = directory
        self.port = free_port()
        self.sentinel = sentinel
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0
        directory.mkdir(parents=True, exist_ok=True)
        self.config_file = directory / "redis.conf"
        self.config_file.write_text(f"port {self.port}\nbind {HOST}\ndir {directory}\ndaemonize no\n"
                                    f"logfile {directory / 'redis.log'}\n{config}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, timeout: float = 30.0) -> float:
        """Start from the configuration file and wait until PING answers PONG from this process
        (not ``-LOADING`` while the append-only file is replayed). Returns the seconds it took."""
        assert not self.running(), "already running"
        args = ["redis-server", str(self.config_file)] + (["--sentinel"] if self.sentinel else [])
        began = time.monotonic()
        with open(self.directory / "stdout.log", "ab") as log:   # what Redis says before its log opens
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.directory)
        self.starts += 1
        last = "no answer"
        while time.monotonic() - began < timeout:
            if self.proc.poll() is not None:
                raise RedisStartError(f"{self.name} on port {self.port} exited with status "
                                      f"{self.proc.returncode}: {self.last_line()}")
            try:
                reply = await call(self.port, "PING", timeout=1.0)
                if reply == b"PONG":
                    info = _info(await call(self.port, "INFO", "server"))
                    if info.get("process_id") == str(self.proc.pid):
                        return time.monotonic() - began
                    last = f"the port is answered by pid {info.get('process_id')}"
                else:
                    last = str(reply)
            except (OSError, trio.TooSlowError) as exc:
                last = str(exc) or type(exc).__name__
            await trio.sleep(0.01)
        self.kill()
        raise RedisStartError(f"{self.name} on port {self.port} did not start within {timeout:g}s ({last})")

    def kill(self) -> bool:
        """SIGKILL by pid and reap. Returns whether it was running."""
        if not self.running():
            return False
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by pid, wait (bounded), SIGKILL if it does not exit."""
        if not self.running():
            return
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await trio.sleep(0.02)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def last_line(self) -> str:
        for name in ("redis.log", "stdout.log"):
            try:
                lines = [x for x in (self.directory / name).read_text(errors="replace").splitlines() if x.strip()]
            except OSError:
                continue
            if lines:
                return lines[-1].strip()[:300]
        return "(no output)"


_DATA = "appendonly yes\nappendfsync always\nsave \"\"\nrepl-diskless-sync-delay 0\n"   # no 5 s wait before a sync


class RedisSetup:
    """The Redis chaos runs on: a primary (``replica=False``), or a primary, a replica and three
    Sentinels. `url` is what the nodes get (``redis://`` or ``redis+sentinel://``)."""

    def __init__(self, directory: Path, *, replica: bool) -> None:
        self.replica = replica
        self.servers = [RedisProcess(directory / "redis-a", config=_DATA, name="redis-server a")]
        self.sentinels: list[RedisProcess] = []
        if replica:
            first = self.servers[0].port
            self.servers.append(RedisProcess(directory / "redis-b", name="redis-server b",
                                             config=_DATA + f"replicaof {HOST} {first}\n"))
            monitor = (f"sentinel monitor {PRIMARY_NAME} {HOST} {first} 2\n"
                       f"sentinel down-after-milliseconds {PRIMARY_NAME} {DOWN_AFTER_MS}\n"
                       f"sentinel failover-timeout {PRIMARY_NAME} {FAILOVER_TIMEOUT_MS}\n"
                       f"sentinel parallel-syncs {PRIMARY_NAME} 1\n")
            self.sentinels = [RedisProcess(directory / f"sentinel-{i}", config=monitor, sentinel=True,
                                           name=f"sentinel {i}") for i in range(1, 4)]

    @property
    def url(self) -> str:
        if self.replica:
            hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
            return f"redis+sentinel://{hosts}/{PRIMARY_NAME}/0"
        return f"redis://{HOST}:{self.servers[0].port}/0"

    @property
    def kills(self) -> int:
        return sum(s.kills for s in self.servers)

    async def start(self) -> None:
        for server in self.servers + self.sentinels:
            await server.start()
        if self.replica:
            await self._until_synced(self.servers[0], timeout=30.0)
            await self._until(lambda: self._sentinels_agree(self.servers[0]), 30.0,
                              "the Sentinels did not all see the primary and its replica")

    async def stop(self) -> None:
        for server in self.sentinels + self.servers:
            await server.stop()

    async def primary(self) -> RedisProcess:
        """The server the Sentinels name as primary (the only server without them)."""
        if not self.replica:
            return self.servers[0]
        for sentinel in self.sentinels:
            try:
                reply = await call(sentinel.port, "SENTINEL", "get-master-addr-by-name", PRIMARY_NAME)
            except (OSError, trio.TooSlowError):
                continue
            if isinstance(reply, list) and len(reply) == 2:
                for server in self.servers:
                    if int(reply[1]) == server.port:
                        return server
        raise RedisStartError("no Sentinel names the primary")

    async def kill_primary(self, delay: float) -> tuple[RedisProcess, float, float]:
        """SIGKILL the primary, restart it (after ``delay`` s; with Sentinels only once the replica
        was promoted, then until it is an online replica). Returns the killed server, the seconds
        until there was a primary again and the seconds until the killed server was back."""
        victim = await self.primary()
        began = time.monotonic()
        if not victim.kill():   # not killed by chaos: a failure of its own, which the run reports
            status = victim.proc.returncode if victim.proc is not None else None
            raise RedisStartError(f"{victim.name} on port {victim.port} had exited on its own before "
                                  f"it was to be killed (status {status}): {victim.last_line()}")
        if not self.replica:
            await trio.sleep(delay)
            await victim.start()
            took = time.monotonic() - began
            return victim, took, took
        other = next(s for s in self.servers if s is not victim)
        await self._until(lambda: self._sentinels_agree(other), 60.0,
                          f"the Sentinels did not promote {other.name} within 60s")
        promoted = time.monotonic() - began
        await trio.sleep(delay)
        await victim.start()
        # what an operator's restart script does; the Sentinels would convert it too, but only
        # after their next INFO round (~10 s), and until then no write can meet --redis-wait 1
        reply = await call(victim.port, "REPLICAOF", HOST, str(other.port))
        if isinstance(reply, RedisStartError):
            raise RedisStartError(f"{victim.name} refused REPLICAOF: {reply}")
        await self._until_synced(other, timeout=60.0)
        return victim, promoted, time.monotonic() - began

    async def _sentinels_agree(self, server: RedisProcess) -> bool:
        """Every Sentinel names ``server`` as primary, and it says it is one."""
        for sentinel in self.sentinels:
            reply = await call(sentinel.port, "SENTINEL", "get-master-addr-by-name", PRIMARY_NAME)
            if not (isinstance(reply, list) and len(reply) == 2 and int(reply[1]) == server.port):
                return False
        role = _info(await call(server.port, "INFO", "replication")).get("role")
        return role == "master"

    async def _until_synced(self, primary: RedisProcess, *, timeout: float) -> None:
        """Until ``primary`` has its replica online (so a write with WAIT 1 can succeed again)."""
        async def synced() -> bool:
            info = _info(await call(primary.port, "INFO", "replication"))
            return info.get("connected_slaves") == "1" and "state=online" in info.get("slave0", "")
        await self._until(synced, timeout, f"{primary.name}'s replica was not online within {timeout:g}s")

    @staticmethod
    async def _until(condition, timeout: float, failure: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await condition():
                    return
            except (OSError, trio.TooSlowError):
                pass
            if time.monotonic() > deadline:
                raise RedisStartError(failure)
            await trio.sleep(0.05)
