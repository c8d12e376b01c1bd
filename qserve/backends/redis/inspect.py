"""`qserve redis inspect`: what one queue holds in Redis, key by key, and who is reading it.

Strategy: two read-only scripts on the queue's hash tag, with `scripts.PRELUDE` prepended like
the backend's own: `KEYS_INFO` (this module) lists the queue's keys that exist (`keys` documents
them: the fixed ones and each group's) with their type and length, the ``m`` hash and the
consumers' leases, and the backend's `scripts.STATE` gives the state, the first and last live
index and the groups' and consumers' rows exactly as the attributes are built from them. Each
script is one atomic snapshot; the two are not one, so on a busy queue they may be a few
operations apart. Nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import msgpack

from qserve.backends.redis import scripts
from qserve.backends.redis.keys import QueueKeys
from qserve.backends.redis.link import Link
from qserve.core.events import QueueRef

__all__ = ["InspectError", "Report", "parse_queue", "inspect", "KEYS_INFO"]

#: ARGV: the fixed key names of the queue (`QueueKeys.queue_keys`) -> {now ms, ``m`` as a flat
#: list, {name, type, length} of each key that exists (each group's too), ``lease`` as a flat list}
KEYS_INFO = r"""
local names = {}
for j = 1, #ARGV do names[#names + 1] = ARGV[j] end
for _, g in ipairs(groups()) do
  for _, kind in ipairs({'gm:', 'o:', 'a:', 'gi:'}) do names[#names + 1] = k(kind .. g) end
end
local length = {stream = 'XLEN', hash = 'HLEN', set = 'SCARD', zset = 'ZCARD', list = 'LLEN', string = 'STRLEN'}
local rows = {}
for _, name in ipairs(names) do
  local t = redis.call('TYPE', name)['ok']
  if t ~= 'none' then rows[#rows + 1] = {name, t, redis.call(length[t], name)} end
end
return {now_ms(), redis.call('HGETALL', k('m')), rows, redis.call('HGETALL', k('lease'))}
"""


class InspectError(Exception):
    """The queue cannot be shown; the message is one line for the user."""


@dataclass
class Report:
    """One queue as `inspect` found it (``to_json`` is the ``--json`` form)."""

    queue: str
    tag: str
    redis: str
    state: str
    length: int
    first_index: int
    last_index: int
    next_index: int
    created_ms: int
    keys: list[dict] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)
    consumers: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({
            "queue": self.queue, "tag": self.tag, "redis": self.redis, "state": self.state,
            "length": self.length, "firstIndex": self.first_index, "lastIndex": self.last_index,
            "nextIndex": self.next_index, "createdMs": self.created_ms, "keys": self.keys,
            "groups": self.groups, "consumers": self.consumers})

    def to_text(self) -> list[str]:
        entries = "1 entry" if self.length == 1 else f"{self.length} entries"
        lines = [f"queue {self.queue} in redis at {self.redis}, keys {self.tag}:*",
                 f"state {self.state}; {entries} (first {self.first_index}, last {self.last_index}); "
                 f"next index {self.next_index}"]
        lines += _table("keys", ("NAME", "TYPE", "LENGTH"), [(k["name"], k["type"], k["length"]) for k in self.keys])
        lines += _table("groups", ("NAME", "PENDING", "DELIVERED", "LAST INDEX", "MEMBERS"),
                        [(g["name"], g["pending"], g["delivered"], g["lastIndex"], g["members"]) for g in self.groups])
        lines += _table("consumers", ("ID", "GROUP", "NODE", "WINDOW", "HELD", "DELIVERED", "IDLE", "LEASE LEFT"),
                        [(c["id"], c["group"], c["node"], c["window"], c["held"], c["delivered"],
                          f"{c['idleSeconds']:.1f}s",
                          "expired" if c["leaseLeftSeconds"] < 0 else f"{c['leaseLeftSeconds']:.1f}s")
                         for c in self.consumers])
        return lines


def _table(title: str, head: tuple[str, ...], rows: list[tuple]) -> list[str]:
    """``title:`` and the rows in aligned columns under ``head``, or ``title: none``."""
    if not rows:
        return [f"{title}: none"]
    cells = [head, *[tuple(str(x) for x in row) for row in rows]]
    widths = [max(len(row[j]) for row in cells) for j in range(len(head))]
    return [f"{title}:"] + ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def parse_queue(text: str) -> QueueRef:
    """``SERVICE`` (its input queue), ``SERVICE/sink`` or ``SERVICE/dlq``.

    Raises: `InspectError` for anything else."""
    service, slash, rest = text.partition("/")
    if slash and rest not in ("sink", "dlq") or not service or service in (".", ".."):
        raise InspectError(f"queue {text!r}: name it SERVICE (the input queue) or SERVICE/sink (or SERVICE/dlq)")
    return QueueRef.of_kind(service, rest if slash else "input")


async def inspect(link: Link, ref: QueueRef) -> Report:
    """Read one queue's keys, state, groups and consumers (``link`` connected).

    Raises: `InspectError` when the queue does not exist in that Redis."""
    keys = QueueKeys(ref)
    where = link.target.where
    info = link.client.register_script(scripts.PRELUDE + KEYS_INFO)
    state = link.client.register_script(scripts.PRELUDE + scripts.STATE)
    now, meta, rows, leases = await info(keys=[keys.tag], args=["inspect", *keys.queue_keys()])
    meta = _pairs(meta)
    if "created" not in meta:
        raise InspectError(f"no queue {ref.name} in redis at {where}")
    status, length, first, last, _now, consumers, groups = await state(keys=[keys.tag], args=["inspect"])
    leases = _pairs(leases)
    report = Report(
        queue=ref.name, tag=keys.tag, redis=where, state=_text(status), length=int(length),
        first_index=int(first), last_index=int(last), next_index=int(meta.get("last", 0)) + 1,
        created_ms=int(meta["created"]),
        keys=[{"name": _text(name), "type": _text(kind), "length": int(n)} for name, kind, n in rows])
    for name, pending, delivered, last_index, members in groups:
        report.groups.append({"name": _text(name), "pending": int(pending), "delivered": int(delivered),
                              "lastIndex": int(last_index), "members": int(members)})
    for cid, record, held, active, delivered, last_index in consumers:
        spec, cid = msgpack.unpackb(record), _text(cid)
        report.consumers.append({
            "id": cid, "group": spec["g"], "node": spec["node"], "window": int(spec["win"]),
            "held": int(held), "delivered": int(delivered), "lastIndex": int(last_index),
            "autoCommit": bool(spec["auto"]), "tags": _filter(spec["tags"]),
            "idleSeconds": max(0, int(now) - int(active)) / 1000,
            "leaseLeftSeconds": (int(leases.get(cid, now)) - int(now)) / 1000})
    report.groups.sort(key=lambda g: g["name"])
    report.consumers.sort(key=lambda c: c["id"])
    return report


def _filter(tags) -> dict[str, str]:
    """A consumer's tag filter: a flat list of pairs (Lua packs an empty one as a map)."""
    return dict(zip(tags[::2], tags[1::2])) if isinstance(tags, list) else dict(tags)


def _pairs(flat) -> dict[str, str]:
    return {_text(flat[j]): _text(flat[j + 1]) for j in range(0, len(flat), 2)}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
