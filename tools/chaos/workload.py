"""The load `qserve chaos` puts on the servers under test, and the settings and counters of a run.

Strategy: producers, consumers in groups and an admin task work on one queue through
`qserve.client.QueueClient`, every call and delivery recorded in a `history.History`. With several
nodes (a Redis backend) each task has a client per node and a home node (task number modulo the
nodes), so the load is spread over them: a producer or the admin whose node is unreachable moves
to the next node; of the consumers, the even ones stay on their home node (their watch reconnects
when it is back, so the entries they held return to their group through the node lease or their
reattach), the odd ones move to the next node as soon as their link drops (the same consumer id
attached elsewhere replaces the stale one). The workload never stops on its own: the run cancels it.

With ``--policies`` (`POLICY_OPTIONS` on every server) it also: tags a few puts ``poison=1``, which
every consumer refuses (negative commits only, so they must end in the dead-letter queue); re-sends
some puts that have a requestId, with the same payload and tags (a retry right after the answer,
which must be a duplicate answer, and retries of a put whose answer was lost); negatively commits
half of the refused entries with a small ``delay``; makes one consumer (the last, with two or more)
a holder that never commits, so the lease (``delivery_timeout``) hands its entries on; and tags a
few puts ``slow=1`` (0.2%, and each producer's first after the rounds), which every consumer holds
until one comes back with ``lastCode=timeout`` (then it is processed as usual). `Workload.run`
then keeps the load on after the rounds, without kills, deliberate disconnects or other holding,
for a lease and 1.5 s and until a lease has run out (at most `_STALLED` more), and lets the consumers go on after the
producers stop until no poison entry is left in the queue (at most 2 minutes, or until they get
nothing for 4 leases); `drain` reads the dead-letter queue too at the end.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack, asynccontextmanager
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from qserve.client import QueueClient, QueueError
from qserve.wire import names

from .history import History
from .records import POISON, TIMEOUT_CODE, payload_for

__all__ = ["Settings", "Counters", "Workload", "drain", "SERVICE", "TOKEN",
           "new_history", "POLICY_OPTIONS", "MAX_DELIVERIES", "DELIVERY_TIMEOUT"]

SERVICE = "chaos"
TOKEN = "chaos-token"
_TAG_VALUES = ("a", "b", "c")

MAX_DELIVERIES = 3
DELIVERY_TIMEOUT = 2.0        # seconds: a few, far above a commit's latency (milliseconds)
#: the servers' flags with --policies; the backoff waits 0.05 s then 0.1 s, the dedup window
#: spans any run
POLICY_OPTIONS = ("--max-deliveries", str(MAX_DELIVERIES), "--retry-backoff", "0.05,2,0.5",
                  "--dedup-window", "10m", "--delivery-timeout", f"{DELIVERY_TIMEOUT:g}")
_POISON_SHARE = 0.03          # of the puts
#: a few puts are "slow": consumers hold one (no commit, no negative commit) until it comes back
#: with lastCode=timeout, so its lease runs out in every group: with the holder alone that may
#: never happen, since another group's commit deletes an entry for every group, and another
#: group's negative commit releases it in every group too. Few, as each blocks a window slot of
#: every group for a lease: a share of the puts, and each producer's first put once the kills end
SLOW = ("slow", "1")
_SLOW_SHARE = 0.002
_RETRY_SHARE = 0.1            # of the acknowledged puts with a requestId: sent again at once
_UNKNOWN_RETRIES = 3          # a put with a requestId whose answer was lost is sent again up to this
_DUPLICATE = "x-qserve-duplicate"   # a put answered with its requestId's original index
_SETTLE_LIMIT = 120.0        # seconds the consumers get at most to dead-letter the poison...
_STALLED = 4 * DELIVERY_TIMEOUT     # ...and without a delivery (a lease, and backoffs, are shorter)


@dataclass
class Settings:
    rounds: int = 5
    seconds: float = 2.0
    producers: int = 3
    consumers: int = 4
    groups: int = 2
    seed: int = 0
    segment_bytes: int = 64 * 1024
    data_dir: Path | None = None
    port: int = 0                 # 0: free loopback ports picked at the start (node i: port + i)
    backend: str = ""             # a Redis the user runs ("": the local segment log, or --kill-redis)
    nodes: int = 1
    kill_redis: bool = False      # chaos starts its own Redis and kills its primary too
    replica: bool = False         # ... a primary, a replica and three Sentinels
    flush: bool = False           # empty the user's Redis database first
    node_lease: float = 2.0
    policies: bool = False        # the servers run POLICY_OPTIONS; the workload exercises them

    @property
    def on_redis(self) -> bool:
        return bool(self.backend) or self.kill_redis


@dataclass
class Counters:
    kill_kinds: dict[str, int] = field(default_factory=dict)
    disconnects: int = 0
    moves: int = 0                # a producer, consumer or the admin went over to another node
    torn_tails: int = 0
    restart_seconds: float = 0.0
    verify_problems: list[str] = field(default_factory=list)


def new_history(settings: Settings) -> History:
    """The run's history, its checker told the policies the servers run with."""
    if not settings.policies:
        return History(queue=SERVICE)
    return History(queue=SERVICE, max_deliveries=MAX_DELIVERIES, delivery_timeout=DELIVERY_TIMEOUT)


