"""Parts of `watch` (not a public API): the WebSocket consumers and the end-to-end peak.

- `Tally`, `consumer`, `run_consumers`: the watch consumers of one scenario (auto or manual commit,
  one group), see the `watch` docstring.
- `e2e_peak`: the end-to-end peak load of one commit mode - closed-loop producers and one consumer
  at the same time; its received/s is what "half of peak load" of the latency runs is half of.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import trio_websocket

from qserve.wire.protobuf import decode_frame
from qserve.wire.names import PROTOBUF

from . import drive, lib as bl
from .ws import LeanWebSocket

GROUP = "bench-group"
BODY = b"x" * 100


@dataclass
class Tally:
    """Shared by the consumers of one scenario (one trio thread: no locks needed)."""
    expected: int                      # entries to receive (throughput) or 0 (latency: open ended)
    manual: bool
    received: int = 0
    committed: int = 0
    duplicates: int = 0
    errors: int = 0
    first_error: str | None = None
    per_consumer: list[int] = field(default_factory=list)
    commits: int = 0                   # commit requests sent
    outside: int = 0                   # latency: entries put during the warm-up (not counted)
    seen: set[int] = field(default_factory=set)
    latencies_ns: list[int] = field(default_factory=list)
    received_at: dict[int, int] = field(default_factory=dict)   # latency: index -> receive time (ns)
    measure_from_ns: int = 1 << 62     # latency: only entries put in [from, to) are counted
    measure_to_ns: int = 1 << 62
    on_receive: Callable[[], None] | None = None   # called after each new entry (peak: the backlog cap)
    done: trio.Event = field(default_factory=trio.Event)

    def error(self, msg: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or msg

    def check_done(self) -> None:
        if self.expected and self.received >= self.expected and (not self.manual or self.committed >= self.expected):
            self.done.set()


def fresh_service(kind: str, mode: str, window: int) -> str:
    """A queue of its own for each scenario, so one scenario's leftovers never reach the next."""
    return f"{kind}-{uuid.uuid4().hex[:8]}-{mode}-w{window}"


def ws_target(service: str, window: int, auto: bool) -> str:
    return f"/api/predict/{service}?_watch_=true&_index_=0&_window_={window}&_auto_commit_={'true' if auto else 'false'}"


def ws_url(port: int, service: str, window: int, auto: bool) -> str:
    return f"ws://{bl.LOCALHOST}:{port}" + ws_target(service, window, auto)


def identity(uid: str, token: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", token.encode()), (b"X-EAS-QueueService-Uid", uid.encode()),
            (b"X-EAS-QueueService-Gid", GROUP.encode()), (b"Accept", PROTOBUF.encode())]


