"""The load `qserve chaos` puts on the servers under test, and the settings and counters of a run.

Strategy: producers, consumers in groups and an admin task work on one queue through
`qserve.client.QueueClient`, every call and delivery recorded in a `history.History`. With several
nodes (a Redis backend) each task has a client per node and a home node (task number modulo the
nodes), so the load is spread over them: a producer or the admin whose node is unreachable moves
to the next node; of the consumers, the even ones stay on their home node (their watch reconnects
when it is back, so the entries they held return to their group through the node lease or their
reattach), the odd ones move to the next node as soon as their link drops (the same consumer id
attached elsewhere replaces the stale one). The workload never stops on its own: the run cancels it.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from qserve.client import QueueClient, QueueError

from .history import History, payload_for

__all__ = ["Settings", "Counters", "Workload", "drain", "SERVICE", "TOKEN"]

SERVICE = "chaos"
TOKEN = "chaos-token"
_TAG_VALUES = ("a", "b", "c")


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

    def start(self, nursery: trio.Nursery) -> None:
        for p in range(self.settings.producers):
            nursery.start_soon(self.producer, p)
        for c in range(self.settings.consumers):
            nursery.start_soon(self.consumer, c)
        nursery.start_soon(self.admin)

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
        node = p % len(self.urls)
        async with self._clients(max_connections=1) as clients:
            for n in range(1, 2**62):
                put_id = f"p{p}-{n}"
                tags = {"kind": rng.choice(_TAG_VALUES), "producer": str(p)}
                if rng.random() < 0.5:
                    tags["requestId"] = put_id
                priority = rng.choice((1, 2, 3)) if rng.random() < 0.2 else 0
                history.put_started(put_id, p, tags, priority)
                try:
                    index, request_id = await clients[node].put(payload_for(put_id), tags, priority=priority)
                except QueueError as exc:         # unknown: it may or may not be stored
                    if exc.status == 0:
                        node = self._move(node)
                    await trio.sleep(rng.uniform(0.02, 0.1))
                    continue
                history.put_acked(put_id, index)
                if "requestId" in tags and request_id != put_id:
                    history.anomaly(f"put {put_id} answered with request id {request_id!r}")
                self.recent.append(index)
                del self.recent[:-200]
                await trio.sleep(rng.uniform(0, 0.004))

    async def consumer(self, c: int) -> None:
        rng = random.Random(f"{self.seed}-c{c}")
        group = f"g{c % self.settings.groups}"
        roams = c % 2 == 1 and len(self.urls) > 1
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
                            if held:
                                break            # the window may be full of held entries: let them go
                            continue
                        history.delivered(entry.index, entry.data, entry.tags, conn_start=conn[0], group=group)
                        action = rng.random()
                        if action < 0.8:
                            await self._remove(q, "commit", (entry.index,))
                        elif action < 0.9:
                            try:
                                await q.negative(entry.index, "500", "chaos")
                                history.negative_acked()
                            except QueueError:
                                pass
                        else:
                            held += 1            # neither: it goes back at the disconnect
                        if rng.random() < 0.03:
                            break                # a deliberate disconnect
                self.counters.disconnects += 1
                await trio.sleep(rng.uniform(0, 0.1))

    async def _remove(self, q: QueueClient, kind: str, indexes: tuple[int, ...] = (), below: int = 0) -> None:
        op = self.history.removal_started(kind, indexes, below)
        try:
            if kind == "commit":
                await q.commit(indexes)
            elif kind == "delete":
                await q.delete(indexes)
            else:
                await q.truncate(below)
        except QueueError:
            return                                # unknown: it may or may not have happened
        self.history.removal_acked(op)

    async def admin(self) -> None:
        rng = random.Random(f"{self.seed}-admin")
        async with self._clients() as clients:
            while True:
                await trio.sleep(rng.uniform(0.05, 0.3))
                if len(self.recent) < 20:
                    continue
                q = rng.choice(clients)
                if rng.random() < 0.04:
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


async def drain(url: str, history: History) -> None:
    """Record every entry still in the queue (non-deleting gets, pending entries included)."""
    async with QueueClient(url, token=TOKEN, timeout=10.0, retries=5) as q:
        start = 0
        while True:
            entries = await q.get(index=start, length=500, auto_delete=False)
            if not entries:
                return
            for e in entries:
                history.remaining(e.index, e.data, e.tags)
            start = entries[-1].index + 1
