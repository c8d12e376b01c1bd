"""Where a queue lives in Redis: one hash tag per queue, every key of the queue under it.

Strategy: all keys of one queue share the hash tag ``{qs:<service>}`` (input) or
``{qs:<service>:sink}`` (sink), the service percent-encoded so that no name can break out of the
braces; so a queue lives in one Cluster slot and each operation on it can be one Lua script
(`scripts`). The scripts get the tag as ``KEYS[1]`` and derive the other names from it, exactly as
`QueueKeys` does here (``<tag>:<suffix>``):

=================  ======  =====================================================================
suffix             type    what
=================  ======  =====================================================================
``m``              hash    ``last``: the last index handed out (never reset); ``state``: "End"
                           once ended; ``created``: server time (ms) of creation
``s``              stream  the live entries, stream id ``<index>-0``; fields ``d`` payload,
                           ``t`` tags (msgpack map), ``i`` requestId, ``p`` priority (only > 0)
``p``              zset    live entries of priority > 0 (score 0, member ``%08x%016x`` of
                           (2**31-1 - priority, index): lexical order is dispatch order)
``r``              hash    requestId -> index of its newest live entry
``rr``             hash    requestId -> msgpack list of its older live entries (repeated ids only)
``n``              hash    index -> msgpack [count, lastCode, lastReason] of negative commits
``gs``             set     names of the groups with members
``gm:<G>``         set     consumer ids of group G
``o:<G>``          hash    index -> consumer id: what G's members hold (pending)
``a:<G>``          hash    index -> consumer id that nacked it (another member gets it first)
``gi:<G>``         hash    ``d``: entries G delivered; ``l``: the highest index it delivered
``c``              hash    consumer id -> msgpack map: group ``g``, attach token ``tok``,
                           window ``win``, ``start``, ``auto`` (0/1), tag filter ``tags`` (flat
                           list), ``node``
``h``              hash    consumer id -> entries it holds (its taken window slots)
``la``             hash    consumer id -> server time (ms) of its last delivery/commit/nack
``cs``             hash    ``<id>:d`` entries delivered, ``<id>:l`` highest index delivered
``lease``          hash    consumer id -> server time (ms) its node's lease runs out
``dd``             zset    ``dedup_window``: client-chosen requestIds put within the window,
                           score the put's time (the putting node's wall clock, ms)
``di``             hash    ``dedup_window``: requestId -> the index its put got
``dc``             hash    ``max_deliveries``/``retry_backoff``: index -> msgpack map group ->
                           deliveries (kept while the entry is live, also when its group empties)
``dz``             zset    delays (``_delay_``, ``retry_backoff``): member ``<index>:<group>``,
                           score the due time (the nodes' policy clock, ms)
``dly``            hash    index -> msgpack map group -> due time (finds an entry's delays)
``dt``             zset    ``delivery_timeout``: member ``<index>:<group>``, score the deadline of
                           the delivery its group's holder has
``dead``           hash    a sink on a Cluster: index -> msgpack {t: dlq tags, at: ms} of a dead
                           letter parked until its node moves it (`policies`)
``mv``             zset    a dead-letter queue: ``<queue name>:<index>`` of the parked dead letters
                           appended there (kept an hour: a repeated move appends nothing)
``ev``             channel what changed: ``p<node> <index> <msgpack tags>`` a put, ``c<node>``
                           anything else (node: the writer's id), ``k<consumer id> <token>`` a
                           consumer was replaced or expired
=================  ======  =====================================================================

A service's dead-letter queue (``max_deliveries``) has the same keys under the prefix
``{qs:<service>}:dlq`` (``{qs:<service>}:dlq:s`` ...): its input queue's hash tag, so the script that
moves an entry from the input queue writes both in one slot (no input key starts with ``dlq:``).

Outside the queues, ``qs:queues`` (a hash: tag -> msgpack [service, sink], or [service, false,
true] for a dead-letter queue) lists every queue ever
created, for listings; it is written when a queue is created, outside the queue's own script (a
listing may briefly miss a queue being created; nothing else reads it).
"""