class Workload:
    """Producers, consumers and the admin task over the nodes' queue ``urls``; every call and
    delivery is recorded in ``history``."""

    def __init__(self, urls: list[str], history: History, counters: Counters, settings: Settings,
                 rng: random.Random) -> None:
        self.urls = urls
        self.history = history
        self.counters = counters
        self.settings = settings
        self.seed = rng.randrange(2**32)
        self.recent: list[int] = []         # recently acknowledged indexes, for deletes and truncates
        self.quiet = False                  # with policies, after the rounds: no holding, no disconnects

    async def run(self, rounds: Callable[[], Awaitable[None]]) -> None:
        """Run every task while ``rounds()`` runs, then stop them. With policies: a lease and a
        half more without kills, then the consumers alone until no poison entry is left."""
        async with trio.open_nursery() as consumers:
            for c in range(self.settings.consumers):
                consumers.start_soon(self.consumer, c)
            async with trio.open_nursery() as others:
                for p in range(self.settings.producers):
                    others.start_soon(self.producer, p)
                others.start_soon(self.admin)
                await rounds()
                if self.settings.policies:
                    self.quiet = True
                    await trio.sleep(DELIVERY_TIMEOUT + 1.5)
                    await self._a_lease_ran_out()
                others.cancel_scope.cancel()
            if self.settings.policies:
                with trio.move_on_after(_SETTLE_LIMIT):
                    await self._poison_gone()
            consumers.cancel_scope.cancel()

    async def _a_lease_ran_out(self) -> None:
        """Return once a delivery came back after its lease ran out, or after `_STALLED` seconds
        (the report then shows none). The slow puts make one within a lease and 1.5 s as a rule;
        a run in CI once ended that phase before any came back."""
        with trio.move_on_after(_STALLED):
            while not self.history.timed_out:
                await trio.sleep(0.05)

    async def _poison_gone(self) -> None:
        """Return once a scan of the queue finds no poison entry, or once the consumers got no
        delivery for `_STALLED` seconds (the checker then reports what is left)."""
        async with QueueClient(self.urls[0], token=TOKEN, timeout=10.0, retries=5) as q:
            seen, since = len(self.history.seen), trio.current_time()
            while any(e.tags.get(POISON[0]) == POISON[1] for e in await _scan(q)):
                if len(self.history.seen) != seen:
                    seen, since = len(self.history.seen), trio.current_time()
                elif trio.current_time() - since > _STALLED:
                    return
                await trio.sleep(0.2)

    @asynccontextmanager
    async def _clients(self, **kw):
        """One client per node, with the same identity; closed at the end."""
        async with AsyncExitStack() as stack:
            yield [await stack.enter_async_context(QueueClient(url, token=TOKEN, timeout=3.0, retries=0, **kw))
                   for url in self.urls]

    def _move(self, node: int) -> int:
        if len(self.urls) == 1:
            return node
        self.counters.moves += 1
        return (node + 1) % len(self.urls)

    async def producer(self, p: int) -> None:
        rng = random.Random(f"{self.seed}-p{p}")
        history = self.history
        policies = self.settings.policies
        node = p % len(self.urls)
        slow_in_quiet = False
        async with self._clients(max_connections=1) as clients:
            for n in range(1, 2**62):
                put_id = f"p{p}-{n}"
                tags = {"kind": rng.choice(_TAG_VALUES), "producer": str(p)}
                if rng.random() < 0.5:
                    tags["requestId"] = put_id
                if policies and rng.random() < _POISON_SHARE:
                    tags[POISON[0]] = POISON[1]
                elif policies and (rng.random() < _SLOW_SHARE or (self.quiet and not slow_in_quiet)):
                    tags[SLOW[0]] = SLOW[1]
                    slow_in_quiet = self.quiet
                priority = rng.choice((1, 2, 3)) if rng.random() < 0.2 else 0
                history.put_started(put_id, p, tags, priority)
                retries = _UNKNOWN_RETRIES if policies and "requestId" in tags else 0
                for attempt in range(1 + retries):
                    if attempt:
                        history.put_retried(put_id)
                    try:
                        index = await self._put(clients[node], put_id, tags, priority)
                        break
                    except QueueError as exc:     # unknown: it may or may not be stored
                        if exc.status == 0:
                            node = self._move(node)
                        await trio.sleep(rng.uniform(0.02, 0.1))
                else:
                    continue
                if retries and rng.random() < _RETRY_SHARE:
                    history.put_retried(put_id)   # as if its answer had been lost: one entry still
                    try:
                        await self._put(clients[node], put_id, tags, priority)
                    except QueueError:
                        pass
                self.recent.append(index)
                del self.recent[:-200]
                await trio.sleep(rng.uniform(0, 0.004))

    async def _put(self, q: QueueClient, put_id: str, tags: dict[str, str], priority: int) -> int:
        """Send the put ``put_id`` once and record its answer. Returns its index. Through the
        client's request plumbing, not `QueueClient.put`, to read ``X-Qserve-Duplicate``.

        Raises:
            QueueError: no 200 (status 0: no answer at all).
        """
        query = list(tags.items()) + ([("_priority_", str(priority))] if priority else [])
        response = await q._call("POST", query, body=payload_for(put_id), retry="before-response")
        try:
            index = int(response.body)
            request_id = response.headers[names.REQUEST_ID_HEADER.lower()]
        except (ValueError, KeyError):
            raise QueueError(response.status, "malformed put answer from server") from None
        self.history.put_acked(put_id, index, duplicate=response.headers.get(_DUPLICATE) == "1")
        if "requestId" in tags and request_id != put_id:
            self.history.anomaly(f"put {put_id} answered with request id {request_id!r}")
        return index

    async def consumer(self, c: int) -> None:
        rng = random.Random(f"{self.seed}-c{c}")
        group = f"g{c % self.settings.groups}"
        roams = c % 2 == 1 and len(self.urls) > 1
        policies = self.settings.policies
        holder = policies and self.settings.consumers >= 2 and c == self.settings.consumers - 1
        node = c % len(self.urls)
        history = self.history
        async with self._clients(user=f"c{c}", group=group) as clients:
            conns = [_track_connections(q, history) for q in clients]
            while True:
                held = 0
                lost = []
                q, conn = clients[node], conns[node]

                def on_link(up: bool, why: str, lost=lost) -> None:
                    if not up:
                        lost.append(why)

                async with q.watch(window=rng.randint(1, 8), reconnect_delay=0.05, ping_interval=1.0,
                                   on_link=on_link) as w:
                    while True:
                        if roams and lost:
                            node = self._move(node)
                            break                # its node went away: go over to the next one
                        entry = None
                        with trio.move_on_after(0.5):
                            entry = await w.__anext__()
                        if entry is None:
                            if held and not holder:
                                break            # the window may be full of held entries: let them go
                            continue
                        received = trio.current_time()
                        history.delivered(entry.index, entry.data, entry.tags, conn_start=conn[0], group=group,
                                          consumer=f"c{c}")
                        if holder:
                            held += 1            # never committed: the lease hands it on
                            continue
                        delay = None
                        if entry.tags.get(POISON[0]) == POISON[1]:
                            action = 0.85        # refused, always
                        elif entry.tags.get(SLOW[0]) == SLOW[1] and entry.tags.get("lastCode") != TIMEOUT_CODE:
                            continue             # held until its lease runs out (no disconnect for it)
                        else:
                            action = rng.random()
                            if self.quiet and action >= 0.9:
                                action = 0.0     # no holding while the leases are being watched
                        if action < 0.8:
                            await self._remove(q, "commit", (entry.index,), by=f"c{c}", group=group,
                                               conn=conn, received=received)
                        elif action < 0.9:
                            if delay is None and policies and rng.random() < 0.5:
                                delay = rng.uniform(0.05, 0.3)
                            history.negative_started(entry.index, by=f"c{c}")
                            try:
                                await q.negative(entry.index, "500", "chaos", delay=delay)
                                history.negative_acked(delayed=delay is not None)
                            except QueueError:
                                pass
                        else:
                            held += 1            # neither: it goes back at the disconnect
                        if rng.random() < 0.03 and not self.quiet:
                            break                # a deliberate disconnect
                self.counters.disconnects += 1
                await trio.sleep(rng.uniform(0, 0.1))

    async def _remove(self, q: QueueClient, kind: str, indexes: tuple[int, ...] = (), below: int = 0, *,
                      by: str = "", group: str = "", conn: list[int] | None = None, received: float = 0.0) -> None:
        """A commit (``by`` a consumer of ``group``, ``conn`` its connection tracker, ``received`` the
        time its delivery came), delete or truncate, recorded."""
        op = self.history.removal_started(kind, indexes, below, by=by, group=group,
                                          conn_start=conn[0] if conn else 0)
        try:
            if kind == "commit":
                await q.commit(indexes)
            elif kind == "delete":
                await q.delete(indexes)
            else:
                await q.truncate(below)
        except QueueError:
            return                                # unknown: it may or may not have happened
        self.history.removal_acked(op, held=trio.current_time() - received if received else 0.0)

    async def admin(self) -> None:
        rng = random.Random(f"{self.seed}-admin")
        async with self._clients() as clients:
            while True:
                await trio.sleep(rng.uniform(0.05, 0.3))
                if len(self.recent) < 20:
                    continue
                q = rng.choice(clients)
                if rng.random() < 0.04 and not self.quiet:
                    below = sorted(self.recent)[len(self.recent) // 4]
                    await self._remove(q, "truncate", below=below)
                else:
                    picks = tuple(sorted(set(rng.sample(self.recent, rng.randint(1, 3)))))
                    await self._remove(q, "delete", picks)


def _track_connections(q: QueueClient, history: History) -> list[int]:
    """Make ``q``'s watch record, in the returned one-item list, the tick taken just before the
    handshake of its current connection (the checker's proof that a frame was sent after a commit)."""
    conn = [0]
    opener = q._open_websocket

    def open_websocket(resource: str):
        @asynccontextmanager
        async def tracked():
            started = history.tick()
            async with opener(resource) as ws:
                conn[0] = started
                yield ws
        return tracked()

    q._open_websocket = open_websocket
    return conn


async def _scan(q: QueueClient) -> list:
    """Every entry in ``q``'s queue (non-deleting gets, pending entries included)."""
    out: list = []
    start = 0
    while True:
        entries = await q.get(index=start, length=500, auto_delete=False)
        if not entries:
            return out
        out += entries
        start = entries[-1].index + 1


async def drain(url: str, history: History, *, dead_letters: bool = False) -> None:
    """Record every entry still in the queue and, with ``dead_letters``, in its dead-letter queue
    (``url/dlq``). With it, first wait (bounded) until the server has no consumer left and two
    scans in a row agree: a consumer's leaving can move an entry to the dead-letter queue, and one
    seen in both, or in neither, would be a false finding."""
    async with QueueClient(url, token=TOKEN, timeout=10.0, retries=5) as q, \
            QueueClient(url.rstrip("/") + "/dlq", token=TOKEN, timeout=10.0, retries=5) as dlq:
        if dead_letters:
            with trio.move_on_after(10.0):
                while (await q.attributes()).get("consumers.stats.total", "0") != "0":
                    await trio.sleep(0.05)
        entries, dead = await _scan(q), []
        if dead_letters:
            dead = await _scan(dlq)
            for _ in range(20):
                again, dead_again = await _scan(q), await _scan(dlq)
                if _indexes(again) == _indexes(entries) and _indexes(dead_again) == _indexes(dead):
                    break
                entries, dead = again, dead_again
                await trio.sleep(0.1)
    for e in entries:
        history.remaining(e.index, e.data, e.tags)
    for e in dead:
        history.dead_letter(e.index, e.data, e.tags)


def _indexes(entries: list) -> list[int]:
    return [e.index for e in entries]
