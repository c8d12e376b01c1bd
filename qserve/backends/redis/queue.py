"""One queue stored in Redis: the backend seam's operations, each one Lua script.

Strategy: `RedisQueue` implements `backends.base.QueueBackend` by calling the scripts of
`scripts` through the node's `link.Link` (which maps Redis failures to `qserve.core.errors` and
adds WAIT for ``--redis-wait``). Everything shared between nodes (entries, who holds what, the
consumers of every node) is in Redis; what this node keeps in memory is only about its own
sockets: the attach token of each of its consumers (a consumer id reattached elsewhere replaces
it), the auto-commit frames it has not written yet, and which of its consumers were full at their
last delivery (`wants`). Wake-ups come from the queue's pub/sub channel for every node alike
(`manager.RedisBackend` listens and calls `on_event`), so a put through another node wakes this
node's watchers and long-polls exactly as a local one does.

Delivery policies (`qserve.core.policy`, Lua in `policies`): the scripts that deliver entries or
give them back take the queue's policy and this node's clock (`_policy_packed`) and answer what
they did (`_run_policy`): dead letters moved (the manager lists and wakes the dead-letter queue),
deliveries handed back on a timeout (counted here for the metrics) and the next due time (the
manager's timer). A sink on a Redis Cluster moves its parked dead letters itself (`_move_parked`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import trio

from qserve.backends.base import OnChange, Taken
from qserve.backends.get_waiters import GetWaiters
from qserve.backends.redis import group_scripts, policies, scripts
from qserve.backends.redis.keys import QueueKeys, parse_event
from qserve.backends.redis.link import Link
from qserve.backends.redis.putbatch import PutBatcher
from qserve.config import Config
from qserve.core.errors import Conflict, PayloadTooLarge, QServeError, QueueFull
from qserve.core.events import ConsumerSpec, QueueRef
from qserve.core.policy import Policy
from qserve.core.group_report import ConsumerRow, GroupRow, render_rows
from qserve.core.routing import MAX_PRIORITY
from qserve.wire.names import HEADER_ATTRIBUTES

__all__ = ["RedisEntry", "RedisQueue"]

log = logging.getLogger("qserve")

#: bound on how long giving a consumer's entries back may take when its session is cancelled
RELEASE_TIMEOUT = 5.0
#: `QueueBackend.take`'s mark: a script's reply is already durable (and replicated, with WAIT)
DURABLE = (0, 0)
#: parked dead letters (a sink on a Redis Cluster) moved per round of `RedisQueue._move_parked`
MOVE_BATCH = 64
#: requestIds a queue remembers for its dedup window (as the local backend's `MAX_REMEMBERED`)
DEDUP_LIMIT = 1_000_000


@dataclass(slots=True)
class RedisEntry:
    """One entry as read from Redis (`backends.base.StoredEntry`), with its group annotations."""

    index: int
    data: bytes
    tags: dict[str, str]
    priority: int = 0
    notes: dict[str, str] = field(default_factory=dict)


def _entry(row) -> RedisEntry:
    index, data, tags, priority, notes = row
    entry = RedisEntry(int(index), bytes(data), msgpack.unpackb(tags), int(priority))
    if notes:
        _count, code, reason = msgpack.unpackb(notes)
        entry.notes = {"lastCode": code, "lastReason": reason}
    return entry


def _pairs(tags: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[str]:
    items = tags.items() if isinstance(tags, Mapping) else tags
    return [x for pair in sorted(items) for x in pair]


class RedisQueue:
    """One queue in Redis, as seen from this node (`backends.base.QueueBackend`). Trio thread only."""

    def __init__(self, ref: QueueRef, link: Link, config: Config, node: str, *,
                 on_change: OnChange | None = None, wall_clock: Callable[[], float] = time.time,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.ref = ref
        self.keys = QueueKeys(ref)
        self._link = link
        self.config = config
        self._node = node
        self._on_change = on_change
        self.gets = GetWaiters()
        self._tokens: dict[str, str] = {}      # this node's consumers: id -> attach token
        self._unsent: dict[str, set[int]] = {}  # auto-commit consumers: taken, frames not written
        self._full: set[str] = set()           # consumers that had no free slot at their last poll
        self.on_evict: Callable[[QueueRef, str], None] | None = None   # a consumer replaced elsewhere
        self._node_id = link.node.encode()      # events this node published carry it
        self._wall_clock = wall_clock            # the dedup window's clock (the puts' timestamps)
        self._clock_ms = clock_ms or (lambda: round(wall_clock() * 1000))
        # a dead-letter queue dead-letters nothing (its entries would have nowhere to go)
        self.policy = Policy(delivery_timeout=config.policy_for(ref.service).delivery_timeout) if ref.dlq \
            else config.policy_for(ref.service)
        # the dead-letter queue shares the input queue's hash tag (`keys.queue_tag`), so one script
        # moves an entry there; a sink's tag differs, which only a Cluster refuses (CROSSSLOT): there
        # a sink parks its dead letters and this node moves them (`_move_parked`)
        self._dlq_tag = self._park_tag = ""
        if self.policy.max_deliveries and not ref.dlq:
            dlq_tag = QueueKeys(QueueRef(ref.service, dlq=True)).tag
            if ref.sink and link.target.kind == "cluster":
                self._park_tag = dlq_tag
            else:
                self._dlq_tag = dlq_tag
        self._moving = trio.Lock()   # one move of parked dead letters at a time on this node
        self.on_dead_letter: Callable[[QueueRef, int], Awaitable[None]] | None = None   # the manager's
        # the manager's timer: (this queue, policy clock ms) wakes the watchers then (a delay falls due)
        self.on_wake: Callable[[RedisQueue, int], None] | None = None
        self.dead_lettered = 0               # counters of what this node's scripts did (metrics)
        self.timed_out = 0
        self._puts = PutBatcher(self._put_batch)   # concurrent puts go in one script call

    async def _run(self, script: str, *args, write: bool = True):
        return await self._link.run(script, self.keys.tag, args, write=write)

    async def _run_policy(self, script: str, *args):
        """Run a script that takes the policy (`scripts.take_policy`) and answers with `done`;
        account for what the policies did and return the script's own result."""
        more = (self._dlq_tag,) if self._dlq_tag else ()
        result, dead, timed_out, wake, parked = await self._link.run(
            script, self.keys.tag, (self._policy_packed(), *args), more_keys=more)
        if wake and self.on_wake is not None:
            self.on_wake(self, int(wake))
        if timed_out:
            self.timed_out += int(timed_out)
        if dead:
            self.dead_lettered += int(dead)
            if self.on_dead_letter is not None:
                await self.on_dead_letter(self.ref, int(dead))
        if parked and self._park_tag:
            try:
                await self._move_parked()
            except QServeError:
                pass   # this script's own change stands; a lease round (of any node) moves them
        return result

    async def _move_parked(self) -> None:
        """A sink on a Redis Cluster: move its parked dead letters (`policies.park`) to the
        dead-letter queue, in steps that may be repeated: read them, append each there unless a
        move of it was recorded (`DLQ_PUT`), then delete them here (`UNPARK`). A node that dies in
        between leaves them parked, and the next lease round of any node moves them again."""
        async with self._moving:
            while True:
                rows = await self._run(policies.PARKED, MOVE_BATCH, write=False)
                if not rows:
                    return
                args: list = [self.clock_ms()]
                for index, data, tags, priority, request_id in rows:
                    args += [f"{self.ref.name}:{int(index)}", data, tags, priority, request_id]
                await self._link.run(policies.DLQ_PUT, self._park_tag, args)
                moved = int(await self._run(policies.UNPARK, *[int(row[0]) for row in rows]))
                if moved:
                    self.dead_lettered += moved
                    self._changed()
                    if self.on_dead_letter is not None:
                        await self.on_dead_letter(self.ref, moved)
                if len(rows) < MOVE_BATCH:
                    return

    def _policy_packed(self) -> bytes:
        """The policy and the clock as the scripts take them (`scripts.take_policy`)."""
        policy = self.policy
        backoff = policy.retry_backoff
        return msgpack.packb({
            "md": policy.max_deliveries, "bo": int(backoff is not None),
            "bi": round(backoff[0] * 1000) if backoff else 0, "bf": backoff[1] if backoff else 1.0,
            "bm": round(backoff[2] * 1000) if backoff else 0, "to": round(policy.delivery_timeout * 1000),
            "ts": f"{policy.delivery_timeout:g}", "now": self.clock_ms(), "name": self.ref.name, "dlq": self._dlq_tag,
            "park": int(bool(self._park_tag))})

    def clock_ms(self) -> int:
        """The policies' clock (unix ms): the node's wall clock, read once, advanced by trio's."""
        return self._clock_ms()

    # -- events from the queue's channel ------------------------------------------------------
    def on_event(self, message: bytes) -> None:
        """A message of the queue's ``ev`` channel (see `keys`), from any node; this node's own
        puts and changes were announced already (`_announce`, `_changed`).

        Raises: ValueError for a message no qserve node writes (nothing changed then)."""
        kind, who, index, tags = parse_event(message)   # ValueError: malformed (the manager says so)
        if kind == "k":
            if self._tokens.get(who) == index:   # ours (`index` is the token), replaced elsewhere or expired
                del self._tokens[who]
                self._unsent.pop(who, None)
                if self.on_evict is not None:
                    self.on_evict(self.ref, who)
        elif who != self._node_id:
            if kind == "p":
                self._announce(RedisEntry(index, b"", tags))
            else:
                self._changed()

    def _announce(self, entry: RedisEntry) -> None:
        """A put: wake the gets it may answer and the watchers it may concern."""
        self.gets.put(entry)
        self._notify(entry)

    def replayed_in(self, index: int, tags: Mapping[str, str]) -> None:
        """A replay (`manager.RedisBackend.replay`) stored entry ``index`` here: wake as a put does."""
        self._announce(RedisEntry(index, b"", dict(tags)))

    def replayed_out(self) -> None:
        """A replay removed entries of this dead-letter queue: wake its watchers."""
        self._changed()

    def _changed(self) -> None:
        """A commit, nack, delete or release may have freed slots: wake the watchers."""
        self._full.clear()
        self._notify(None)

    def wake_all(self) -> None:
        """Events may have been missed (the channel reconnected): wake every watcher and get."""
        self._full.clear()
        self.gets.wake_all()
        self._notify(None)

    def _notify(self, entry: RedisEntry | None) -> None:
        if self._on_change is not None:
            self._on_change(self, entry)

    # -- entries ------------------------------------------------------------------------------
    async def put(self, data: bytes, tags: Mapping[str, str], priority: int) -> int:
        return (await self._put(data, tags, priority, unique=False))[0]

    async def put_unique(self, data: bytes, tags: Mapping[str, str], priority: int) -> tuple[int, bool]:
        return await self._put(data, tags, priority, unique=True)

    async def _put(self, data: bytes, tags: Mapping[str, str], priority: int, *, unique: bool) -> tuple[int, bool]:
        """One put, a step of the PUT script (with the puts that came meanwhile: `putbatch`): with
        ``unique`` and a dedup window, a requestId the queue stored within the window (by the wall
        clock of the nodes that put it) answers its original index instead."""
        config = self.config
        if len(data) > config.max_payload_bytes:
            raise PayloadTooLarge(f"payload of {len(data)} bytes exceeds the limit of "
                                  f"{config.max_payload_bytes} bytes")
        reply = await self._puts.put((data, msgpack.packb(dict(tags)), priority, tags.get("requestId", ""),
                                      int(unique)), len(data))
        if reply == -1:
            raise Conflict(f"queue {self.ref.name} has ended; no more puts")
        if reply == -2:
            raise QueueFull(f"queue {self.ref.name} is full ({config.max_length} entries)",
                            headers=[("Retry-After", "1")])
        index, duplicate = int(reply[0]), bool(reply[1])
        if not duplicate:
            self._announce(RedisEntry(index, b"", dict(tags)))
        return index, duplicate

    async def _put_batch(self, batch: list[Sequence]) -> list:
        """The PUT script on a batch of puts (`putbatch.PutBatcher`): one reply per put."""
        config = self.config
        args = [config.max_length, int(config.trim_oldest), round(self.policy.dedup_window * 1000),
                round(self._wall_clock() * 1000), DEDUP_LIMIT]
        for put in batch:
            args.extend(put)
        return await self._run(scripts.PUT, *args)

    async def next_index(self) -> int:
        last = await self._link.client.hget(self.keys.meta, "last")
        return int(last or 0) + 1

    async def read(self, start: int, tags: Mapping[str, str], limit: int, *,
                   delete: bool = False) -> list[RedisEntry]:
        tags = dict(tags)
        request_id = tags.pop("requestId", "")
        rows = await self._run(scripts.READ, start, limit, int(delete), request_id, *_pairs(tags),
                               write=delete)
        if delete and rows:
            self._changed()
        return [_entry(row) for row in rows]

    def put_waiter(self, start: int, tags: Mapping[str, str]) -> contextlib.AbstractContextManager[trio.Event]:
        return self.gets.waiting(start, tags)

    def tags_of(self, entry: RedisEntry) -> Mapping[str, str]:
        return {**entry.tags, **entry.notes} if entry.notes else entry.tags

    async def delete(self, indexes: Sequence[int]) -> None:
        if indexes:
            await self._run(scripts.DELETE, *indexes)
            self._changed()

    async def truncate(self, below: int) -> None:
        await self._run(scripts.TRUNCATE, below)
        self._changed()

    async def end(self, force: bool) -> None:
        await self._run(scripts.END, int(force))
        self._changed()

    async def count(self, priority: int | None, tags: Mapping[str, str]) -> int:
        return int(await self._run(scripts.COUNT, -1 if priority is None else priority, *_pairs(tags),
                                   write=False))

    async def attributes(self) -> dict[str, str]:
        state, length, first, last, now, consumers, groups, delayed = await self._run(
            scripts.STATE, self.clock_ms(), write=False)
        config = self.config
        attrs = {
            "queue.state": "open",
            "meta.name": self.ref.name,
            "meta.state": _text(state),
            "meta.backend": "qserve-redis",
            "meta.nodeLease": f"{config.node_lease:g}s",
            "meta.maxPayloadBytes": str(config.max_payload_bytes),
            "stream.maxPayloadBytes": str(config.max_payload_bytes),
            **HEADER_ATTRIBUTES,
            "meta.maxPriority": str(MAX_PRIORITY),
            "stream.length": str(length),
            "stream.approxMaxLength": str(config.max_length),
            "stream.firstEntry": str(first),
            "stream.lastEntry": str(last),
            **self.policy.attributes(),
            "policy.delayed": str(delayed),
        }
        rows = []
        for cid, record, held, active, delivered, last_index in consumers:
            spec = msgpack.unpackb(record)
            unsent = len(self._unsent.get(_text(cid), ()))
            rows.append(ConsumerRow(_text(cid), last_index=int(last_index), pending=int(held) + unsent,
                                    idle=max(0, int(now) - int(active)) / 1000, window=int(spec["win"]),
                                    auto_commit=bool(spec["auto"])))
        group_rows = [GroupRow(_text(name), last_index=int(last_index), pending=int(pending),
                               delivered=int(delivered), consumers=int(members))
                      for name, pending, delivered, last_index, members in groups]
        attrs.update(render_rows(rows, group_rows))
        return attrs

    async def search(self, index: int) -> dict[str, bool | int] | None:
        found = await self._run(scripts.SEARCH, index, write=False)
        if found is None:
            return None
        pending, ahead = found
        return {"IsPending": bool(pending), "WaitCount": int(ahead)}

    # -- consumer groups ----------------------------------------------------------------------
    async def attach(self, spec: ConsumerSpec) -> None:
        token = secrets.token_hex(8)
        self._full.discard(spec.id)
        await self._run_policy(group_scripts.ATTACH, spec.id, token, spec.group, spec.window, spec.start,
                               int(spec.auto_commit), self._node, round(self.config.node_lease * 1000),
                               *_pairs(spec.tags))
        # ours once Redis has it: a lease round sends only tokens Redis knows (`lease`), and an
        # attach cancelled after the script ran is renewed by nobody, so its lease runs out
        self._tokens[spec.id] = token
        if spec.auto_commit:
            self._unsent[spec.id] = set()
        self._changed()

    async def release(self, consumer_id: str, unwritten: Collection[int] = ()) -> None:
        token = self._tokens.pop(consumer_id, None)
        self._unsent.pop(consumer_id, None)
        self._full.discard(consumer_id)
        if token is None:
            return   # replaced or expired: its entries went back already
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
            await self._run_policy(group_scripts.RELEASE, consumer_id, token, *sorted(unwritten))
        self._changed()

    def wants(self) -> list[str]:
        return [cid for cid in self._tokens if cid not in self._full]

    def consumers(self) -> list[tuple[str, str]]:
        """This node's consumers and their attach tokens (for the lease renewal)."""
        return list(self._tokens.items())

    def forget(self, consumer_ids: Iterable[str]) -> None:
        """These consumers are not attached any more (their lease expired while this node could not
        renew it): close their sessions; their entries went back to their groups already."""
        for cid in consumer_ids:
            if self._tokens.pop(cid, None) is not None:
                self._unsent.pop(cid, None)
                if self.on_evict is not None:
                    self.on_evict(self.ref, cid)

    async def deliver(self, consumer_id: str) -> list[RedisEntry]:
        return await self._poll(consumer_id, auto=False)

    async def take(self, consumer_id: str) -> Taken | None:
        entries = await self._poll(consumer_id, auto=True)
        if not entries:
            return None
        indexes = [e.index for e in entries]
        self._unsent.setdefault(consumer_id, set()).update(indexes)
        return DURABLE, entries, indexes

    async def _poll(self, consumer_id: str, *, auto: bool) -> list[RedisEntry]:
        token = self._tokens.get(consumer_id)
        if token is None:
            return []
        unsent = len(self._unsent.get(consumer_id, ()))
        reply = await self._run(group_scripts.DELIVER, self._policy_packed(), consumer_id, token, unsent, int(auto))
        if reply == -1 or self._tokens.get(consumer_id) != token:
            return []   # replaced meanwhile: the eviction closes the session
        free, rows = reply[0], reply[1:]
        if int(free) <= 0:
            self._full.add(consumer_id)   # until a commit, nack or release anywhere frees a slot
        if rows and not auto and self.policy.delivery_timeout and self.on_wake is not None:
            self.on_wake(self, self.clock_ms() + round(self.policy.delivery_timeout * 1000))
        return [_entry(row) for row in rows]

    def sent(self, consumer_id: str, indexes: Iterable[int]) -> None:
        unsent = self._unsent.get(consumer_id)
        if unsent is not None:
            unsent.difference_update(indexes)
            self._full.discard(consumer_id)
            self._notify(None)

    async def commit(self, indexes: Sequence[int], holder: tuple[str, str] | None = None) -> None:
        if indexes:
            group, cid = holder if holder is not None and self.policy.delivery_timeout else ("", "")
            await self._run(group_scripts.COMMIT, group, cid, *indexes)
            self._changed()

    async def negative(self, indexes: Sequence[int], code: str, reason: str, delay: float | None = None,
                       group: str | None = None) -> None:
        if indexes:
            await self._run_policy(group_scripts.NEGATIVE, code, reason, -1 if delay is None else round(delay * 1000),
                                   group or "", *indexes)
            self._changed()

    # -- durability ---------------------------------------------------------------------------
    async def wait_durable(self, mark, *, first: bool = False) -> None:
        """A script's reply is durable already (appendfsync always; WAIT for --redis-wait)."""

    async def lease(self) -> None:
        """Renew the leases of this node's consumers and expire other nodes' lapsed ones. A consumer
        attached again during the round (a new token) is not forgotten."""
        sent = dict(self.consumers())
        gone = await self._run_policy(group_scripts.LEASE, round(self.config.node_lease * 1000),
                                      *[x for pair in sent.items() for x in pair])
        self.forget(cid for cid in map(_text, gone) if cid in sent and self._tokens.get(cid) == sent[cid])
        self._changed()   # entries of an expired consumer (of any node) may be free now


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
