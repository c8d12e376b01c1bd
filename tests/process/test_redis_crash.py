"""Crash tests of the Redis backend with real processes (#15): a qserve node killed with SIGKILL
mid-load, and redis-server killed with SIGKILL mid-load and restarted.

What is checked, each with several concurrent HTTP clients (qserve's own client) and a bounded
number of puts:

- Two `qserve serve` processes on one Redis (``--node-lease 2``); producers put through node A, a
  watcher on A (manual commit, window `WINDOW`) holds entries, a member of the same group watches
  through node B. After ``kill -9`` of A: every put A answered 200 is read back through B by index
  and by requestId (nothing acknowledged lost), and the entries A's consumer held reach the member
  on B within the lease + 1 s (B's lease upkeep expires A's consumer).
- One node on a Redis of the test's own (append-only file, ``appendfsync always``); ``kill -9`` of
  redis-server mid-load: every put answered 200 before the kill is there after the restart (same
  port and directory); puts and reads during the outage are 503 with a one-line reason; the node
  serves again without a restart of its own, new puts get indexes above every index handed out
  before, also after truncating everything and restarting Redis once more.
- The node's log says once that Redis is unreachable and once that it answers again, however
  many requests failed in between, and shows no traceback.

Waits are on conditions (frames, puts answered, log lines), each bounded; every process is stopped
by its pid (`ServerProcess.kill`, `RedisServer.kill9`/`stop`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from qserve.client import ConnectError, QueueClient, QueueError, Watcher

from ..helpers.process import ServerProcess

LIMIT = 60            # seconds for any one test
LEASE = 2.0           # --node-lease of the nodes under test
PRODUCERS = 6         # concurrent HTTP clients putting
PUTS_EACH = 100       # bound on each producer's puts
KILL_AFTER = 120      # puts answered 200 before the kill (well short of PRODUCERS * PUTS_EACH: mid-load)
WINDOW = 5            # the watcher on node A holds this many entries when A is killed
WIDE = 1000           # the window of the member on node B: room for every entry of the test
OUTAGE_REQUESTS = 10  # requests of each kind during an outage


@dataclass(frozen=True, slots=True)
class Put:
    """A put the server answered 200."""

    index: int
    request_id: str
    data: bytes


class Progress:
    """Conditions the test waits on, re-checked whenever a task reports progress (no polling)."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def report(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()


@dataclass
class Load:
    """Producers putting through one node: what was answered 200, how each producer ended."""

    progress: Progress
    acked: list[Put] = field(default_factory=list)
    failures: list[QueueError] = field(default_factory=list)   # one per producer that met a failure
    finished: int = 0                                           # producers that ended

    async def produce(self, node: ServerProcess, service: str, worker: int) -> None:
        """Up to `PUTS_EACH` puts, each with its own requestId; ends at the first failure (not retried)."""
        try:
            async with _client(node, service, retries=0) as q:
                for i in range(PUTS_EACH):
                    request_id, data = f"w{worker}-{i}", f"entry {worker}-{i}".encode()
                    try:
                        index, _ = await q.put(data, {"requestId": request_id})
                    except QueueError as exc:   # ConnectError too: the node is gone
                        self.failures.append(exc)
                        return
                    self.acked.append(Put(index, request_id, data))
                    self.progress.report()
        finally:
            self.finished += 1
            self.progress.report()


def _client(node: ServerProcess, service: str, **kwargs) -> QueueClient:
    return QueueClient(f"{node.url}/api/predict/{service}", token=node.token, **kwargs)


async def _frames(watcher: Watcher, got: list[int], progress: Progress) -> None:
    """Record the index of every frame the watcher receives (its consumer holds it: no commit)."""
    async for frame in watcher:
        got.append(frame.index)
        progress.report()


async def _start(*processes) -> None:
    for process in processes:
        await trio.to_thread.run_sync(process.start)


async def _log_line(node: ServerProcess, condition: Callable[[list[str]], bool], timeout: float = 10.0) -> None:
    """Wait (bounded) until the node's log, read by `ServerProcess`'s thread, meets ``condition``:
    a line written before the reply reaches the test may still be in the pipe."""
    with trio.move_on_after(timeout):
        while not condition(node.lines):
            await trio.sleep(0.02)   # the lines are appended by a thread: nothing to wait on but them
    assert condition(node.lines), "\n".join(node.lines)


def _outages(node: ServerProcess, where: str) -> tuple[list[str], list[str]]:
    """The node's log lines saying Redis became unreachable, and that it answers again."""
    down = [line for line in node.lines if "unreachable (requests get 503 until it answers again)" in line]
    up = [line for line in node.lines if line.endswith(f"redis at {where} answers again")]
    return down, up


