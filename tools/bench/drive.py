"""Requests driven against a server under test, shared by the benchmarks (not a public API).

What is here:
- `LoadResult`, `load_run`: N connections sending requests back to back for a fixed time (after a
  warm-up), recording the latency of every request completed in the measured window; `on_each`
  runs one task per connection.
- `put_many` (fill a queue as fast as possible) and `attributes` (a queue's ``?_attrs_=true``).
- `CommitBatcher`: a watcher's manual commits, batched (one ``PUT ?_indexes_=`` in flight).

Everything talks to 127.0.0.1 only, through the minimal client of `client`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Sequence

import h11
import trio

from .client import TOKEN, HTTPConn, ProtocolError, auth_headers, request_bytes
from .lib import CpuMeter, ServerProc, per_item_us, progress, summary


# ------------------------------------------------------------------------------------ load run

@dataclasses.dataclass
class LoadResult:
    requests: int           # completed inside the measured window
    seconds: float          # measured window
    errors: int             # unexpected statuses / protocol errors (whole run)
    latencies_ns: list[int]
    cpu: dict = dataclasses.field(default_factory=dict)   # CpuMeter percentages over the window
    first_error: str | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        s = summary(self.latencies_ns)
        return {"requests": self.requests, "seconds": round(self.seconds, 3), "req_per_s": round(self.rate, 1),
                "p50_ms": round(s["p50_ms"], 3), "p99_ms": round(s["p99_ms"], 3), "max_ms": round(s["max_ms"], 3),
                "errors": self.errors, "first_error": self.first_error, **self.cpu,
                "server_us_per_req": per_item_us(self.cpu.get("server_cpu_pct"), self.rate),
                "client_us_per_req": per_item_us(self.cpu.get("client_cpu_pct"), self.rate)}


async def on_each(conns: Sequence[HTTPConn], worker: Callable[[HTTPConn], Awaitable[None]]) -> None:
    """Run ``worker(conn)`` for every connection at once; close them all when done (or cancelled)."""
    try:
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(worker, conn)
    finally:
        for conn in conns:
            await trio.aclose_forcefully(conn.stream)


async def load_run(port: int, make_request: Callable[[int, int], bytes], *, connections: int,
                   seconds: float, warmup: float, ok_status: frozenset[int] = frozenset({200}),
                   parser: str = "fast", label: str = "", server: ServerProc | None = None,
                   check: Callable[[int, bytes, bytes], str | None] | None = None,
                   stop_on_status: frozenset[int] = frozenset()) -> LoadResult:
    """`connections` keep-alive connections, each sending `make_request(conn_no, seq)` back to back
    for `warmup + seconds`; requests that complete inside the last `seconds` are counted and their
    latencies (send start -> response fully read) kept. A status in `stop_on_status` ends that
    connection's loop early (e.g. 204 when a queue being drained is empty)."""
    conns = [await HTTPConn.open(port, parser) for _ in range(connections)]
    clock = time.perf_counter_ns
    t_begin = clock()
    t_start = t_begin + int(warmup * 1e9)
    t_end = t_start + int(seconds * 1e9)
    latencies: list[int] = []
    state = {"errors": 0, "first_error": None, "t_last": t_start}
    meter = CpuMeter(server)

    async def worker(n: int, conn: HTTPConn) -> None:
        seq = 0
        record = latencies.append
        while True:
            raw = make_request(n, seq)
            seq += 1
            t0 = clock()
            try:
                status, head, body = await conn.request(raw)
            except (ProtocolError, trio.BrokenResourceError, OSError, h11.ProtocolError) as exc:
                state["errors"] += 1
                state["first_error"] = state["first_error"] or f"{type(exc).__name__}: {exc}"
                return
            t1 = clock()
            if status in stop_on_status:
                return
            problem = None
            if status not in ok_status:
                problem = f"status {status}: {body[:80]!r}"
            elif check is not None:
                problem = check(status, head, body)
            if problem:
                state["errors"] += 1
                state["first_error"] = state["first_error"] or problem
            if t_start <= t1 <= t_end:
                record(t1 - t0)
                state["t_last"] = t1
            if t1 >= t_end:
                return

    async def reporter() -> None:
        last_n, last_t = 0, clock()
        started = False
        while True:
            await trio.sleep(1.0)
            now = clock()
            if not started and now >= t_start:
                started = True
            n = len(latencies)
            if started:
                progress(f"  {label}: {(n - last_n) / ((now - last_t) / 1e9):,.0f} req/s"
                         + (f", errors {state['errors']}" if state["errors"] else ""))
            last_n, last_t = n, now

    async def start_marker() -> None:
        await trio.sleep((t_start - clock()) / 1e9)
        meter.start()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reporter)
            nursery.start_soon(start_marker)
            async with trio.open_nursery() as workers:
                for i, c in enumerate(conns):
                    workers.start_soon(worker, i, c)
            nursery.cancel_scope.cancel()
    finally:
        for c in conns:
            await trio.aclose_forcefully(c.stream)
    if not meter.started:   # ended during the warm-up (e.g. a drained queue)
        meter.start()
    if clock() >= t_end:
        window = seconds
    else:  # every connection stopped early: measure up to the last completed request
        window = max(state["t_last"] - t_start, 0) / 1e9
    return LoadResult(len(latencies), window, state["errors"], latencies, meter.stop(window or None),
                      state["first_error"])