async def consumer(n: int, port: int, service: str, window: int, auto: bool, tally: Tally, token: str,
                   latency: bool, ws_client: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """One watch consumer; `ws_client` is "lean" (`ws`) or "trio-websocket" (the library client)."""
    uid = f"consumer{n}"
    clock = time.perf_counter_ns
    tally.per_consumer.append(0)
    commit_headers = [("Authorization", token), ("X-EAS-QueueService-Uid", uid), ("X-EAS-QueueService-Gid", GROUP)]

    async with contextlib.AsyncExitStack() as stack:
        if ws_client == "lean":
            ws = await LeanWebSocket.connect(port, ws_target(service, window, auto), identity(uid, token))
            stack.push_async_callback(ws.aclose)
        else:
            ws = await stack.enter_async_context(trio_websocket.open_websocket_url(
                ws_url(port, service, window, auto), extra_headers=identity(uid, token)))
        get_message = ws.get_message
        conn = await bl.HTTPConn.open(port) if not auto else None
        committer = (drive.CommitBatcher(conn, port, service, commit_headers, tally, on_commit=tally.check_done)
                     if conn is not None else None)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                if committer is not None:
                    nursery.start_soon(committer.run)
                while True:
                    message = await get_message()
                    if message is None:
                        raise ConnectionError(f"the server closed the watch ({ws.close_code})")
                    t1 = clock()
                    frame = decode_frame(message)
                    index = frame.index
                    if index in tally.seen:
                        tally.duplicates += 1
                    else:
                        tally.seen.add(index)
                        tally.received += 1
                        tally.per_consumer[n] += 1
                        if tally.on_receive is not None:
                            tally.on_receive()
                    if latency:
                        t0 = int(frame.tags.get("t0", "0"))
                        if tally.measure_from_ns <= t0 < tally.measure_to_ns:
                            tally.latencies_ns.append(t1 - t0)
                            tally.received_at[index] = t1
                        else:
                            tally.outside += 1
                    if committer is not None:
                        committer.add(index)
                    else:
                        tally.check_done()
        finally:
            if conn is not None:
                await trio.aclose_forcefully(conn.stream)


async def run_consumers(port: int, service: str, consumers: int, window: int, auto: bool, tally: Tally,
                        token: str, *, latency: bool, until, server: bl.ServerProc, label: str,
                        ws_client: str, polled: Callable[[], float | None] | None = None) -> dict:
    """Start the consumers, await `until()` (which returns when the scenario is over), stop them.
    ``polled``: the server's idle-poll seconds so far (qserve's /metrics), read where its CPU is, so
    that the result has ``polled_s`` too (over the same window)."""
    t0 = time.perf_counter()
    meter = bl.CpuMeter(server).start()
    polled0 = polled() if polled is not None else None
    result: dict = {}

    async def reporter():
        last, last_t = 0, time.perf_counter()
        while True:
            await trio.sleep(1.0)
            now = time.perf_counter()
            progress_note = f", committed {tally.committed}" if tally.manual else ""
            bl.progress(f"  {label}: {tally.received} received ({(tally.received - last) / (now - last_t):,.0f}/s)"
                        f"{progress_note}")
            last, last_t = tally.received, now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reporter)
        for i in range(consumers):
            await nursery.start(consumer, i, port, service, window, auto, tally, token, latency, ws_client)
        await until()
        t1 = time.perf_counter()
        result["seconds"] = t1 - t0
        result.update(meter.stop())
        polled1 = polled() if polled0 is not None else None
        if polled1 is not None:
            result["polled_s"] = polled1 - polled0
        nursery.cancel_scope.cancel()
    return result


