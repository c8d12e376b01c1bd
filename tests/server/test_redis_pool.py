"""The Redis backend's connection pools (`backends.redis.pool`) against a real `redis-server`: a
connection that breaks while a command holds it gives its slot back.

The break is the one a fail-over or a killed primary causes under ``--redis-wait``: a script's
WAIT holds its connection (no replica answers, so WAIT waits its full timeout), and the server
closes that connection (``CLIENT KILL ID``, once ``CLIENT LIST`` shows it waiting). With two
slots, coredis's own pool is dry after two such breaks (the next command finds no connection);
qserve's keeps both slots through many. Each wait is on a condition and bounded.
"""

from __future__ import annotations

import coredis
import coredis.exceptions
import coredis.pool
import pytest
from coredis.connection import TCPLocation
from coredis.retry import NoRetryPolicy
import trio

from qserve.backends.redis import pool as qpool
from qserve.backends.redis.link import Link, redis_error
from qserve.backends.redis.url import parse_redis_url

LIMIT = 30       # seconds for each test
SLOTS = 2        # the pool's size: small, so that a lost slot shows at once
BREAKS = 6       # connections broken while held (three times the slots)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def _break_a_held_connection(client: coredis.Redis, killer: coredis.Redis) -> BaseException | None:
    """Run a script under WAIT 1 (it holds its connection for WAIT's 5 s) and close that connection
    from the server's side while it waits; what the script raised (None: it returned). A script
    that finds no connection raises without waiting, and nothing is closed."""
    script = client.register_script("return redis.call('incr', KEYS[1])")
    raised: list[BaseException | None] = []

    async def held() -> None:
        try:
            with client.ensure_replication(1, 5000):
                await script(keys=["qserve-pool-test"], args=[])
            raised.append(None)
        except Exception as exc:   # noqa: BLE001 - what it was is the test's to check
            raised.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(held)
        while not raised:   # until the server shows the WAIT (bounded by the test's fail_after)
            waiting = [c for c in await killer.client_list() if c.get("cmd") == "wait"]
            if waiting:
                await killer.client_kill(identifier=int(waiting[0]["id"]))
                break
            await trio.sleep(0.01)
    return raised[0]


async def _slots_left(client: coredis.Redis, breaks: int, killer: coredis.Redis) -> list[bool]:
    """Break ``breaks`` held connections; after each, can a PING still get a connection?"""
    answers = []
    for _ in range(breaks):
        assert await _break_a_held_connection(client, killer) is not None   # the break did reach it
        try:   # a dry pool fails after its pool_timeout
            answers.append(await client.ping() == b"PONG")
        except TimeoutError:
            answers.append(False)
    return answers


@pytest.mark.parametrize("pool_cls", [qpool.ConnectionPool, coredis.pool.ConnectionPool], ids=["qserve", "coredis"])
async def test_a_connection_broken_while_held_gives_its_slot_back(redis_url, pool_cls):
    with trio.fail_after(LIMIT):
        port = _port(redis_url)
        # no retry, as the Sentinel's clients (a retry would hide the break behind a second attempt)
        client = coredis.Redis(host="127.0.0.1", port=port, connection_pool_cls=pool_cls, max_connections=SLOTS,
                               pool_timeout=0.5, stream_timeout=10, connect_timeout=2, retry_policy=NoRetryPolicy())
        killer = coredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        async with client, killer:
            answers = await _slots_left(client, BREAKS, killer)
            slots = len(client.connection_pool._available_connections._queue)
    if pool_cls is qpool.ConnectionPool:
        assert answers == [True] * BREAKS and slots == SLOTS
    else:   # the leak this pool fixes: when this fails, coredis fixed it and `pool` can go
        assert answers[SLOTS - 1:] == [False] * (BREAKS - SLOTS + 1) and slots == 0, (answers, slots)


async def test_a_dry_pool_is_an_error_in_bounded_time_not_a_hang(redis_url):
    """`Link`'s bound on the wait for a slot: with every slot held, the next command fails after
    ``pool_timeout`` with an error `redis_error` makes a 503."""
    from qserve.backends.redis.link import redis_error
    with trio.fail_after(LIMIT):
        port = _port(redis_url)
        client = coredis.Redis(host="127.0.0.1", port=port, connection_pool_cls=qpool.ConnectionPool,
                               max_connections=1, pool_timeout=0.5, stream_timeout=10, connect_timeout=2)
        async with client:
            async with trio.open_nursery() as nursery:
                async def hold() -> None:
                    await client.blpop(["qserve-pool-empty"], timeout=3)
                nursery.start_soon(hold)
                while not client.connection_pool._available_connections.empty():
                    await trio.sleep(0.01)
                start = trio.current_time()
                with pytest.raises(Exception) as caught:
                    await client.ping()
                assert trio.current_time() - start < 2
                assert redis_error(caught.value, "here").http_status == 503
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("url", "kind"), [
    ("redis://127.0.0.1:6390/0", qpool.ConnectionPool),
    ("redis+sentinel://127.0.0.1:26390/main/0", qpool.SentinelConnectionPool),
    ("redis+cluster://127.0.0.1:7390", qpool.ClusterConnectionPool),
])
def test_every_kind_of_link_uses_a_pool_that_keeps_its_slots(url, kind):
    """Building a `Link` connects to nothing; its client's pool is the fixed one, bounded in size."""
    link = Link(parse_redis_url(url), "node-a")
    assert type(link.client.connection_pool) is kind
    assert link.client.connection_pool.timeout is not None


@pytest.mark.parametrize("pool_cls", [qpool.SentinelConnectionPool, coredis.pool.SentinelConnectionPool],
                         ids=["qserve", "coredis"])
async def test_a_connection_that_cannot_be_made_gives_its_slot_back(pool_cls):
    """The Sentinel pool's other leak: making a connection asks the Sentinels for the primary, and
    while none answers each command fails. With two slots, coredis's pool is dry after two such
    failures (the third waits out ``timeout`` for a slot); qserve's fails each one the same way."""
    with trio.fail_after(LIMIT):
        nobody = trio.socket.socket()   # a port nothing listens on: bound, never listening
        await nobody.bind(("127.0.0.1", 0))
        with nobody:
            sentinel = coredis.Sentinel([TCPLocation("127.0.0.1", nobody.getsockname()[1])],
                                        sentinel_kwargs={"connect_timeout": 1, "stream_timeout": 1})
            client = sentinel.primary_for("nobody", connection_pool_class=pool_cls, max_connections=SLOTS,
                                          timeout=0.5)   # a Sentinel client retries nothing
            failures = []
            async with sentinel, client:
                for _ in range(BREAKS):
                    try:
                        await client.ping()
                        failures.append("answered")
                    except TimeoutError:
                        failures.append("no slot")
                    except coredis.exceptions.RedisError:
                        failures.append("no primary")
    if pool_cls is qpool.SentinelConnectionPool:
        assert failures == ["no primary"] * BREAKS
    else:   # when this fails, coredis fixed it and `pool` can go
        assert failures == ["no primary"] * SLOTS + ["no slot"] * (BREAKS - SLOTS), failures