# --------------------------------------------------------------------------- qserve helpers

async def put_many(port: int, service: str, count: int, *, connections: int = 32, body: bytes = b"x" * 100,
                   token: str = TOKEN, label: str = "prefill",
                   tags: str = "") -> float:
    """Put `count` entries as fast as possible; returns the seconds it took."""
    target = f"/api/predict/{service}" + (f"?{tags}" if tags else "")
    raw = request_bytes("POST", target, port, body=body, headers=auth_headers(token))
    remaining = [count]
    errors: list[str] = []
    t0 = time.perf_counter()

    async def worker():
        conn = await HTTPConn.open(port)
        try:
            while remaining[0] > 0:
                remaining[0] -= 1
                status, _, rbody = await conn.request(raw)
                if status != 200:
                    errors.append(f"{status} {rbody[:80]!r}")
                    return
        finally:
            await conn.aclose()

    async def reporter():
        while True:
            await trio.sleep(2.0)
            done = count - max(remaining[0], 0)
            progress(f"  {label}: {done}/{count} put ({done / (time.perf_counter() - t0):,.0f}/s)")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reporter)
        async with trio.open_nursery() as workers:
            for _ in range(min(connections, count)):
                workers.start_soon(worker)
        nursery.cancel_scope.cancel()
    if errors:
        raise RuntimeError(f"{label}: put failed: {errors[0]}")
    return time.perf_counter() - t0


async def attributes(port: int, service: str, token: str = TOKEN) -> dict:
    conn = await HTTPConn.open(port)
    try:
        status, _, body = await conn.request(
            request_bytes("GET", f"/api/predict/{service}?_attrs_=true", port, headers=auth_headers(token)))
    finally:
        await conn.aclose()
    if status != 200:
        raise RuntimeError(f"attributes: {status} {body[:80]!r}")
    return json.loads(body)


# ------------------------------------------------------------------------------ watch commits

class CommitBatcher:
    """Manual commits of one watcher: every index received since the last commit was sent goes into
    the next ``PUT /api/predict/SERVICE?_indexes_=i,j,..``, which is sent as soon as the previous one
    is answered (one commit in flight). Not thread-safe; one trio task calls `add`, `run` is a task.

    Args:
        conn: anything with ``await conn.request(raw) -> (status, head, body)`` (an `HTTPConn`).
        headers: the token and the watcher's Uid / Gid headers.
        tally: counts ``commits`` (requests) and ``committed`` (indexes), and has ``error(msg)``
            (called for a non-200 answer).
        on_commit: called after each answered commit (e.g. to check whether a run is done).
    """

    def __init__(self, conn, port: int, service: str, headers: Sequence[tuple[str, str]], tally,
                 on_commit: Callable[[], None] | None = None) -> None:
        self.conn = conn
        self.port = port
        self.target = f"/api/predict/{service}?_indexes_="
        self.headers = headers
        self.tally = tally
        self.on_commit = on_commit
        self._pending: list[int] = []
        self._wake = trio.Event()

    def add(self, index: int) -> None:
        """Queue `index` for the next commit."""
        self._pending.append(index)
        self._wake.set()

    async def run(self) -> None:
        """Commit until cancelled. Raises what ``conn.request`` raises."""
        while True:
            if not self._pending:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            batch = self._pending[:]
            self._pending.clear()
            raw = request_bytes("PUT", self.target + "%2C".join(map(str, batch)), self.port, headers=self.headers)
            self.tally.commits += 1
            status, _, body = await self.conn.request(raw)
            if status != 200:
                self.tally.error(f"commit: {status} {body[:80]!r}")
            self.tally.committed += len(batch)
            if self.on_commit is not None:
                self.on_commit()
