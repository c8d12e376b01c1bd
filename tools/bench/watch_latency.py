"""The put -> receive latency runs of `watch` (not a public API) and their floor.

- `latency_run`: an open-loop producer at a fixed rate (`open_loop`) and one watch consumer; every
  entry carries its put's send time, so each frame's latency is measured end to end.
- `add_floors`: the same rates against the bare trio+h11 server of `bare` (`bare_round_trips`): the
  round trip no queue server can beat on this machine, next to each latency row.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import trio

from . import drive, lib as bl
from .bare import bare_server_proc
from .watch_parts import BODY, Tally, fresh_service, run_consumers


async def open_loop(port: int, *, rate: float, seconds: float, warmup: float, connections: int,
                    request, answered, window=None) -> int:
    """Requests at a fixed rate (one due every 1/rate s, on up to `connections` keep-alive
    connections): ``request(t0)`` builds each from its send time (perf_counter ns),
    ``answered(t0, status, body)`` sees each answer, ``window(from_ns, to_ns)`` learns the measured
    span (after `warmup`) before the first request. Returns how many went out > 1 ms late (no free
    connection in time)."""
    clock = time.perf_counter_ns
    conns = [await bl.HTTPConn.open(port) for _ in range(connections)]
    start = clock() + 50_000_000
    measure_from = start + int(warmup * 1e9)
    end = measure_from + int(seconds * 1e9)
    if window is not None:
        window(measure_from, end)
    interval = 1e9 / rate
    slot = itertools.count()
    late = 0

    async def worker(conn):
        nonlocal late
        while True:
            due = start + int(next(slot) * interval)
            if due >= end:
                return
            now = clock()
            if due > now:
                await trio.sleep((due - now) / 1e9)
            elif now - due > 1_000_000:
                late += 1
            t0 = clock()
            status, _, body = await conn.request(request(t0))
            answered(t0, status, body)

    await drive.on_each(conns, worker)
    return late


async def bare_round_trips(port: int, *, rate: float, seconds: float, warmup: float, connections: int = 32,
                           server: bl.ServerProc | None = None) -> dict:
    """The latency floor of this machine and stack at `rate`: request -> response of the bare
    trio+h11 server of `bare` (it parses each request and answers, nothing else), driven
    exactly like the latency runs' producer. A put -> frame delivery needs at least that much (a
    request in, a message out); an auto-commit frame also waits for an fsync. With `server` (the
    bare server's process) its CPU time per request is measured too."""
    clock = time.perf_counter_ns
    latencies: list[int] = []
    span = [0, 0]

    def answered(t0: int, status: int, body: bytes) -> None:
        if span[0] <= t0 < span[1]:
            latencies.append(clock() - t0)

    def set_span(start_ns: int, end_ns: int) -> None:
        span[:] = [start_ns, end_ns]

    meter = bl.CpuMeter(server).start()
    await open_loop(port, rate=rate, seconds=seconds, warmup=warmup, connections=connections, window=set_span,
                    request=lambda t0: bl.request_bytes("POST", f"/floor?t0={t0}", port, body=BODY),
                    answered=answered)
    # open loop: requests went out at `rate` throughout the metered time
    srv_us = bl.per_item_us(meter.stop()["server_cpu_pct"], rate) if server is not None else None
    s = bl.summary(latencies)
    bl.progress(f"floor: bare trio+h11 round trip at {rate:,.0f}/s: p50 {s['p50_ms']:.2f} ms, "
                f"p99 {s['p99_ms']:.2f} ms over {len(latencies)}")
    return {"p50_ms": round(s["p50_ms"], 3), "p99_ms": round(s["p99_ms"], 3), "measured": len(latencies),
            "server_us_per_request": srv_us}


async def latency_run(port: int, token: str, *, rate: float, seconds: float, warmup: float, window: int,
                      auto: bool, server: bl.ServerProc, ws_client: str, connections: int = 32,
                      polled: Callable[[], float | None] | None = None) -> dict:
    """One latency run: ``rate`` puts/s on ``connections`` connections into a fresh queue, one watch
    consumer (window ``window``, auto or manual commit). ``polled``: the server's idle-poll seconds
    so far, to report the part of its CPU per entry spent polling (``server_polled_us_per_entry``)."""
    mode = "auto" if auto else "manual"
    service = fresh_service("lat", mode, window)
    label = f"latency {mode} commit, window {window}, {rate:,.0f} puts/s"
    tally = Tally(expected=0, manual=not auto)
    headers = bl.auth_headers(token)
    put_stats = {"sent": 0, "late": 0, "errors": 0, "first_error": None, "in_window": 0, "backlog": 0}

    put_latencies: list[int] = []
    answered_at: dict[int, int] = {}   # index -> when its put was answered (ns)

    def sent(t0: int, status: int, body: bytes) -> None:
        put_stats["sent"] += 1
        if tally.measure_from_ns <= t0 < tally.measure_to_ns:
            put_stats["in_window"] += 1
            now = time.perf_counter_ns()
            put_latencies.append(now - t0)
            if status == 200:
                answered_at[int(body)] = now
        if status != 200:
            put_stats["errors"] += 1
            put_stats["first_error"] = put_stats["first_error"] or f"{status} {body[:80]!r}"

    def set_span(start_ns: int, end_ns: int) -> None:
        tally.measure_from_ns, tally.measure_to_ns = start_ns, end_ns

    async def producer():
        put_stats["late"] = await open_loop(
            port, rate=rate, seconds=seconds, warmup=warmup, connections=connections, window=set_span,
            request=lambda t0: bl.request_bytes("POST", f"/api/predict/{service}?t0={t0}", port, body=BODY,
                                                headers=headers),
            answered=sent)

    async def until():
        await producer()
        put_stats["backlog"] = put_stats["sent"] - tally.received   # > a window: the consumer fell behind
        # let the last entries arrive (bounded)
        with trio.move_on_after(5.0):
            while tally.received < put_stats["sent"] or (tally.manual and tally.committed < tally.received):
                await trio.sleep(0.01)

    res = await run_consumers(port, service, 1, window, auto, tally, token, latency=True, until=until,
                              server=server, label=label, ws_client=ws_client, polled=polled)
    s = bl.summary(tally.latencies_ns)
    measured = len(tally.latencies_ns)
    row = {"mode": mode, "window": window, "rate_target": round(rate, 1),
           "rate_achieved": round(put_stats["in_window"] / seconds, 1), "puts": put_stats["sent"],
           "late_puts": put_stats["late"], "backlog_at_end": put_stats["backlog"],
           "measured": measured, "p50_ms": round(s["p50_ms"], 3), "p99_ms": round(s["p99_ms"], 3),
           "put_answer_p50_ms": round(bl.summary(put_latencies)["p50_ms"], 3),
           "late_frames_pct": _late_pct(tally.received_at, answered_at),
           "max_ms": round(s["max_ms"], 3), "received": tally.received,
           "errors": put_stats["errors"] + tally.errors, "first_error": put_stats["first_error"] or tally.first_error,
           "server_cpu_pct": res["server_cpu_pct"], "client_cpu_pct": res["client_cpu_pct"],
           "other_cpu_pct": res["other_cpu_pct"],
           "server_us_per_entry": bl.per_item_us(res["server_cpu_pct"], rate)}
    if "polled_s" in res:
        row["server_polled_us_per_entry"] = bl.per_item_us(100 * res["polled_s"] / res["seconds"], rate)
    if tally.received < put_stats["sent"]:
        row["errors"] += 1
        row["first_error"] = row["first_error"] or f"{put_stats['sent'] - tally.received} entries not received"
    bl.progress(f"{label}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms over {measured} entries")
    return row


def add_floors(lat_rows: list[dict], *, cpu: int | None, fsync_p50_ms: float, seconds: float, warmup: float) -> None:
    """Each latency row gets the floor at its rate: the bare server's round trip p50, plus for
    auto-commit the fsync probe's p50 (its frame waits for the fsync that makes the put and its
    delete durable; PROTOCOL.md "Durability"); the bare round trip's p99; and the bare server's
    CPU time per request at that rate. Same pinning as the qserve runs."""
    trips: dict[float, dict] = {}
    with bare_server_proc(cpu) as bare:
        for r in lat_rows:
            rate = r["rate_target"]
            if rate not in trips:
                trips[rate] = trio.run(lambda: bare_round_trips(bare.port, rate=rate, seconds=seconds, warmup=warmup,
                                                                server=bare))
            r["floor_rtt_p50_ms"] = trips[rate]["p50_ms"]
            r["floor_p99_ms"] = trips[rate]["p99_ms"]
            r["floor_server_us_per_request"] = trips[rate]["server_us_per_request"]
            r["floor_p50_ms"] = round(trips[rate]["p50_ms"] + (fsync_p50_ms if r["mode"] == "auto" else 0.0), 3)


def _late_pct(received_at: dict[int, int], answered_at: dict[int, int], slack_ns: int = 300_000) -> float | None:
    """Of the measured entries, the share (%) whose frame arrived more than `slack_ns` after their
    put's answer. With auto-commit a frame can only leave once its put is durable; one that comes
    much later than the put's answer waited for a later fsync round than its put."""
    both = [received_at[i] - answered_at[i] for i in received_at.keys() & answered_at.keys()]
    if not both:
        return None
    return round(100 * sum(1 for d in both if d > slack_ns) / len(both), 1)