from __future__ import annotations

import urllib.parse

import msgpack

from qserve.core.events import QueueRef

__all__ = ["queue_tag", "QueueKeys", "REGISTRY", "EVENT_PATTERN", "tag_of_channel", "parse_event", "registry_entry",
           "registered_ref"]

#: every queue ever created: hash tag -> msgpack [service, sink]
REGISTRY = "qs:queues"
#: the pub/sub pattern that matches every queue's ``ev`` channel (dead-letter queues' included)
EVENT_PATTERN = "{qs:*}*:ev"


def queue_tag(ref: QueueRef) -> str:
    """The key prefix of ``ref``'s keys: ``{qs:<service>}`` (input), ``{qs:<service>:sink}`` (sink)
    or ``{qs:<service>}:dlq`` (dead-letter queue: the input queue's hash tag, so its slot)."""
    tag = "{qs:" + urllib.parse.quote(ref.service, safe="") + (":sink" if ref.sink else "") + "}"
    return tag + ":dlq" if ref.dlq else tag


def registry_entry(ref: QueueRef) -> bytes:
    """``ref``'s value in `REGISTRY`: msgpack [service, sink], or [service, false, true] for a
    dead-letter queue."""
    return msgpack.packb([ref.service, False, True] if ref.dlq else [ref.service, ref.sink])


def registered_ref(value: bytes) -> QueueRef:
    """The queue of a `REGISTRY` value (`registry_entry`)."""
    found = msgpack.unpackb(value)
    return QueueRef(found[0], sink=bool(found[1]), dlq=len(found) > 2 and bool(found[2]))


def tag_of_channel(channel: bytes | str) -> str:
    """The queue tag of an ``<tag>:ev`` channel name."""
    name = channel.decode() if isinstance(channel, bytes) else channel
    return name[:-len(":ev")]


def parse_event(message: bytes) -> tuple[str, str | bytes, int | str | None, dict | None]:
    """A message of an ``ev`` channel: ``("p", node, index, tags)`` a put, ``("c", node, None,
    None)`` any other change, ``("k", consumer id, token, None)`` a consumer replaced or expired.

    Raises: ValueError for a message no qserve node writes (anybody may PUBLISH on the channel)."""
    kind, rest = message[:1], message[1:]
    if kind == b"k":
        cid, sep, token = rest.decode().partition(" ")
        if sep and cid and token:
            return "k", cid, token, None
    elif kind == b"c":
        return "c", rest, None, None
    elif kind == b"p":
        node, _, rest = rest.partition(b" ")
        index, sep, packed = rest.partition(b" ")
        try:
            tags = msgpack.unpackb(packed) if sep else None
        except (ValueError, TypeError) as exc:   # msgpack's errors are ValueErrors; an unhashable map key a TypeError
            raise ValueError(f"bad tags: {exc}") from None
        if index.isdigit() and isinstance(tags, dict):
            return "p", node, int(index), tags
    raise ValueError("not an event of a qserve node")


class QueueKeys:
    """The key names of one queue (the same names the Lua scripts derive from ``KEYS[1]``)."""

    __slots__ = ("tag",)

    def __init__(self, ref: QueueRef) -> None:
        self.tag = queue_tag(ref)

    def key(self, suffix: str) -> str:
        return f"{self.tag}:{suffix}"

    @property
    def meta(self) -> str:
        return self.key("m")

    @property
    def stream(self) -> str:
        return self.key("s")

    @property
    def channel(self) -> str:
        return self.key("ev")

    def group_keys(self, group: str) -> list[str]:
        return [self.key(f"{kind}:{group}") for kind in ("gm", "o", "a", "gi")]

    def queue_keys(self) -> list[str]:
        """The fixed keys (not the per-group ones: `group_keys`)."""
        return [self.key(s) for s in ("m", "s", "p", "r", "rr", "n", "gs", "c", "h", "la", "cs", "lease",
                                           "dd", "di", "dc", "dz", "dly", "dt", "dead", "mv")]
