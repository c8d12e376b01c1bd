"""The queues of a node whose storage is Redis (`backends.base.Backend`), and the node's upkeep.

Strategy: a node holds no state of its own that another node needs: queues live in Redis
(`keys`, `scripts`), so any number of nodes serve the same queues. Each node runs four tasks in
the server's queue nursery: the client's connection pool (`_hold`), one pub/sub subscription to
every queue's channel (`_listen`: a put, commit or release through any node wakes this node's
watchers and long-polls; after a reconnect everything is woken once, since messages may have been
missed), and the lease renewal (`_leases`: every third of ``--node-lease``, at most `LEASE_CHECK`
apart, each open queue renews its consumers' leases in Redis and gives back the entries of any
node whose lease ran out, which is how a node killed with SIGKILL loses its consumers' entries to the rest of their groups),
and the delivery policies' timer (`_wake_when_due`: at a queue's next due delay or delivery
deadline, which the policy scripts answer, it runs that queue's lease round early, so the delays
and ``delivery_timeout`` hold to the millisecond on the node that made them and within a lease
round on the others). The policies' clock is `RedisBackend.clock_ms`.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable

import anyio
import coredis.exceptions as rx
import msgpack
import trio

from qserve.backends.base import OnChange, QueueStatus, Replayed
from qserve.backends.faults import Faults
from qserve.backends.redis import scripts
from qserve.backends.redis.keys import (EVENT_PATTERN, REGISTRY, QueueKeys, registered_ref, registry_entry,
                                        tag_of_channel)
from qserve.backends.redis.link import Link, redis_error
from qserve.backends.redis.queue import DEDUP_LIMIT, RedisQueue
from qserve.backends.redis.url import parse_redis_url
from qserve.config import Config
from qserve.core.errors import (Conflict, InsufficientStorage, NotFound, QServeError, QueueFull, Unavailable,
                                Unsupported)
from qserve.core.events import QueueRef
from qserve.core.policy import Letter, replay_letter

__all__ = ["RedisBackend"]

log = logging.getLogger("qserve")

#: at most this many seconds between lease rounds, so a dead node's entries return within about
#: the lease plus this (a round is one small script per open queue)
LEASE_CHECK = 0.5
#: seconds between reconnection attempts of the event subscription: doubling up to the maximum
LISTEN_BACKOFF = (0.1, 5.0)


class RedisBackend:
    """Queues in Redis, served by this node. Trio thread only.

    Args:
        config: ``backend`` is the redis:// URL; ``redis_wait``, ``redis_wait_timeout`` and
            ``node_lease`` apply.
        nursery: runs the node's tasks (stopped with it).
        on_change: the watch service's wake-up, called for every queue's events.
        on_evict: ``(queue ref, consumer id)``: a consumer of this node was replaced by the same id
            on another node, or its lease expired: its session must close.
        wall_clock: unix seconds: the dedup window's clock (``dedup_window``), as the puts'
            timestamps.
    """

    fsync_mechanism = "redis"

    def __init__(self, config: Config, nursery: trio.Nursery, *, on_change: OnChange | None = None,
                 on_evict: Callable[[QueueRef, str], None] | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._nursery = nursery
        self._on_change = on_change
        self._on_evict = on_evict
        self._wall_clock = wall_clock
        self._anchor: tuple[float, float] | None = None   # `clock_ms`: (wall ms, trio clock) at first use
        self._wakes: dict[RedisQueue, int] = {}   # queue -> policy clock ms of its next due delay
        self._wakes_changed = trio.Event()
        self.target = parse_redis_url(config.backend)
        # the node's name in the consumers' records and logs; the short id tags its events
        self.node = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.link = Link(self.target, secrets.token_hex(4), wait_replicas=config.redis_wait,
                         wait_timeout=config.redis_wait_timeout)
        self._queues: dict[QueueRef, RedisQueue] = {}
        self._by_tag: dict[str, RedisQueue] = {}
        self._malformed_seen: set[str] = set()   # tags of queues whose channel carried a foreign message
        self._faults = Faults(log)   # the node's tasks' faults: the subscription, each queue's lease round
        self._opening: dict[QueueRef, trio.Lock] = {}   # queues being opened (bounded by requests)
        self._closed = False
        self._tasks: trio.Nursery | None = None   # the node's tasks, inside the client's lifetime

    @property
    def where(self) -> str:
        return self.target.where

    # -- start and the node's tasks -----------------------------------------------------------
    async def start(self) -> None:
        """Connect and check Redis; start the node's tasks.

        Raises: `Unavailable` with a one-line reason when Redis cannot be used."""
        self._tasks = await self._nursery.start(self._hold)
        try:
            await self.link.client.ping()
            await self._check_durability()
        except Exception as exc:
            err = redis_error(exc, self.where)
            if err is None:
                raise
            raise Unavailable(f"cannot use redis at {self.where}: {_why(exc)}") from None
        await self._tasks.start(self._listen)
        self._tasks.start_soon(self._leases)
        self._tasks.start_soon(self._wake_when_due)

    async def _check_durability(self) -> None:
        """Warn when Redis does not fsync every write: a 200 then means less (README table)."""
        try:
            found = await self.link.persistence()
        except Exception as exc:   # CONFIG may be renamed or denied (managed Redis): say so, go on
            if redis_error(exc, self.where) is None or "unknown command" in str(exc).lower() or "NOPERM" in str(exc):
                log.warning("redis at %s: cannot read its persistence settings (%s); a 200 is as durable "
                            "as that server's appendfsync makes it", self.where, _why(exc))
                return
            raise
        for where, settings in found:
            if settings.get("appendonly") != "yes" or settings.get("appendfsync") != "always":
                log.warning("redis at %s runs with appendonly %s, appendfsync %s: an acknowledged put can be "
                            "lost if Redis stops (use appendonly yes, appendfsync always)", where,
                            settings.get("appendonly", "?"), settings.get("appendfsync", "?"))

    async def _hold(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the client's connection pool open for the life of the nursery; the node's other
        tasks run inside it (reported as the nursery to start them in), so they stop first."""
        async with self.link.connected(), trio.open_nursery() as tasks:
            task_status.started(tasks)
            await trio.sleep_forever()

    async def _listen(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Every queue's channel, for the life of the nursery; reconnects with backoff."""
        delay = LISTEN_BACKOFF[0]
        while True:
            try:
                pubsub = self.link.client.pubsub(patterns=[EVENT_PATTERN], ignore_subscribe_messages=True,
                                                  retry_policy=None)
                async with pubsub:
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    delay = LISTEN_BACKOFF[0]
                    for queue in list(self._queues.values()):
                        queue.wake_all()   # what happened while the subscription was down
                    async for message in pubsub:
                        tag = tag_of_channel(message["channel"])
                        queue = self._by_tag.get(tag)
                        if queue is not None:
                            try:
                                queue.on_event(message["data"])
                            except ValueError as exc:
                                self._malformed(tag, message["data"], exc)
            except* anyio.ClosedResourceError:
                pass   # coredis closing the subscription's connection under it (a reset, or shutdown)
            except* (rx.RedisError, OSError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream):
                self.link.failed(f"redis at {self.where} is unreachable")
            except* Exception as group:
                # not Redis failing: a fault in the client library's subscription (or in this loop).
                # The node goes on serving (it would see no other node's puts until it subscribes
                # again); said once per kind of fault, with the traceback at debug level
                fault = group.exceptions[0]
                self._faults.failed("subscription", f"redis at {self.where}: the event subscription failed "
                                    f"({type(fault).__name__}: {str(fault)[:200]}); subscribing again", exc=group)
            await trio.sleep(delay)
            delay = min(delay * 2, LISTEN_BACKOFF[1])

    def _malformed(self, tag: str, data: bytes, exc: ValueError) -> None:
        """A message on a queue's event channel that no qserve node wrote: ignored; said once per
        queue (anybody may PUBLISH there; a flood must not flood the log)."""
        if tag not in self._malformed_seen:
            self._malformed_seen.add(tag)
            log.warning("redis at %s: ignored a message on %s:ev that no qserve node wrote (%s): %r; "
                        "further ones there are ignored silently", self.where, tag, exc, bytes(data[:60]))

    async def _leases(self) -> None:
        """Renew this node's consumers' leases and expire other nodes' lapsed ones, every third of
        the lease (at most `LEASE_CHECK` apart)."""
        while True:
            await trio.sleep(min(self.config.node_lease / 3, LEASE_CHECK))
            for queue in list(self._queues.values()):
                try:
                    await self._lease_round(queue)
                except QServeError:
                    break   # Redis is down (logged once by the link); try again next round

    async def _lease_round(self, queue: RedisQueue) -> None:
        """``queue``'s lease round. A failure that is not Redis being down (a key of the queue
        holding the wrong type, written by something else; a script error) does not end the
        node's task: it is said once, as one line, until a round of that queue succeeds again.

        Raises: `QServeError` when Redis is down or refuses (the link logged it)."""
        what = f"queue {queue.ref.name}: the lease round"
        try:
            await queue.lease()
        except QServeError:
            raise
        except Exception as exc:
            self._faults.failed(what, f"redis at {self.where}: {what} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                                "the node goes on and retries it every round", exc=exc)
        else:
            self._faults.ok(what)

    # -- the seam -----------------------------------------------------------------------------
    def declared(self, service: str) -> bool:
        return service in self.config.queues or service == self.config.root_service

    async def get(self, ref: QueueRef) -> RedisQueue:
        return await self._open(ref, create=self.config.auto_create or self.declared(ref.service))

    async def open_required(self, ref: QueueRef) -> RedisQueue:
        try:
            return await self._open(ref, create=True)
        except QServeError as exc:
            raise Unavailable(f"cannot open queue {ref.name}: {exc.reason}") from None

    async def create(self, service: str) -> None:
        for ref in (QueueRef(service), QueueRef(service, sink=True)):
            await self._open(ref, create=True)

    async def _open(self, ref: QueueRef, *, create: bool) -> RedisQueue:
        queue = self._queues.get(ref)
        if queue is not None:
            return queue
        lock = self._opening.setdefault(ref, trio.Lock())   # one open attempt per queue at a time
        try:
            async with lock:
                return self._queues.get(ref) or await self._open_now(ref, create=create)
        finally:
            if not lock.statistics().tasks_waiting:
                self._opening.pop(ref, None)

    async def _open_now(self, ref: QueueRef, *, create: bool) -> RedisQueue:
        if self.config.queues and not self.declared(ref.service):
            raise NotFound(f"no queue named {ref.name}")
        if len(self._queues) >= self.config.max_queues:   # a bound on this node's memory per queue
            raise InsufficientStorage(
                f"cannot create queue {ref.name}: the server holds its limit of {self.config.max_queues} queues")
        keys = QueueKeys(ref)
        if create:
            created = await self.link.run(scripts.CREATE, keys.tag, ())
            if created or ref.dlq:   # a dead-letter queue is created by the move that fills it
                await self._register(ref, keys)
            if created:
                log.info("queue %s created", ref.name)
            else:
                log.info("queue %s opened: %d entries", ref.name, await self._length(keys))
        else:
            try:
                exists = await self.link.client.hexists(keys.meta, "created")
            except Exception as exc:
                raise _as_error(exc, self.where) from None
            if not exists:
                raise NotFound(f"no queue named {ref.name} (the server runs with --no-auto-create; "
                               f"create it with: qserve stream create {ref.service})")
        queue = RedisQueue(ref, self.link, self.config, self.node, on_change=self._on_change,
                           wall_clock=self._wall_clock, clock_ms=self.clock_ms)
        queue.on_evict = self._on_evict
        queue.on_dead_letter = self._dead_lettered
        queue.on_wake = self._wake_at
        self._queues[ref] = queue
        self._by_tag[keys.tag] = queue
        return queue

    async def _length(self, keys: QueueKeys) -> int:
        try:
            return int(await self.link.client.xlen(keys.stream))
        except Exception as exc:
            raise _as_error(exc, self.where) from None

    async def _register(self, ref: QueueRef, keys: QueueKeys) -> None:
        try:
            await self.link.client.hset(REGISTRY, {keys.tag: registry_entry(ref)})
        except Exception as exc:
            raise _as_error(exc, self.where) from None

    async def registered(self) -> list[QueueRef]:
        """Every queue created in this Redis database (by any node), sorted."""
        try:
            found = await self.link.client.hgetall(REGISTRY)
        except Exception as exc:
            raise _as_error(exc, self.where) from None
        refs = [registered_ref(value) for value in found.values()]
        return sorted(refs, key=lambda ref: ref.order)

    async def open_declared(self) -> None:
        refs = [QueueRef(s, sink=sink) for s in self.config.queues for sink in (False, True)]
        if self.config.root_service:
            refs += [QueueRef(self.config.root_service), QueueRef(self.config.root_service, sink=True)]
        for ref in await self.registered():
            if not self.config.queues or self.declared(ref.service):
                refs.append(ref)
        for ref in refs:
            await self._open(ref, create=True)

    async def listing(self) -> list[QueueStatus]:
        found = []
        for ref in await self.registered():
            if self.config.queues and not self.declared(ref.service):
                continue
            queue = await self._open(ref, create=True)
            state, length, first, last, _now, consumers, groups = await self.link.run(
                scripts.STATE, queue.keys.tag, (), write=False)
            found.append(QueueStatus(ref, length=int(length), first_index=int(first), last_index=int(last),
                                     consumers=len(consumers), groups=len(groups)))
        return found

    async def replay(self, dlq: RedisQueue, indexes, now_ms: int) -> list[Replayed]:
        """`Backend.replay`: the dead letters read (`scripts.LETTERS`), then one `scripts.REPLAY`
        per queue they go back to, which appends them there, re-keys the dedup window and removes
        them from the dead-letter queue in one atomic step (the dead-letter queue shares the input
        queue's hash tag, so its Cluster slot). Two queues (input and sink letters in one request)
        are two steps: the first stands if the second is refused. A sink's letters on a Redis
        Cluster are refused (`Unsupported`): its slot is not the dead-letter queue's."""
        wanted = list(dict.fromkeys(indexes))
        rows = await self.link.run(scripts.LETTERS, dlq.keys.tag, wanted, write=False)
        found = {int(index): msgpack.unpackb(tags) for index, tags in rows}
        missing = [index for index in wanted if index not in found]
        if missing:
            raise NotFound(f"not in the dead-letter queue {dlq.ref.name}: {' '.join(map(str, missing))}")
        by_origin: dict[QueueRef, list[Letter]] = {}
        for index in wanted:
            letter = replay_letter(dlq.ref, index, found[index], now_ms)
            by_origin.setdefault(letter.origin, []).append(letter)
        if self.target.kind == "cluster" and any(ref.sink for ref in by_origin):
            raise Unsupported(f"{dlq.ref.name}: replaying into a sink is not supported on a Redis Cluster (the "
                              "sink's keys are in another slot); put the entry into the sink and delete it here")
        done: dict[int, Replayed] = {}
        for ref, letters in by_origin.items():
            origin = await self._open(ref, create=True)
            for replayed in await self._replay_into(dlq, origin, letters, now_ms):
                done[replayed.dlq_index] = replayed
        return [done[index] for index in wanted]

    async def _replay_into(self, dlq: RedisQueue, origin: RedisQueue, letters: list[Letter],
                           now_ms: int) -> list[Replayed]:
        """One `scripts.REPLAY`: ``letters`` back into ``origin``."""
        config = self.config
        args: list = [now_ms, round(origin.policy.dedup_window * 1000), DEDUP_LIMIT, config.max_length,
                      int(config.trim_oldest)]
        for letter in letters:
            args += [letter.index, msgpack.packb(letter.tags), letter.request_id]
        reply = await self.link.run(scripts.REPLAY, dlq.keys.tag, args, more_keys=(origin.keys.tag,))
        if reply == -2:
            raise Conflict(f"queue {origin.ref.name} has ended; no more puts (nothing replayed)")
        if reply == -3:
            raise QueueFull(f"queue {origin.ref.name} has no room for {len(letters)} more entries "
                            f"({config.max_length} at most; nothing replayed)", headers=[("Retry-After", "1")])
        if reply and reply[0] == -1:
            raise NotFound(f"not in the dead-letter queue {dlq.ref.name}: {' '.join(str(int(i)) for i in reply[1:])}")
        tags = {letter.index: letter.tags for letter in letters}
        out = []
        for index, new_index, priority in reply:
            letter_tags = tags[int(index)]
            origin.replayed_in(int(new_index), letter_tags)
            out.append(Replayed(int(index), origin.ref, int(new_index), letter_tags["requestId"], int(priority)))
        dlq.replayed_out()
        return out

    def wake_long_polls(self) -> None:
        for queue in self._queues.values():
            queue.gets.wake_all()

    def statistics(self) -> dict:
        """Per queue: this node's consumers and what its scripts' policies did (metrics)."""
        return {q.ref.name: {"consumers_here": len(q.consumers()), "dead_lettered": q.dead_lettered,
                             "timed_out": q.timed_out} for q in self._queues.values()}

    # -- delivery policies --------------------------------------------------------------------
    def clock_ms(self) -> int:
        """The policies' clock (unix ms) of every queue of this node: the wall clock read at the
        first call, advanced by trio's (monotonic) clock since, so a delay or a lease runs its
        length whatever the wall clock does meanwhile; nodes agree to within their wall clocks'
        difference at start."""
        if self._anchor is None:
            self._anchor = (self._wall_clock() * 1000, trio.current_time())
        wall, clock = self._anchor
        return round(wall + (trio.current_time() - clock) * 1000)

    def _wake_at(self, queue: RedisQueue, at_ms: int) -> None:
        """A script of ``queue`` said its next delay falls due at ``at_ms`` (policy clock)."""
        known = self._wakes.get(queue)
        if known is None or at_ms < known:
            self._wakes[queue] = at_ms
            self._wakes_changed.set()

    async def _wake_when_due(self) -> None:
        """At each queue's next due delay, run its lease round (which drops the due delays, hands
        back run-out deliveries and learns the next due time) and wake its watchers. Every lease
        round tells the due times, so a delay another node made is seen within `LEASE_CHECK`."""
        while True:
            now = self.clock_ms()
            due = [queue for queue, at in self._wakes.items() if at <= now]
            for queue in due:
                del self._wakes[queue]
                try:
                    await self._lease_round(queue)
                except QServeError:
                    pass   # Redis is down: the next lease round tells the due time again
            if due:
                continue
            wait = (min(self._wakes.values()) - now) / 1000 if self._wakes else math.inf
            self._wakes_changed = trio.Event()
            with trio.move_on_after(wait):
                await self._wakes_changed.wait()

    async def _dead_lettered(self, source: QueueRef, count: int) -> None:
        """A script of ``source`` moved ``count`` entries to the service's dead-letter queue: list
        it and wake its watchers here (other nodes learn it from its channel)."""
        ref = QueueRef(source.service, dlq=True)
        log.info("queue %s: %d entr%s moved to %s", source.name, count, "y" if count == 1 else "ies", ref.name)
        try:
            dlq = await self._open(ref, create=True)
        except QServeError as exc:
            log.error("queue %s: cannot open %s (its entries are there): %s", source.name, ref.name, exc.reason)
            return
        dlq.wake_all()

    def close_all(self) -> None:
        """Nothing to sync (Redis made every write durable before answering); wake what waits."""
        if not self._closed:
            self._closed = True
            for queue in self._queues.values():
                queue.gets.wake_all()


def _as_error(exc: Exception, where: str) -> Exception:
    err = redis_error(exc, where)
    return exc if err is None else err


def _why(exc: Exception) -> str:
    err = redis_error(exc, "")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if err is not None and "unreachable" in err.reason:
        return f"unreachable ({text[:160]})"
    return text[:200]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