def _no_traceback(*nodes: ServerProcess) -> None:
    for node in nodes:
        assert not any("Traceback" in line for line in node.lines), "\n".join(node.lines)


def _one_line_503(exc: QueueError, where: str) -> None:
    assert not isinstance(exc, ConnectError), exc
    assert exc.status == 503, exc
    assert "\n" not in exc.reason and f"redis at {where}" in exc.reason and "unreachable" in exc.reason, exc


async def _read_back(q: QueueClient, acked: list[Put]) -> None:
    """Every acknowledged put, by index and by requestId, with its payload."""
    for put in acked:
        by_index = await q.get(index=put.index, length=1, auto_delete=False)
        assert [(e.index, e.data) for e in by_index] == [(put.index, put.data)], put
        by_id = await q.get(request_id=put.request_id, auto_delete=False)
        assert [(e.index, e.data) for e in by_id] == [(put.index, put.data)], put


# -- a qserve node killed ---------------------------------------------------------------------------

async def test_a_node_killed_mid_load_loses_no_acknowledged_put_and_its_consumer_s_entries_return(
        redis_url, tmp_path, service):
    a, b = (ServerProcess(tmp_path / name, "--backend", redis_url, "--node-lease", f"{LEASE:g}")
            for name in ("a", "b"))
    try:
        await _start(a, b)
        with trio.fail_after(LIMIT):
            progress = Progress()
            load = Load(progress)
            held_a: list[int] = []   # what node A's consumer was given (and never committed)
            got_b: list[int] = []
            async with _client(a, service, user="on-a") as qa, _client(b, service, user="on-b") as qb, \
                    qa.watch(window=WINDOW, reconnect_delay=LIMIT) as wa, trio.open_nursery() as nursery:
                nursery.start_soon(_frames, wa, held_a, progress)
                for worker in range(PRODUCERS):
                    nursery.start_soon(load.produce, a, service, worker)
                await progress.until(lambda: len(held_a) == WINDOW)
                async with qb.watch(window=WIDE) as wb, trio.open_nursery() as on_b:
                    on_b.start_soon(_frames, wb, got_b, progress)
                    await progress.until(lambda: len(load.acked) >= KILL_AFTER and got_b)
                    assert load.finished == 0   # mid-load: every producer is still putting

                    before_kill = set(got_b)
                    killed_at = trio.current_time()
                    await trio.to_thread.run_sync(a.kill)
                    with trio.move_on_after(LEASE + 1):
                        await progress.until(lambda: set(held_a) <= set(got_b))
                    back_after = trio.current_time() - killed_at
                    assert set(held_a) <= set(got_b), (
                        f"node A's consumer held {sorted(held_a)}; node B's member got "
                        f"{sorted(set(held_a) & set(got_b))} of them in {back_after:.2f} s after the kill")

                    await progress.until(lambda: load.finished == PRODUCERS)
                    acked = {put.index for put in load.acked}
                    await progress.until(lambda: acked <= set(got_b))   # the group got every entry
                    attrs = await qb.attributes()   # node A's consumer left the group; B's remains
                    listed = [v for k, v in attrs.items() if k.startswith("consumers.list.")]
                    assert attrs["consumers.stats.total"] == "1" and len(listed) == 1, attrs
                    assert ".on-b," in listed[0], listed
                    on_b.cancel_scope.cancel()
                nursery.cancel_scope.cancel()   # A's watcher would redial the dead node
            assert len(held_a) == WINDOW and len(got_b) == len(set(got_b)), (held_a, got_b)
            assert not set(held_a) & before_kill   # they came to B because A's lease ran out
            assert len(load.acked) < PRODUCERS * PUTS_EACH
            assert len(load.failures) == PRODUCERS
            assert all(isinstance(exc, ConnectError) for exc in load.failures), load.failures
            assert len({put.index for put in load.acked}) == len(load.acked)   # no index handed out twice
            async with _client(b, service) as reader:
                await _read_back(reader, load.acked)
        _no_traceback(a, b)
    finally:
        a.kill()
        b.kill()


# -- redis-server killed --------------------------------------------------------------------------

