"""Connection pools that keep their size when connections break or cannot be made (coredis's, fixed).

The problem: a coredis pool is a fixed number of slots (``max_connections``, 64 by default), each
empty or holding a connection. A command takes a slot and gives it back with ``release``; one that
waits on its connection for the reply (a WAIT under ``--redis-wait``, a blocking read) holds it
until then. coredis 6.9 loses the slot for good in two cases:

- the held connection broke meanwhile (the primary was killed, a fail-over disconnected the pool,
  the reply timed out): ``release`` drops the connection and does not give the slot back;
- the connection could not be made: a Sentinel pool asks the Sentinels for the primary when it
  makes one, and while none is named (during a fail-over) every command fails so.

Once every slot is gone, each later command of the node waits for a connection forever (acquiring
one is unbounded by default). The slow chaos run on Sentinel found it: a node that stopped
answering for good some seconds after a fail-over, while the other node went on.
`tests/server/test_redis_pool.py` shows the first leak on a plain ``redis-server`` and that these
pools keep their slots.

The fix: both cases give the slot back, empty, so that the next command connects afresh. `Link`
also bounds the wait for a slot (``pool_timeout``): a pool that ran dry for any other reason makes
503s, not a hang. Everything else is coredis's.

Private coredis state used: the slot queue (``_available_connections``; per node in a Cluster,
``_node_pool``, whose pool already gives back the slot of a connection it could not make) and the
``_construct_connection`` hook. coredis is pinned to 6.x in ``pyproject.toml``, and the test above
fails if a new version changes them.
"""

from __future__ import annotations

import coredis.pool
from coredis._concurrency import QueueFull

__all__ = ["ConnectionPool", "SentinelConnectionPool", "ClusterConnectionPool"]


def _give_back(slots) -> None:
    """A slot coredis lost, back to ``slots`` (empty: the next command connects afresh)."""
    try:
        slots.append_nowait(None)
    except QueueFull:   # every slot is accounted for already: nothing was lost
        pass


class _ReleaseKeepsSlots:
    """``release`` gives the slot of a broken connection back (to `_slots_of` its connection)."""

    def _slots_of(self, connection):
        return self._available_connections

    def release(self, connection) -> None:
        usable = connection.usable
        super().release(connection)
        if not usable:
            _give_back(self._slots_of(connection))


class _KeepsSlots(_ReleaseKeepsSlots):
    """For the pools with one slot queue (one server, or the primary the Sentinels name): a
    connection that could not be made gives its slot back too."""

    async def _construct_connection(self):
        # called with a slot taken; coredis keeps that slot when this fails (a Sentinel pool asks
        # the Sentinels for the primary here: during a fail-over every command can fail so)
        try:
            return await super()._construct_connection()
        except BaseException:
            _give_back(self._available_connections)
            raise


class ConnectionPool(_KeepsSlots, coredis.pool.ConnectionPool):
    """coredis's pool for one server; a broken connection's slot is given back (module docstring)."""


class SentinelConnectionPool(_KeepsSlots, coredis.pool.SentinelConnectionPool):
    """coredis's pool for the primary the Sentinels name; as `ConnectionPool`, and the slot of a
    connection that could not be made (no primary named, no Sentinel answering) is given back."""


class ClusterConnectionPool(_ReleaseKeepsSlots, coredis.pool.ClusterConnectionPool):
    """coredis's pool for a Cluster (slots per node, and it gives back the slot of a connection it
    could not make itself); a broken connection's slot is given back to its node's queue."""

    def _slots_of(self, connection):
        return self._node_pool(connection.location)
