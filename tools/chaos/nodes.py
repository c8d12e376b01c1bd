"""`qserve chaos` on Redis: several qserve nodes on one Redis, nodes and Redis primaries killed at random.

Strategy: N `qserve serve --backend URL --node-lease L` children (`server.ChaosServer`, short lease,
each on a loopback port of its own) share the queue; the workload (`workload.Workload`) spreads its
tasks over them. Once per round, at a random moment, the main task SIGKILLs a node and restarts it
after a random delay of up to 1.5 leases (so sometimes its consumers' entries come back through the
lease, sometimes through their reattach), or, with ``--kill-redis``, the Redis primary that chaos
itself runs (`redisd.RedisSetup`: restarted on the same directory and port; with ``--replica`` the
Sentinels promote the replica first and the nodes, on ``redis+sentinel://`` with ``--redis-wait 1``,
follow). The checker judges the combined history as for one server: an entry held by a killed node's
consumer is delivered again within its group (at-least-once redelivery), nothing may be lost,
resurrected, duplicated, reordered or corrupted.

A Redis the user names (``--backend``) is used only if its database is empty, or emptied with
``--flush`` (`prepare_backend`); chaos never stops it. Every process chaos starts is stopped by its
pid at the end, also when the run fails.
"""

from __future__ import annotations

import random
import time
from functools import partial

import trio

from qserve.backends.redis.link import Link, redis_error
from qserve.backends.redis.url import parse_redis_url

from .history import History
from .redisd import RedisSetup
from .report import say, summarize
from .server import ChaosServer, free_port
from .workload import POLICY_OPTIONS, SERVICE, TOKEN, Counters, Settings, Workload, drain, new_history

__all__ = ["run_nodes", "prepare_backend", "Refused", "BackendError"]

LOG_TAIL = 15   # lines of each node's log printed when a run fails


class Refused(Exception):
    """The user's Redis holds data and ``--flush`` was not given; the message is one line."""


class BackendError(Exception):
    """The user's Redis cannot be used (unreachable, refused the credentials); one line."""


async def prepare_backend(url: str, *, flush: bool) -> int:
    """Check that the database of ``url`` is empty (every primary of a cluster), or empty it with
    ``flush``. Returns how many keys were flushed. Raises `Refused` or `BackendError`."""
    target = parse_redis_url(url)
    link = Link(target, "chaos")
    try:
        async with link.connected():
            client = link.client
            if target.kind == "cluster":
                keys = 0
                for node in client.primaries:
                    async with node:
                        keys += await node.dbsize()
            else:
                keys = await client.dbsize()
            if keys and flush:
                await client.flushdb()
    except Exception as exc:      # coredis's task group may wrap it
        for leaf in _leaves(exc):
            if redis_error(leaf, target.where) is not None:
                text = str(leaf).strip().splitlines()[0][:200] if str(leaf).strip() else type(leaf).__name__
                raise BackendError(f"cannot use redis at {target.where}: {text}") from None
        raise
    if keys and not flush:
        raise Refused(f"redis at {target.where} holds {_keys(keys)}; chaos needs an empty database "
                      f"(--flush empties it first)")
    return keys