async def test_redis_killed_mid_load_keeps_every_acknowledged_put_and_indexes_keep_growing(
        fresh_redis_server, tmp_path, service):
    redis = fresh_redis_server
    await _start(redis)
    where = redis.url.removeprefix("redis://")
    node = ServerProcess(tmp_path / "node", "--backend", redis.url)
    try:
        await _start(node)
        with trio.fail_after(LIMIT):
            progress = Progress()
            load = Load(progress)
            async with _client(node, service, retries=0) as q, trio.open_nursery() as nursery:
                for worker in range(PRODUCERS):
                    nursery.start_soon(load.produce, node, service, worker)
                await progress.until(lambda: len(load.acked) >= KILL_AFTER)
                assert load.finished == 0   # mid-load
                await trio.to_thread.run_sync(redis.kill9)
                await progress.until(lambda: load.finished == PRODUCERS)
                assert len(load.acked) < PRODUCERS * PUTS_EACH and len(load.failures) == PRODUCERS
                for exc in load.failures:   # each producer's first put after the kill
                    _one_line_503(exc, where)
                acked = list(load.acked)
                assert len({put.index for put in acked}) == len(acked)

                # during the outage: reads and writes are 503, one line each
                for request in (lambda: q.put(b"during the outage"), lambda: q.get(index=1, auto_delete=False),
                                lambda: q.get(request_id=acked[0].request_id, auto_delete=False)):
                    try:
                        await request()
                    except QueueError as exc:
                        _one_line_503(exc, where)
                    else:
                        raise AssertionError("a request during the outage was answered")

                await trio.to_thread.run_sync(redis.restart)
                # the node serves again, on its own: every acknowledged put is there, new puts go on
                await _read_back(q, acked)
                high = max(put.index for put in acked)
                after = [(await q.put(f"after {i}".encode()))[0] for i in range(5)]
                assert after == sorted(after) and after[0] > high, (after, high)

                # truncate everything, restart Redis (a crash again): the next index is still greater
                await q.truncate(after[-1] + 1)
                assert (await q.attributes())["stream.length"] == "0"
                await trio.to_thread.run_sync(redis.restart)
                index, _ = await q.put(b"after truncating everything")
                assert index > after[-1], (index, after)
                assert [(e.index, e.data) for e in await q.get(length=10, auto_delete=False)] == \
                    [(index, b"after truncating everything")]
        await _log_line(node, lambda lines: len(_outages(node, where)[1]) == 2)
        down, up = _outages(node, where)
        assert len(down) == 2 and len(up) == 2, "\n".join(node.lines)   # one of each per outage
        _no_traceback(node)
    finally:
        node.kill()


async def test_an_outage_is_one_log_line_when_it_starts_and_one_when_it_ends(fresh_redis_server, tmp_path, service):
    """However many requests fail while Redis is down (puts, reads, counts, attributes, commits, a
    watcher's session and its handshakes), the node logs the outage once and its end once; each
    failed request is a one-line 503."""
    redis = fresh_redis_server
    await _start(redis)
    where = redis.url.removeprefix("redis://")
    node = ServerProcess(tmp_path / "node", "--backend", redis.url)
    try:
        await _start(node)
        with trio.fail_after(LIMIT):
            progress = Progress()
            watched: list[int] = []   # a watcher (manual commit) on the node through the outage
            async with _client(node, service, retries=0) as q, _client(node, service) as w, \
                    w.watch(window=WINDOW, reconnect_delay=0.1) as watcher, trio.open_nursery() as nursery:
                nursery.start_soon(_frames, watcher, watched, progress)
                first, _ = await q.put(b"before")
                await progress.until(lambda: watched == [first])
                await trio.to_thread.run_sync(redis.kill9)
                requests = [lambda: q.put(b"during"), lambda: q.get(index=first, auto_delete=False),
                            lambda: q.count(), lambda: q.attributes(), lambda: q.commit(first)]
                for _ in range(OUTAGE_REQUESTS):
                    for request in requests:
                        try:
                            await request()
                        except QueueError as exc:
                            _one_line_503(exc, where)
                        else:
                            raise AssertionError("a request during the outage was answered")
                await _log_line(node, lambda lines: _outages(node, where)[0])
                down, up = _outages(node, where)
                assert len(down) == 1 and not up, "\n".join(node.lines)

                await trio.to_thread.run_sync(redis.restart)
                for i in range(OUTAGE_REQUESTS):
                    assert (await q.put(b"after"))[0] > first
                    assert [e.data for e in await q.get(index=first, auto_delete=False)] == [b"before"]
                    assert await q.count() == 2 + i
                # the watcher's session ended with the outage (its handshakes were refused meanwhile);
                # reconnected, it is given its uncommitted entry again
                await progress.until(lambda: watched.count(first) == 2)
                nursery.cancel_scope.cancel()
        await _log_line(node, lambda lines: _outages(node, where)[1])
        down, up = _outages(node, where)
        assert len(down) == 1 and len(up) == 1, "\n".join(node.lines)
        assert node.lines.index(down[0]) < node.lines.index(up[0])
        _no_traceback(node)
    finally:
        node.kill()