async def e2e_peak(port: int, token: str, *, window: int, auto: bool, server: bl.ServerProc, seconds: float,
                   warmup: float, ws_client: str, connections: int = 16, max_backlog: int = 500) -> dict:
    """Peak end-to-end load of one commit mode: `connections` keep-alive connections put entries back
    to back (closed loop) into a fresh queue while one consumer (window `window`) receives - and, in
    manual mode, commits - them. After `warmup` s, puts answered and entries received are counted for
    `seconds` s; received/s is the peak. A put is not started while `max_backlog` entries are put (or
    being put) but not yet received, so the backlog stays bounded even if the producers are faster
    than the consumer: then the cap sets the pace ("cap waits" > 0) and received/s is the rate the
    consumer sustains while the server also takes the puts."""
    mode = "auto" if auto else "manual"
    service = fresh_service("peak", mode, window)
    label = f"e2e peak {mode} commit, window {window}, {connections} put connections"
    tally = Tally(expected=0, manual=not auto)
    raw = bl.request_bytes("POST", f"/api/predict/{service}", port, body=BODY, headers=bl.auth_headers(token))
    st = {"acked": 0, "errors": 0, "first_error": None, "cap_waits": 0}
    room = trio.Semaphore(max_backlog)   # one token per entry put (or being put) and not yet received
    tally.on_receive = room.release
    window_stats: dict = {}

    async def worker(conn: bl.HTTPConn) -> None:
        while True:
            if room.value == 0:
                st["cap_waits"] += 1
            await room.acquire()
            status, _, body = await conn.request(raw)
            st["acked"] += 1
            if status != 200:
                st["errors"] += 1
                st["first_error"] = st["first_error"] or f"put: {status} {body[:80]!r}"
                return

    async def until() -> None:
        conns = [await bl.HTTPConn.open(port) for _ in range(connections)]
        try:
            async with trio.open_nursery() as nursery:
                for c in conns:
                    nursery.start_soon(worker, c)
                await trio.sleep(warmup)
                meter = bl.CpuMeter(server).start()
                t0, rec0, ack0, waits0 = time.perf_counter(), tally.received, st["acked"], st["cap_waits"]
                backlog0 = ack0 - rec0
                await trio.sleep(seconds)
                wall = time.perf_counter() - t0
                rec1, ack1 = tally.received, st["acked"]
                window_stats.update(meter.stop(wall), seconds=wall, received=rec1 - rec0, puts=ack1 - ack0,
                                    backlog_start=backlog0, backlog_end=ack1 - rec1,
                                    cap_waits=st["cap_waits"] - waits0)
                nursery.cancel_scope.cancel()
        finally:
            for c in conns:
                await trio.aclose_forcefully(c.stream)
        # every answered put must still arrive (and, manual, be committed); bounded wait
        with trio.move_on_after(10.0):
            while tally.received < st["acked"] or (tally.manual and tally.committed < tally.received):
                await trio.sleep(0.01)

    await run_consumers(port, service, 1, window, auto, tally, token, latency=False, until=until,
                        server=server, label=label, ws_client=ws_client)
    w = window_stats
    received_per_s = w["received"] / w["seconds"]
    row = {"mode": mode, "window": window, "consumers": 1, "put_connections": connections,
           "max_backlog": max_backlog, "seconds": round(w["seconds"], 3),
           "puts_per_s": round(w["puts"] / w["seconds"], 1), "received_per_s": round(received_per_s, 1),
           "backlog_start": w["backlog_start"], "backlog_end": w["backlog_end"], "cap_waits": w["cap_waits"],
           "commits": tally.commits, "duplicates": tally.duplicates,
           "errors": st["errors"] + tally.errors, "first_error": st["first_error"] or tally.first_error,
           "server_cpu_pct": w["server_cpu_pct"], "client_cpu_pct": w["client_cpu_pct"],
           "other_cpu_pct": w["other_cpu_pct"],
           "server_us_per_entry": bl.per_item_us(w["server_cpu_pct"], received_per_s)}
    if tally.received < st["acked"]:
        row["errors"] += 1
        row["first_error"] = row["first_error"] or f"{st['acked'] - tally.received} put entries not received"
    bl.progress(f"{label}: {row['received_per_s']:,.0f} received/s, {row['puts_per_s']:,.0f} puts/s, "
                f"backlog {row['backlog_start']} -> {row['backlog_end']}, cap waits {row['cap_waits']}, "
                f"errors {row['errors']}" + (f" ({row['first_error']})" if row["errors"] else ""))
    return row


def render_peak(rows: list[dict]) -> str:
    return bl.table([["peak", r["mode"], r["window"], r["consumers"], r["put_connections"],
                      bl.fmt_num(r["puts_per_s"]), bl.fmt_num(r["received_per_s"]), r["backlog_end"],
                      r["cap_waits"], f"{bl.fmt_num(r['server_cpu_pct'])}%", bl.fmt_num(r["server_us_per_entry"]),
                      f"{bl.fmt_num(r['client_cpu_pct'])}%", f"{bl.fmt_num(r['other_cpu_pct'])}%", r["errors"]]
                     for r in rows],
                    ["load", "commit", "window", "consumers", "put conns", "puts/s", "received/s", "backlog",
                     "cap waits", "srv cpu", "srv us/entry", "cli cpu", "other cpu", "errors"])
