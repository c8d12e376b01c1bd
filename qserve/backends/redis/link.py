"""This node's connection to Redis: scripts run through it, and Redis's failures become clients' errors.

Strategy: one coredis client (its own connection pool; coredis runs on trio through anyio, so a
command is no thread hop) shared by every queue of the node. `Link.run` calls a script by its SHA
(loaded on first use and again after a Redis restart) and, with ``--redis-wait N``, adds a WAIT on
the same connection so that a write is answered only once N replicas have it. The failure modes a
client can meet are mapped here, once, to `qserve.core.errors`: Redis unreachable, restarting,
read-only (a replica) or a WAIT not met -> 503 with a one-line reason (a script is atomic, so
nothing is half-written); out of memory -> 507. An outage is logged once when it starts and once
when it ends, not per request and never with a traceback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import anyio
import coredis
import coredis.exceptions as rx
from coredis.connection import TCPLocation

from qserve.backends.redis import pool, scripts
from qserve.backends.redis.url import RedisTarget
from qserve.core.errors import InsufficientStorage, QServeError, Unavailable

__all__ = ["Link", "redis_error"]

log = logging.getLogger("qserve")

#: seconds to connect, and to wait for a reply (a stalled Redis is an outage, not a hang)
CONNECT_TIMEOUT = 2.0
REPLY_TIMEOUT = 10.0
#: connections per node (coredis's default; a command that waits on its reply holds one), and the
#: seconds a command waits for one of them before it is a 503 (`pool`)
MAX_CONNECTIONS = 64
POOL_TIMEOUT = REPLY_TIMEOUT


def redis_error(exc: Exception, where: str) -> QServeError | None:
    """The client's error for a Redis failure (None: not a failure of Redis, i.e. a bug)."""
    if isinstance(exc, rx.ReplicationError):
        return Unavailable(f"redis at {where}: the write was not acknowledged by enough replicas in time "
                           "(it may still be applied); retry")
    if isinstance(exc, rx.AuthenticationError):
        return Unavailable(f"redis at {where} refused the credentials")
    if isinstance(exc, rx.ReadOnlyError):
        return Unavailable(f"redis at {where} is a read-only replica; writes need the primary")
    if isinstance(exc, rx.BusyLoadingError):
        return Unavailable(f"redis at {where} is loading its data; retry")
    if isinstance(exc, rx.NoScriptError):   # still unknown after coredis loaded it: Redis restarted in between
        return Unavailable(f"redis at {where} lost its scripts (restarted?); retry")
    if isinstance(exc, rx.ResponseError):
        text = str(exc)
        if text.startswith("OOM"):
            return InsufficientStorage(f"redis at {where} is out of memory (maxmemory reached)")
        if text.startswith(("MISCONF", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN")):
            return Unavailable(f"redis at {where}: {text.splitlines()[0][:200]}")
        return None
    if isinstance(exc, (rx.ConnectionError, rx.RedisError, OSError, TimeoutError, anyio.ClosedResourceError,
                        anyio.BrokenResourceError)):
        return Unavailable(f"redis at {where} is unreachable; retry")
    return None


class Link:
    """This node's Redis client (`client`), for every queue. Trio thread only."""

    def __init__(self, target: RedisTarget, node: str, *, wait_replicas: int = 0, wait_timeout: float = 1.0) -> None:
        self.target = target
        self.node = node   # this node's id: the first argument of every script (`scripts.PRELUDE`)
        common = dict(username=target.username, password=target.password, decode_responses=False,
                      connect_timeout=CONNECT_TIMEOUT, stream_timeout=REPLY_TIMEOUT, max_connections=MAX_CONNECTIONS)
        self._sentinel = None
        # the pools are coredis's with one fix: a broken connection gives its slot back (`pool`)
        if target.kind == "cluster":
            # MOVED/ASK and the slot map are coredis's; a queue's keys share one slot (`keys`)
            self.client = coredis.RedisCluster(
                startup_nodes=[{"host": h, "port": p} for h, p in target.hosts], ssl=target.ssl,
                connection_pool_cls=pool.ClusterConnectionPool, pool_timeout=POOL_TIMEOUT, **common)
        elif target.kind == "sentinel":
            # the client asks the Sentinels for the primary, and again after a fail-over
            self._sentinel = coredis.Sentinel([TCPLocation(h, p) for h, p in target.hosts], decode_responses=False,
                                              sentinel_kwargs={"connect_timeout": CONNECT_TIMEOUT,
                                                               "stream_timeout": REPLY_TIMEOUT})
            self.client = self._sentinel.primary_for(
                target.primary, db=target.db, connection_pool_class=pool.SentinelConnectionPool,
                timeout=POOL_TIMEOUT, **common)
        else:
            self.client = coredis.Redis(host=target.host, port=target.port, db=target.db, ssl=target.ssl,
                                        connection_pool_cls=pool.ConnectionPool, pool_timeout=POOL_TIMEOUT,
                                        **common)
        self._wait = (wait_replicas, max(1, round(wait_timeout * 1000)))
        self._scripts: dict[str, coredis.commands.Script] = {}
        self.down: str | None = None   # the reason while Redis is failing (logged once)

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """The client's connections (and the Sentinels' ones) for the life of the block."""
        async with contextlib.AsyncExitStack() as stack:
            if self._sentinel is not None:
                await stack.enter_async_context(self._sentinel)
            await stack.enter_async_context(self.client)
            yield

    async def persistence(self) -> list[tuple[str, dict[str, str]]]:
        """``(where, {"appendonly": .., "appendfsync": ..})`` of the server (the primary), or of each
        seed node of a cluster (CONFIG is per node there)."""
        names = ["appendonly", "appendfsync"]
        if self.target.kind != "cluster":
            return [(self.target.where, _texts(await self.client.config_get(names)))]
        found = []
        for host, port in self.target.hosts:
            node = coredis.Redis(host=host, port=port, username=self.target.username, password=self.target.password,
                                 ssl=self.target.ssl, connect_timeout=CONNECT_TIMEOUT, stream_timeout=REPLY_TIMEOUT)
            async with node:
                found.append((f"{host}:{port}", _texts(await node.config_get(names))))
        return found

    def _script(self, body: str):
        script = self._scripts.get(body)
        if script is None:
            script = self._scripts[body] = self.client.register_script(scripts.PRELUDE + body)
        return script

    async def run(self, body: str, tag: str, args: Sequence, *, write: bool = True, more_keys: Sequence[str] = ()):
        """Run one script of `scripts` on the queue whose hash tag is ``tag``; its reply.
        ``more_keys``: the other key prefixes it may write (KEYS[2]...: a dead-letter queue's, in
        the same Cluster slot).

        Raises: `Unavailable` (503) or `InsufficientStorage` (507), see the module docstring."""
        script = self._script(body)
        args = [self.node, *args]
        try:
            if write and self._wait[0]:
                with self.client.ensure_replication(*self._wait):
                    reply = await script(keys=[tag, *more_keys], args=args)
            else:
                reply = await script(keys=[tag, *more_keys], args=args)
        except Exception as exc:
            err = redis_error(exc, self.target.where)
            if err is None:
                raise
            self.failed(err.reason)
            err.logged = True
            raise err from None
        self.recovered()
        return reply

    def failed(self, reason: str) -> None:
        """Redis failed an operation: log the outage once, when it starts."""
        if self.down is None:
            self.down = reason
            log.warning("%s (requests get 503 until it answers again)", reason)

    def recovered(self) -> None:
        """Redis answered: log the end of an outage once."""
        if self.down is not None:
            self.down = None
            log.info("redis at %s answers again", self.target.where)


def _texts(found) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in found.items()}
