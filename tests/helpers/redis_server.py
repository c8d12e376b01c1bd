"""A real `redis-server` child process on loopback (`RedisServer`), for the Redis backend's tests.

Strategy: Debian's `redis-server` runs in the foreground on 127.0.0.1 and a free port, in a directory
of its own, with the durable settings the README recommends (``--appendonly yes --appendfsync always``,
no RDB snapshots: ``--save ''``), so a write Redis has answered is on disk and `kill9()` + `restart()`
(same port, same directory: the append-only file is replayed) is a real crash test. Redis logs to
``redis.log`` in that directory. Start-up is awaited by sending PING until the answer is PONG (Redis
answers ``-LOADING`` while it replays the file) from this very process (INFO's ``process_id``: the
port may be another server's, which this one then fails to bind), between attempts waiting on the process's pidfd, so a
server that dies on start is seen at once and a live one costs no fixed sleep; everything is bounded
by a deadline. Every process is stopped by its pid (SIGTERM, then SIGKILL after a bound) and reaped.

The helper speaks just enough RESP over a plain socket (commands as arrays of bulk strings; replies
other than arrays) for PING, INFO and FLUSHALL; the tests talk to Redis through coredis.
Not task-safe: one test (or the session fixture) owns an instance.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .machine import command_missing

__all__ = ["RedisServer", "RedisReplyError", "REDIS_SERVER", "redis_server_missing", "require_redis_server"]

REDIS_SERVER = "redis-server"
HOST = "127.0.0.1"


def redis_server_missing() -> str | None:
    """The one-line reason the Redis tests cannot run here, or None when `redis-server` is on PATH."""
    if shutil.which(REDIS_SERVER) is None:
        return f"{REDIS_SERVER} not installed (apt-get install redis-server)"
    return None


def require_redis_server() -> None:
    """Skip the current test (fail it under CI) with the reason when `redis-server` is missing."""
    reason = redis_server_missing()
    if reason:
        command_missing(reason)


def _free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _encode(*args: str | bytes) -> bytes:
    """One RESP command: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisReplyError(RuntimeError):
    """Redis answered a command with an error (``-ERR ...``, ``-LOADING ...``); the message is its text."""


def _read_reply(sock: socket.socket) -> bytes | int | None:
    """One RESP reply that is not an array, read from ``sock``."""
    data = b""
    while b"\r\n" not in data:
        data += _recv(sock)
    line, rest = data.split(b"\r\n", 1)
    kind, body = line[:1], line[1:]
    if kind == b"+":
        return body
    if kind == b"-":
        raise RedisReplyError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$" and int(body) < 0:
        return None
    if kind == b"$":
        while len(rest) < int(body) + 2:
            rest += _recv(sock)
        return rest[:int(body)]
    raise RedisReplyError(f"unexpected reply {line!r}")


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("redis-server closed the connection")
    return chunk


def _info_field(info: bytes, name: str) -> str | None:
    """A ``name:value`` line of an INFO reply."""
    for line in info.decode(errors="replace").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1]
    return None


class RedisServer:
    """A `redis-server` on 127.0.0.1 that keeps its append-only file in ``directory``.

    `start()` picks a free port and waits (bounded) until PING answers PONG; `url` names database 0.
    `kill9()` and `stop()` end the process by its pid; `restart()` starts it again on the same port and
    directory, so the append-only file is replayed.
    """

    def __init__(self, directory: Path, *options: str, config: Path | None = None) -> None:
        """``options``: more redis-server options, after the durable ones (a cluster node's, a
        replica's ``--replicaof``, ``--sentinel``); ``config``: a configuration file, which Redis
        takes only as its first argument (a Sentinel needs one it can rewrite)."""
        self.directory = directory.resolve()
        self.options = options
        self.config = config
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> "RedisServer":
        """Start on a free port (or this server's port again, see `restart`) and wait until it
        answers PING. Raises RuntimeError, with the end of Redis's log, if it does not."""
        assert not self.running(), "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = _free_port()
        args = [REDIS_SERVER, *([str(self.config)] if self.config else []), "--port", str(self.port), "--bind", HOST,
                "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--daemonize", "no", "--logfile", str(self.log_path), *self.options]
        with open(self.log_path, "ab") as log:   # what Redis says before it opens its log, e.g. a bad flag
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.directory)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill9()
            raise
        return self

    def restart(self, timeout: float = 20.0) -> "RedisServer":
        """Start again on the same port and directory (Redis replays its append-only file); a server
        still running is killed first (SIGKILL), as after a crash."""
        if self.running():
            self.kill9()
        return self.start(timeout)

    def kill9(self) -> None:
        """SIGKILL by pid and reap: a crash, nothing flushed beyond what Redis already wrote."""
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
        self._reap(20.0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by pid and wait for the exit; SIGKILL if it takes longer than ``timeout``."""
        if not self.running():
            return
        self.proc.send_signal(signal.SIGTERM)
        if not self._wait_exit(timeout):
            self.proc.send_signal(signal.SIGKILL)
        self._reap(20.0)

    def flushall(self) -> None:
        """Empty every database (the per-test reset of the session's server)."""
        self.call("FLUSHALL")

    def call(self, *args: str | bytes, timeout: float = 10.0) -> bytes | int | None:
        """Send one command on a new connection and return its reply: a status (b"PONG") or bulk
        string as bytes, an integer as int, a nil as None; an error reply raises `RedisReplyError`.
        For the helper's own simple commands (no arrays), not a client."""
        with socket.create_connection((HOST, self.port), timeout=timeout) as sock:
            sock.sendall(_encode(*args))
            return _read_reply(sock)

    # -- waiting -------------------------------------------------------------------------------------

    def _wait_ready(self, timeout: float) -> None:
        """Until PING answers PONG from this process (INFO's process_id: the port may still be held
        by another server, which this one will fail to bind); between attempts, wait up to 20 ms on
        the process's exit."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            try:
                wait = max(0.1, deadline - time.monotonic())
                if self.call("PING", timeout=wait) == b"PONG":         # -LOADING while the AOF is replayed
                    pid = _info_field(self.call("INFO", "server", timeout=wait), "process_id")
                    if pid == str(self.proc.pid):
                        return
                    last = f"port {self.port} is answered by another redis-server, pid {pid}"
            except (OSError, RedisReplyError) as exc:
                last = str(exc)
            left = deadline - time.monotonic()
            if left <= 0 or self._wait_exit(min(0.02, left)):
                raise RuntimeError(f"redis-server on port {self.port} did not start ({last}); "
                                   f"exit status {self.proc.poll()}; log:\n{self._log_tail()}")

    def _wait_exit(self, timeout: float) -> bool:
        """Wait on the process's pidfd (readable once it has exited); True if it has."""
        if self.proc.poll() is not None:
            return True
        fd = os.pidfd_open(self.proc.pid)
        try:
            select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        return self.proc.poll() is not None

    def _reap(self, timeout: float) -> None:
        if self.proc is not None and not self._wait_exit(timeout):
            raise RuntimeError(f"redis-server pid {self.proc.pid} did not exit within {timeout} s")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
