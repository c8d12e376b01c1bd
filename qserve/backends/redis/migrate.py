"""`qserve migrate`: copy every queue of a local data directory into Redis, then verify the copy.

Strategy: the data directory is read with `qserve.storage`'s own API (`QueueLog.open` recovers a
queue exactly as a server would, `scan` yields its live entries in index order), while this
process holds the directory's lock (``qserve%lock``, as `qserve serve` takes it), so no server
can write there meanwhile and none was writing when the copy started. Each queue is written into
the key layout of `keys`, by Lua scripts that get `scripts.PRELUDE` prepended, like the
backend's own:

* `RESTORE` adds a batch of entries with their original indexes (stream id ``<index>-0``, fields
  ``d``/``t``/``i``/``p``, the priority set member) and records their requestIds with the
  prelude's ``remember_request_id``, the very function a put uses, so ``r`` (the newest live entry
  of each requestId) and ``rr`` (the older live ones) are what puts in index order leave;
* `FINISH` then writes the queue's ``m`` hash (``last`` = the local next index - 1, so indexes keep
  growing after the move even when the newest entries were deleted; ``created``; ``state`` "End"
  for an ended queue), and the queue is listed in the registry ``qs:queues``.

Scripts rather than MULTI batches: a script can refuse on a read (every batch checks that no
``m`` exists: a node that created the queue meanwhile would hand out clashing indexes) and it
shares the prelude's requestId bookkeeping instead of restating it; both are atomic, and a
queue's keys share one slot, so either works on a Cluster. ``m`` is written last, so a queue
whose copy was interrupted does not exist for a server; a new run finds no ``m``, drops the
partial copy (its first batch deletes the entry keys) and starts again. A queue that already has
``m`` is refused before anything is written.

The verification reads everything back: every entry (index, payload, tags, priority, priority
set member, requestId lookup), the counts (``XLEN``, ``ZCARD``, the requestId hashes), ``m`` and
the registry, against a second pass over the local queue. Memory stays bounded by one batch.
No entry of the data directory is changed (opening a queue recovers it as a server start does: a
torn tail is cut, after a ``.broken`` copy).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack

from qserve import storage
from qserve.backends.local.queues import queue_dir
from qserve.backends.redis.keys import REGISTRY, QueueKeys, registered_ref, registry_entry
from qserve.backends.redis.link import Link, redis_error
from qserve.backends.redis.scripts import PRELUDE
from qserve.backends.redis.url import RedisTarget
from qserve.core.events import QueueRef
from qserve.server.startup import DATA_LOCK_NAME

__all__ = ["MigrateError", "QueueReport", "migrate", "RESTORE", "FINISH"]

#: a batch of entries per script: whichever bound is reached first
BATCH_ENTRIES = 512
BATCH_BYTES = 4 * 1024 * 1024

#: ARGV: first batch of the queue (0/1), then per entry: index, payload, tags (msgpack), requestId
#: ('' = none), priority -> 1; -1: the queue exists (its ``m``), nothing written
RESTORE = r"""
if redis.call('EXISTS', k('m')) == 1 then return -1 end
if ARGV[1] == '1' then redis.call('DEL', k('s'), k('p'), k('r'), k('rr'), k('n')) end
for j = 2, #ARGV, 5 do
  local i, rid, p = tonumber(ARGV[j]), ARGV[j + 3], tonumber(ARGV[j + 4])
  local f = {'d', ARGV[j + 1], 't', ARGV[j + 2]}
  if rid ~= '' then f[#f + 1] = 'i'; f[#f + 1] = rid end
  if p > 0 then
    f[#f + 1] = 'p'; f[#f + 1] = p
    redis.call('ZADD', k('p'), 0, prio_member(p, i))
  end
  redis.call('XADD', k('s'), sid(i), unpack(f))
  if rid ~= '' then remember_request_id(rid, i) end
end
return 1
"""

#: ARGV: last index handed out, ended (0/1) -> 1; -1: the queue exists (its ``m``)
FINISH = r"""
if redis.call('EXISTS', k('m')) == 1 then return -1 end
redis.call('HSET', k('m'), 'last', ARGV[1], 'created', now_ms())
if ARGV[2] == '1' then redis.call('HSET', k('m'), 'state', 'End') end
return 1
"""


class MigrateError(Exception):
    """The migration cannot go on; the message is one line for the user."""


@dataclass(frozen=True)
class QueueReport:
    """What was copied of one queue."""

    ref: QueueRef
    entries: int
    next_index: int
    ended: bool

    def line(self) -> str:
        ended = ", ended" if self.ended else ""
        entries = "1 entry" if self.entries == 1 else f"{self.entries} entries"
        return f"{self.ref.name}: {entries}, next index {self.next_index}{ended}, verified"


def find_queues(data_dir: Path) -> list[QueueRef]:
    """The queues in ``data_dir`` (``<service, percent-encoded>/input``, ``/sink`` and ``/dlq``, as
    the local backend lays them out), sorted by service, input, sink, dead-letter queue.

    Raises: `MigrateError` when it is no directory."""
    if not data_dir.is_dir():
        raise MigrateError(f"no data directory {data_dir}")
    found = []
    for svc_dir in sorted(data_dir.iterdir()):
        for kind in ("input", "sink", "dlq"):
            if (svc_dir / kind).is_dir():
                try:
                    found.append(QueueRef.of_kind(urllib.parse.unquote(svc_dir.name), kind))
                except ValueError:
                    raise MigrateError(f"{svc_dir / kind}: not a queue of a service (no service is named "
                                       f"{urllib.parse.unquote(svc_dir.name)!r})") from None
    return sorted(found, key=lambda ref: ref.order)


def claim(data_dir: Path) -> storage.DirLock:
    """The data directory's lock, which `qserve serve` holds for its life: refused (one line)
    while a server uses the directory, and kept until released so none starts meanwhile."""
    try:
        return storage.DirLock.acquire(data_dir, DATA_LOCK_NAME)
    except storage.DirectoryLocked as exc:
        holder = f"process {exc.pid}" if exc.pid is not None else "another process"
        raise MigrateError(f"data directory {data_dir} is in use by {holder} (a running qserve serve?); "
                           "stop it before migrating") from None
    except storage.StorageError as exc:
        raise MigrateError(f"data directory {data_dir}: {exc}") from None


def open_queue(data_dir: Path, ref: QueueRef) -> storage.QueueLog:
    """Open one queue of the data directory for reading (recovered as a server would open it)."""
    path = queue_dir(data_dir, ref)
    try:
        return storage.QueueLog.open(path)
    except storage.CorruptLog as exc:
        raise MigrateError(f"queue {ref.name} cannot be read: {exc} (qserve log repair {path} first)") from None
    except storage.StorageError as exc:
        raise MigrateError(f"queue {ref.name} cannot be read: {exc}") from None


async def migrate(data_dir: Path, target: RedisTarget, *, say: Callable[[str], None],
                  progress: Callable[[str], None], every: int = 0) -> list[QueueReport]:
    """Copy every queue of ``data_dir`` into the Redis at ``target`` and verify each copy, holding
    the data directory's lock throughout; ``say`` gets one line per queue once it is verified
    (`QueueReport.line`), ``progress`` a line every ``every`` entries and the warnings.

    Raises: `MigrateError` (one line): no data directory or no queue in it, a server holds it, a
    queue cannot be read, Redis cannot be used, a queue exists there already, a copy differs."""
    if not data_dir.is_dir():
        raise MigrateError(f"no data directory {data_dir}")
    lock = claim(data_dir)
    try:
        refs = find_queues(data_dir)
        if not refs:
            raise MigrateError(f"no queues in data directory {data_dir}")
        link = Link(target, "migrate")
        async with link.connected():
            copier = Copier(link, progress=progress, every=every)
            await copier.check(progress)
            taken = await copier.existing(refs)
            if taken:
                names = ", ".join(ref.name for ref in taken)
                raise MigrateError(f"queue{'s' if len(taken) > 1 else ''} {names} already exist"
                                   f"{'' if len(taken) > 1 else 's'} in redis at {copier.where}; nothing copied")
            reports = []
            for ref in refs:
                qlog = open_queue(data_dir, ref)
                try:
                    await copier.copy(ref, qlog)
                    reports.append(await copier.verify(ref, qlog))
                finally:
                    qlog.close()
                say(reports[-1].line())
            return reports
    finally:
        lock.release()


class Copier:
    """Writes queues into one Redis through `Link`'s client, and reads them back. Trio thread only.

    Args:
        link: the connected client (`Link.connected`).
        progress: called with a line every ``every`` entries copied or verified (0: never).
    """

    def __init__(self, link: Link, *, progress: Callable[[str], None], every: int) -> None:
        self.link = link
        self.where = link.target.where
        self._progress = progress
        self._every = every
        self._restore = link.client.register_script(PRELUDE + RESTORE)
        self._finish = link.client.register_script(PRELUDE + FINISH)

    async def check(self, warn: Callable[[str], None]) -> None:
        """Redis answers; warn when it does not fsync every write (the copy could be lost with
        it, and the data directory is the only other copy)."""
        await self.link.client.ping()
        try:
            found = await self.link.persistence()
        except Exception as exc:
            err = redis_error(exc, self.where)
            if err is not None:
                raise MigrateError(err.reason) from None
            return   # CONFIG renamed or denied (a managed Redis): its durability is not ours to judge
        for where, settings in found:
            if settings.get("appendonly") != "yes" or settings.get("appendfsync") != "always":
                warn(f"warning: redis at {where} runs with appendonly {settings.get('appendonly', '?')}, "
                     f"appendfsync {settings.get('appendfsync', '?')}: keep the data directory until Redis "
                     "has saved the copy")

    async def existing(self, refs: list[QueueRef]) -> list[QueueRef]:
        """The queues of ``refs`` that exist in Redis already (have an ``m`` hash)."""
        found = []
        for ref in refs:
            if await self.link.client.exists([QueueKeys(ref).meta]):
                found.append(ref)
        return found

    async def _script(self, script, ref: QueueRef, args: list) -> None:
        reply = await script(keys=[QueueKeys(ref).tag], args=["migrate", *args])
        if reply == -1:
            raise MigrateError(f"queue {ref.name} was created in redis at {self.where} while it was being "
                               "copied (a qserve node running on it?); stop the nodes, delete it and migrate again")

    async def copy(self, ref: QueueRef, qlog: storage.QueueLog) -> None:
        """Write one queue's entries, then its ``m`` hash, then its registry entry."""
        total, done, first = qlog.length, 0, True
        batch: list = []
        size = 0
        for entry in qlog.scan():
            batch += [entry.index, entry.data, msgpack.packb(entry.tags), entry.tags.get("requestId", ""),
                      entry.priority]
            size += len(entry.data) + 64
            done += 1
            if len(batch) >= 5 * BATCH_ENTRIES or size >= BATCH_BYTES:
                await self._script(self._restore, ref, [int(first), *batch])
                first, batch, size = False, [], 0
            self._tick(ref, "copied", done, total)
        if batch or first:
            await self._script(self._restore, ref, [int(first), *batch])
        ended = qlog.state.get("state") == "End"
        await self._script(self._finish, ref, [qlog.next_index - 1, int(ended)])
        await self.link.client.hset(REGISTRY, {QueueKeys(ref).tag: registry_entry(ref)})

    def _tick(self, ref: QueueRef, what: str, done: int, total: int) -> None:
        if self._every and done % self._every == 0:
            self._progress(f"{ref.name}: {done} of {total} entries {what}")

    async def verify(self, ref: QueueRef, qlog: storage.QueueLog) -> QueueReport:
        """Read the copy of one queue back and compare it with the local queue.

        Raises: `MigrateError` naming the first difference."""
        keys = QueueKeys(ref)
        client = self.link.client

        def differ(what: str) -> MigrateError:
            return MigrateError(f"queue {ref.name}: the copy in redis at {self.where} differs: {what}")

        meta = _texts(await client.hgetall(keys.meta))
        ended = qlog.state.get("state") == "End"
        if meta.get("last") != str(qlog.next_index - 1):
            raise differ(f"next index {int(meta.get('last') or 0) + 1}, not {qlog.next_index}")
        if meta.get("state") != ("End" if ended else None) or "created" not in meta:
            raise differ(f"queue state {meta}")
        registered = await client.hget(REGISTRY, keys.tag)
        if registered is None or registered_ref(registered) != ref:
            raise differ(f"not listed in {REGISTRY}")
        counts = {"entries": 0, "priority": 0, "newest": 0, "older": 0}
        local = qlog.scan()
        after = "-"
        while True:
            rows = await client.xrange(keys.stream, after, "+", count=BATCH_ENTRIES)
            if not rows:
                break
            await self._compare(ref, qlog, keys, [(next(local, None), row) for row in rows], counts, differ)
            after = "(" + _text(rows[-1].identifier)
        extra = next(local, None)
        if extra is not None:
            raise differ(f"entry {extra.index} is missing")
        if await client.xlen(keys.stream) != counts["entries"]:
            raise differ("the stream's length")
        if await client.zcard(keys.key("p")) != counts["priority"]:
            raise differ("the priority set holds other entries")
        if await client.hlen(keys.key("r")) != counts["newest"]:
            raise differ("the requestId hash holds other requestIds")
        older = 0
        async for _rid, packed in client.hscan_iter(keys.key("rr")):
            older += len(msgpack.unpackb(packed))
        if older != counts["older"]:
            raise differ("the older copies of repeated requestIds")
        return QueueReport(ref, counts["entries"], qlog.next_index, ended)

    async def _compare(self, ref, qlog, keys, pairs, counts, differ) -> None:
        """Compare one batch of (local entry, stream row) pairs, and the requestId and priority
        keys of those entries."""
        client = self.link.client
        rids, members = [], []
        for entry, row in pairs:
            index = int(_text(row.identifier).partition("-")[0])
            if entry is None or entry.index != index:
                raise differ(f"entry {index} is not live here" if entry is None or entry.index > index
                             else f"entry {entry.index} is missing")
            fields = {_text(k): v for k, v in row.field_values.items()}
            priority = int(fields.get("p", 0))
            if bytes(fields.get("d", b"")) != entry.data:
                raise differ(f"entry {index}: payload")
            if msgpack.unpackb(fields.get("t", b"\x80")) != entry.tags:
                raise differ(f"entry {index}: tags")
            if priority != entry.priority:
                raise differ(f"entry {index}: priority {priority}, not {entry.priority}")
            rid = entry.tags.get("requestId")
            if (_text(fields["i"]) if "i" in fields else None) != rid:
                raise differ(f"entry {index}: requestId")
            if priority > 0:
                members.append("%08x%016x" % (2**31 - 1 - priority, index))
                counts["priority"] += 1
            if rid is not None:
                rids.append((index, rid, qlog.find_request_id(rid).index))
            counts["entries"] += 1
            self._tick(ref, "verified", counts["entries"], qlog.length)
        if members and None in await client.zmscore(keys.key("p"), members):
            raise differ("an entry of priority > 0 is missing from the priority set")
        if not rids:
            return
        names = [rid for _, rid, _ in rids]
        newest = await client.hmget(keys.key("r"), names)
        older = await client.hmget(keys.key("rr"), names)
        for (index, rid, expected), found, copies in zip(rids, newest, older):
            if found is None or int(found) != expected:
                raise differ(f"requestId {rid} names entry {_text(found) if found else 'none'}, not {expected}")
            if index == expected:
                counts["newest"] += 1
            elif copies is None or index not in msgpack.unpackb(copies):
                raise differ(f"entry {index}: not kept as an older copy of requestId {rid}")
            else:
                counts["older"] += 1


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _texts(found) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in found.items()}


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__
