"""Start-up checks of `qserve serve`, done before the server listens, each failing with one line.

Strategy: everything a user can get wrong about where the server runs is checked here, in order,
before the event loop starts serving: the data directory (a directory, writable, created if
missing), its ownership (an exclusive lock held for the process's life, so a second server on the
same data is refused instead of handing out the same indexes twice), and the listening address
(the sockets are bound here, so a busy port or a foreign address is refused before anything is
opened). A failure is a `StartupError` whose message is the one line the CLI prints.

With a Redis backend (``config.backend``) the data directory is not used: it is neither created
nor locked, since any number of nodes share one Redis by design (whether Redis can be reached is
the backend's start, not a check here). The processes of `qserve serve --processes N` (see
`server.supervisor`) bind their sockets with SO_REUSEPORT, so that they share one port.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import trio

from qserve import storage
from qserve.config import Config

__all__ = ["StartupError", "DATA_LOCK_NAME", "Prepared", "prepare", "claim_data_dir", "bind_sockets",
           "listeners_for"]

# The data directory's lock file. Service directories are percent-encoded service names, in which
# a '%' is always followed by two hex digits: no service directory can be called this.
DATA_LOCK_NAME = "qserve%lock"
BACKLOG = 1024   # pending connections the kernel queues per listening socket (trio's default too)


class StartupError(Exception):
    """The server cannot start; the message is one line for the user (no traceback)."""


@dataclass
class Prepared:
    """What `prepare` checked and holds: the data directory's lock (None with a Redis backend,
    which uses no data directory) and the bound sockets."""

    lock: storage.DirLock | None
    sockets: list[socket.socket]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.lock is not None:
            self.lock.release()


def prepare(config: Config, *, reuse_port: bool = False) -> Prepared:
    """Claim the data directory (local backend only), then bind the listening sockets (with
    SO_REUSEPORT when ``reuse_port``: a process of `--processes N`); release both on failure.

    Raises:
        StartupError: one line naming what is wrong.
    """
    lock = None if config.backend else claim_data_dir(config.data_dir)
    try:
        return Prepared(lock, bind_sockets(config.host, config.port, reuse_port=reuse_port))
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def claim_data_dir(path: str | os.PathLike) -> storage.DirLock:
    """Create `path` if missing, check it is a writable directory, and take its exclusive lock
    (held until released or the process ends; the kernel drops it when the process dies)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StartupError(f"data directory {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create data directory {path}: {_reason(exc)}") from None
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise StartupError(f"data directory {path} is not readable and writable by this user "
                           f"(uid {os.geteuid()})")
    try:
        return storage.DirLock.acquire(path, DATA_LOCK_NAME)
    except storage.DirectoryLocked as exc:
        holder = f"process {exc.pid}" if exc.pid is not None else "another process"
        raise StartupError(f"data directory {path} is in use by {holder} (another qserve serve?); "
                           "a data directory belongs to one server") from None
    except storage.StorageError as exc:
        raise StartupError(f"data directory {path}: {exc}") from None


def bind_sockets(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> list[socket.socket]:
    """Bind and listen on every address `host` resolves to (as `trio.open_tcp_listeners` does);
    with port 0 every socket gets the port the first one was given.

    ``reuse_port`` sets SO_REUSEPORT: other sockets of this user that set it too may bind the same
    address, and the kernel spreads new connections over those that listen. Without ``listen``
    the sockets are only bound: they keep the port (a supervisor's, for its processes) and take
    no connection.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                addr = (addr[0], sockets[0].getsockname()[1], *addr[2:])
            try:
                sock.bind(addr)
                if listen:
                    sock.listen(BACKLOG)
            except OSError as exc:
                raise StartupError(f"cannot listen on {_hostport(addr[0], addr[1])}: {_reason(exc)}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listeners_for(sockets: list[socket.socket]) -> list[trio.SocketListener]:
    """Trio listeners over sockets bound by `bind_sockets` (call inside `trio.run`)."""
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets]


_REASONS = {
    errno.EADDRINUSE: "address already in use (is another server running on this port?)",
    errno.EADDRNOTAVAIL: "address not available on this machine",
    errno.EACCES: "permission denied",
    errno.EROFS: "read-only file system",
}


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EACCES and isinstance(exc, OSError) and exc.filename is None:
        return "permission denied (ports below 1024 need privileges)"
    return _REASONS.get(exc.errno, exc.strerror or str(exc))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