def _keys(n: int) -> str:
    return "1 key" if n == 1 else f"{n} keys"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def run_nodes(settings: Settings) -> dict:
    """The whole run in one trio loop; returns the summary (`report.summarize`)."""
    history = new_history(settings)
    counters = Counters(kill_kinds={"node": 0, "redis": 0} if settings.kill_redis else {"node": 0})
    rng = random.Random(settings.seed)
    began = time.monotonic()
    setup = RedisSetup(settings.data_dir / "redis", replica=settings.replica) if settings.kill_redis else None
    url = setup.url if setup else settings.backend
    options = ("--backend", url, "--node-lease", f"{settings.node_lease:g}")
    if settings.replica:
        options += ("--redis-wait", "1")
    if settings.policies:
        options += POLICY_OPTIONS
    nodes = [ChaosServer(port=settings.port + i if settings.port else free_port(), token=TOKEN,
                         options=options, name=f"node {i + 1}") for i in range(settings.nodes)]
    try:
        if setup is None:
            flushed = await prepare_backend(url, flush=settings.flush)
            if flushed:
                say(f"flushed {_keys(flushed)} from {parse_redis_url(url).where}")
        else:
            await setup.start()
        for node in nodes:
            await node.start()
        say(f"seed {settings.seed}: {settings.rounds} rounds x {settings.seconds:g}s, "
            f"{settings.producers} producers, {settings.consumers} consumers in {settings.groups} groups, "
            f"{len(nodes)} nodes on ports {', '.join(str(n.port) for n in nodes)} "
            f"(lease {settings.node_lease:g}s), redis at {parse_redis_url(url).where}"
            + (f" ({'primary, replica, 3 sentinels' if settings.replica else 'one primary'}, killed too)"
               if setup else ""))
        urls = [f"{node.url}/api/predict/{SERVICE}" for node in nodes]
        workload = Workload(urls, history, counters, settings, rng)
        try:
            await workload.run(partial(_rounds, nodes, setup, settings, history, counters, rng))
            await drain(urls[0], history, dead_letters=settings.policies)
        except Exception:
            for node in nodes:   # the run failed mid-way: why a node did not answer is in its log
                say(f"{node.name} (port {node.port}), the end of its log:\n{node.log_tail(LOG_TAIL)}")
            raise
    finally:
        with trio.CancelScope(shield=True):
            statuses = [(node, await node.stop()) for node in nodes]
            if setup is not None:
                await setup.stop()
    for node, status in statuses:
        if status not in (0, None):
            counters.verify_problems.append(f"{node.name}'s graceful stop exited with status {status}:\n"
                                            f"{node.log_tail(15)}")
    redis_kills = setup.kills if setup else 0
    redis_restarts = sum(s.starts - 1 for s in setup.servers) if setup else 0
    return summarize(history.check(), counters, settings, time.monotonic() - began,
                     kills=sum(n.kills for n in nodes) + redis_kills,
                     restarts=sum(n.starts - 1 for n in nodes) + redis_restarts, verify=False, backend=url)


async def _rounds(nodes: list[ChaosServer], setup: RedisSetup | None, settings: Settings, history: History,
                  counters: Counters, rng: random.Random) -> None:
    lease = settings.node_lease
    for number in range(1, settings.rounds + 1):
        t0 = trio.current_time()
        end = t0 + settings.seconds
        await trio.sleep_until(t0 + rng.uniform(0.1, 0.9) * settings.seconds)
        killed_at = trio.current_time() - t0
        if setup is not None and rng.random() < 0.5:
            delay = rng.uniform(0, 0.5)
            primary, writable, back = await setup.kill_primary(delay)
            # holds live in Redis; only an outage near a node lease (a fail-over) may end them
            history.killed(holds_lost=setup.replica or back >= lease / 2)
            counters.kill_kinds["redis"] += 1
            counters.restart_seconds += back
            what = (f"killed the redis primary ({primary.name}, port {primary.port}) at {killed_at:.2f}s, "
                    + (f"replica promoted after {writable:.2f}s, the killed server an online replica after {back:.2f}s"
                       if setup.replica else f"restarted after {back:.2f}s"))
        else:
            victim = rng.randrange(len(nodes))
            node = nodes[victim]
            delay = rng.uniform(0, 1.5 * lease)
            node.kill()
            history.killed()
            await trio.sleep(delay)
            took = await node.start()
            counters.kill_kinds["node"] += 1
            counters.restart_seconds += took
            what = (f"killed {node.name} (port {node.port}) at {killed_at:.2f}s, restarted after "
                    f"{delay + took:.2f}s")
        say(f"round {number}/{settings.rounds}: {what}; "
            f"{sum(p.ack is not None for p in history.puts.values())} puts acknowledged, "
            f"{len(history.seen)} deliveries so far")
        await trio.sleep_until(max(end, trio.current_time()))
