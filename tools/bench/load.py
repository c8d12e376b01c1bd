#!/usr/bin/env python3
"""Load test: many keep-alive connections, watchers and slow-loris connections against one server.

    python -m tools.bench.load                          # full size: 1000 connections, 100 watchers, 20 s
    python -m tools.bench.load --connections 200 --watchers 20 --slow-loris 10 --seconds 4 --json

The claim under test (from the issue): with 1,000 concurrent keep-alive connections plus 100
watchers the server stays responsive (a fresh client is served within 100 ms), its memory stays
bounded, and slow-loris connections are cut by the timeouts.

What runs:
- qserve as a child process on 127.0.0.1 in a fresh temporary data directory, with
  ``--max-connections`` above everything this tool opens and the short ``--request-timeout`` and
  ``--keepalive-timeout`` given here (defaults 5 s and 10 s, so that the cuts happen inside the
  run). The RLIMIT_NOFILE soft limit of this process is raised to its hard limit first; the server
  inherits it. Unlike the other benchmarks nothing is pinned by default: the question here is
  latency, and a server pinned to a CPU that other programs also use waits for that CPU (README,
  "Development", has what pinning did to the probe's p99 on a busy 2-CPU machine).
  ``--pin`` runs the server on CPU 0 and this process on CPU 1.
- Ramp (not measured): ``--connections`` keep-alive connections are opened, then the
  ``--watchers`` WebSocket watchers connect (trio-websocket, one service, one group, window
  ``--window``; ``--commit manual`` gives each watcher its own HTTP connection for
  ``PUT ?_indexes_=``, reopened if the server closed it while idle).
- Load (``--seconds``, or until the last slow-loris verdict): every keep-alive connection sends
  ``GET ?_attrs_=true`` every ``--interval`` s (uniformly 0.5x..1.5x; first one at a random offset),
  on the same connection throughout - a closed connection is an error; a producer puts 100-byte
  entries at ``--rate`` per second (open loop, 4 connections) which the watchers receive; the
  slow-loris connections (``--slow-loris``, three kinds in turn) start:
  ``head`` sends a request head one byte every ``--loris-interval`` s, ``body`` sends a complete
  head announcing 1000 body bytes and then trickles the body the same way, ``idle`` connects and
  sends nothing. Each should be cut at its timeout: ``head``/``body`` with a 408 after
  ``--request-timeout``, ``idle`` closed quietly after ``--keepalive-timeout`` (both counted from
  the first byte sent, or the connect). A cut earlier than the timeout or later than the timeout
  plus ``--loris-slack`` counts as a failure.
- The fresh-client probe: every ``--probe-interval`` s a NEW connection is opened and
  ``GET ?_attrs_=true`` sent on it; the latency is connect + complete response. It runs in a thread
  of its own with blocking sockets (GIL switch interval 1 ms), so the load generator's busy event
  loop adds at most about a millisecond to it.
- Memory: the server's VmRSS (/proc/PID/status) after start-up (one put and one read done), its
  peak sampled every 0.25 s during the load, at the end of the load, and ``--settle`` s after every
  connection of this tool was closed; "growth" is peak - start, "retained" is after - start.

Output: progress lines on stderr; the tables (or ``--json``) on stdout. Exit status 1 when anything
failed (an unanswered probe, a request error or dropped connection, an undelivered entry, a
slow-loris connection not cut in time, the server dying); the 100 ms and memory targets are
reported as met or MISSED. The numbers depend on how busy the machine is: the ``other cpu`` column
(CPU used by everything but the server and this process) says how much else was running.

Layout: this file is the command line, the run and the report; the clients and their tallies are
in ``load_clients``, the helpers shared with the other benchmarks in ``lib``.
"""

from __future__ import annotations

import argparse
import functools
import resource
import sys
import threading
import time

import trio

from . import drive, lib as bl
from .load_clients import (LORIS_KINDS, LORIS_SERVICE, PRODUCER_CONNECTIONS, SERVICE, LorisResult,
                           Tally, WatchTally, keepalive_client, loris_ok, open_connections, probe_loop,
                           producer, slow_loris, watcher)

_MB = 1024.0  # VmRSS is in kB


# ------------------------------------------------------------------------------ process limits

def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def server_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of process `pid` in kB, from /proc/PID/status ({} if unreadable)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


# ------------------------------------------------------------------------------------ the run

async def loop_lag(out: list[float], tick: float = 0.05) -> None:
    """How late this process's event loop wakes up (a gauge of the load generator itself)."""
    while True:
        t0 = time.perf_counter()
        await trio.sleep(tick)
        out.append(time.perf_counter() - t0 - tick)


async def sample_memory(pid: int, out: list[int], every: float = 0.25) -> None:
    while True:
        rss = server_memory(pid).get("VmRSS")
        if rss is not None:
            out.append(rss)
        await trio.sleep(every)


async def run_load(args: argparse.Namespace, server: bl.ServerProc) -> dict:
    port, token, pid = server.port, bl.TOKEN, server.proc.pid
    await drive.put_many(port, SERVICE, 1, connections=1, token=token, label="warm-up")
    await drive.attributes(port, SERVICE, token)
    await drive.attributes(port, LORIS_SERVICE, token)
    mem = {"start": server_memory(pid).get("VmRSS")}

    ka, puts, wt = Tally(), Tally(), WatchTally()
    t_ramp = time.perf_counter()
    conns = await open_connections(port, args.connections, ka)
    bl.progress(f"{len(conns)} keep-alive connections open in {time.perf_counter() - t_ramp:.2f}s")
    attrs = bl.request_bytes("GET", f"/api/predict/{SERVICE}?_attrs_=true", port, headers=bl.auth_headers(token))
    probes: list[tuple[float | None, str | None]] = []
    lags: list[float] = []
    samples: list[int] = []
    loris: list[LorisResult] = []
    stop_probe = threading.Event()
    try:
        async with trio.open_nursery() as watchers:
            for i in range(args.watchers):
                await watchers.start(watcher, i, port, token, args.window, args.commit == "manual", wt)
            bl.progress(f"{wt.connected} watchers connected ({args.commit} commit, window {args.window})")
            meter = bl.CpuMeter(server).start()
            t_load = time.perf_counter()
            async with trio.open_nursery() as load:
                for conn in conns:
                    load.start_soon(keepalive_client, conn, attrs, args.interval, ka)
                load.start_soon(producer, port, token, args.rate, puts)
                load.start_soon(loop_lag, lags)
                load.start_soon(sample_memory, pid, samples)
                load.start_soon(trio.to_thread.run_sync, probe_loop, port, token, args.probe_interval,
                                args.probe_timeout, stop_probe, probes)
                async with trio.open_nursery() as loris_nursery:
                    for i in range(args.slow_loris):
                        kind = LORIS_KINDS[i % len(LORIS_KINDS)]
                        timeout = args.keepalive_timeout if kind == "idle" else args.request_timeout
                        loris_nursery.start_soon(functools.partial(
                            slow_loris, kind, port, token, interval=args.loris_interval, timeout=timeout,
                            slack=args.loris_slack, results=loris))
                    loris_nursery.start_soon(progress_reporter, t_load, args.seconds, ka, puts, wt, probes, loris)
                    await trio.sleep(args.seconds)
                    await wait_for(lambda: len(loris) >= args.slow_loris)
                    loris_nursery.cancel_scope.cancel()
                stop_probe.set()
                mem["end_of_load"] = server_memory(pid).get("VmRSS")
                load_seconds = time.perf_counter() - t_load
                cpu = meter.stop(load_seconds)
                load.cancel_scope.cancel()
            # let the watchers receive (and commit) what was put, bounded
            with trio.move_on_after(args.drain):
                await wait_for(lambda: wt.received >= puts.ok + 1   # + the warm-up put
                               and (args.commit == "auto" or wt.committed >= wt.received))
            watchers.cancel_scope.cancel()
    finally:
        stop_probe.set()
        for conn in conns:
            await trio.aclose_forcefully(conn.stream)
    await trio.sleep(args.settle)
    after = server_memory(pid)
    mem.update(after=after.get("VmRSS"), hwm=after.get("VmHWM"), peak=max(samples, default=mem["start"]))
    return {"ka": ka, "puts": puts, "watch": wt, "probes": probes, "lags": lags, "loris": loris, "mem": mem,
            "cpu": cpu, "load_seconds": load_seconds, "opened": len(conns)}


async def wait_for(predicate, poll: float = 0.05) -> None:
    while not predicate():
        await trio.sleep(poll)


async def progress_reporter(t0: float, seconds: float, ka: Tally, puts: Tally, wt: WatchTally, probes: list,
                            loris: list) -> None:
    while True:
        await trio.sleep(2.0)
        worst = max((p[0] for p in probes[-4:] if p[0] is not None), default=float("nan"))
        bl.progress(f"  {time.perf_counter() - t0:5.1f}/{seconds:g}s: keep-alive {ka.ok} ok / {ka.errors} errors, "
                    f"puts {puts.ok}, received {wt.received}, probes {len(probes)} (last worst "
                    f"{worst * 1000:.1f} ms), slow-loris done {len(loris)}")


# --------------------------------------------------------------------------------- reporting

def summarize(raw: dict, args: argparse.Namespace) -> dict:
    ka, puts, wt = raw["ka"], raw["puts"], raw["watch"]
    latencies = [int(p[0] * 1e9) for p in raw["probes"] if p[0] is not None and p[1] is None]
    probe_errors = [p[1] for p in raw["probes"] if p[1] is not None]
    probe = {"probes": len(raw["probes"]), "answered": len(latencies), "failed": len(probe_errors),
             "first_error": probe_errors[0] if probe_errors else None, **_ms(bl.summary(latencies))}
    keepalive = {"connections": args.connections, "opened": raw["opened"], "requests": ka.ok, "errors": ka.errors,
                 "first_error": ka.first_error, **_ms(bl.summary(ka.latencies_ns))}
    producer = {"rate": args.rate, "puts": puts.ok, "errors": puts.errors, "first_error": puts.first_error,
                **_ms(bl.summary(puts.latencies_ns))}
    undelivered = max(puts.ok + 1 - wt.received, 0)   # + the warm-up put
    watch = {"watchers": args.watchers, "connected": wt.connected, "commit": args.commit, "window": args.window,
             "received": wt.received, "undelivered": undelivered, "duplicates": wt.duplicates,
             "committed": wt.committed, "commits": wt.commits, "commit_reconnects": wt.reopened,
             "watchers_with_entries": sum(1 for c in wt.per_watcher if c), "errors": wt.errors,
             "first_error": wt.first_error}
    m = raw["mem"]
    mb = {k: (round(v / _MB, 1) if v is not None else None) for k, v in m.items()}
    memory = {"start_mb": mb["start"], "peak_mb": mb["peak"], "end_of_load_mb": mb["end_of_load"],
              "after_mb": mb["after"], "hwm_mb": mb["hwm"],
              "growth_mb": round((m["peak"] - m["start"]) / _MB, 1),
              "retained_mb": round((m["after"] - m["start"]) / _MB, 1) if m["after"] is not None else None}
    kinds = []
    for kind in LORIS_KINDS:
        rs = [r for r in raw["loris"] if r.kind == kind]
        if not rs:
            continue
        cuts = sorted(r.cut_after for r in rs if r.cut_after is not None)
        statuses = sorted({str(r.status) if r.status is not None else "closed" for r in rs if r.cut_after is not None})
        kinds.append({"kind": kind, "count": len(rs), "cut": len(cuts), "in_time": sum(loris_ok(r, args.loris_slack)
                                                                                   for r in rs),
                      "timeout_s": rs[0].timeout, "status": "/".join(statuses) or "-",
                      "min_s": _r3(cuts[0] if cuts else None), "p50_s": _r3(bl.percentile(cuts, 50) if cuts else None),
                      "max_s": _r3(cuts[-1] if cuts else None)})
    bad = [r for r in raw["loris"] if not loris_ok(r, args.loris_slack)]
    loris = {"count": len(raw["loris"]), "cut": sum(r.cut_after is not None for r in raw["loris"]),
             "in_time": len(raw["loris"]) - len(bad), "slack_s": args.loris_slack, "kinds": kinds,
             "first_failure": (f"{bad[0].kind}: cut after {bad[0].cut_after}, status {bad[0].status} {bad[0].note}"
                               if bad else None)}
    lags = sorted(raw["lags"])
    client = {"loop_lag_p99_ms": _r3(bl.percentile(lags, 99) * 1000 if lags else None),
              "loop_lag_max_ms": _r3(lags[-1] * 1000 if lags else None), **raw["cpu"]}
    errors = (probe["failed"] + (args.connections - raw["opened"]) + ka.errors + puts.errors + wt.errors
              + (args.watchers - wt.connected) + undelivered + len(bad))
    return {"probe": probe, "keepalive": keepalive, "producer": producer, "watch": watch, "memory": memory,
            "slow_loris": loris, "client": client, "load_seconds": round(raw["load_seconds"], 2), "errors": errors}


def _ms(s: dict) -> dict:
    return {"count": s["count"], "p50_ms": _r3(s["p50_ms"]), "p99_ms": _r3(s["p99_ms"]), "max_ms": _r3(s["max_ms"])}


def _r3(x: float | None) -> float | None:
    return None if x is None or x != x else round(x, 3)


def targets(res: dict, args: argparse.Namespace) -> list[str]:
    p, m, lo = res["probe"], res["memory"], res["slow_loris"]
    lines = []
    if p["answered"]:
        ok = p["p99_ms"] < args.target_ms and p["max_ms"] < args.target_ms and not p["failed"]
        lines.append(f"target fresh client served < {args.target_ms:g} ms (p99 and max): p99 {p['p99_ms']:.1f} ms, "
                     f"max {p['max_ms']:.1f} ms, {p['failed']} unanswered -> {'met' if ok else 'MISSED'}")
    ok = m["growth_mb"] < args.max_growth_mb
    lines.append(f"target server memory bounded (growth < {args.max_growth_mb:g} MB): start {m['start_mb']} MB, "
                 f"peak {m['peak_mb']} MB, growth {m['growth_mb']} MB, retained after load {m['retained_mb']} MB "
                 f"-> {'met' if ok else 'MISSED'}")
    if lo["count"]:
        lines.append(f"target slow-loris cut by the timeouts: {lo['in_time']}/{lo['count']} cut at their timeout "
                     f"(+{lo['slack_s']:g} s) -> {'met' if lo['in_time'] == lo['count'] else 'MISSED'}")
    return lines


def render(res: dict, args: argparse.Namespace) -> str:
    p, k, pr, w = res["probe"], res["keepalive"], res["producer"], res["watch"]
    f = bl.fmt_num
    a = bl.table([["fresh-client probe (new connection)", p["probes"], p["answered"], f(p["p50_ms"], 2),
                   f(p["p99_ms"], 2), f(p["max_ms"], 2), p["failed"]],
                  ["keep-alive requests", k["requests"] + k["errors"], k["requests"], f(k["p50_ms"], 2),
                   f(k["p99_ms"], 2), f(k["max_ms"], 2), k["errors"] + k["connections"] - k["opened"]],
                  ["puts (producer)", pr["puts"] + pr["errors"], pr["puts"], f(pr["p50_ms"], 2), f(pr["p99_ms"], 2),
                   f(pr["max_ms"], 2), pr["errors"]]],
                 ["requests", "sent", "ok", "p50 ms", "p99 ms", "max ms", "errors"])
    b = bl.table([[w["watchers"], w["connected"], w["commit"], w["window"], w["received"], w["undelivered"],
                   w["duplicates"], w["committed"], w["watchers_with_entries"], w["commit_reconnects"], w["errors"]]],
                 ["watchers", "connected", "commit", "window", "received", "undelivered", "dups", "committed",
                  "with entries", "reconnects", "errors"])
    m = res["memory"]
    c = bl.table([[f(m["start_mb"], 1), f(m["peak_mb"], 1), f(m["end_of_load_mb"], 1), f(m["after_mb"], 1),
                   f(m["hwm_mb"], 1), f(m["growth_mb"], 1), f(m["retained_mb"], 1)]],
                 ["start", "peak", "end of load", "after", "VmHWM", "growth", "retained"])
    d = bl.table([[r["kind"], r["count"], r["cut"], r["in_time"], f(r["timeout_s"], 1), r["status"],
                   f(r["min_s"], 2), f(r["p50_s"], 2), f(r["max_s"], 2)] for r in res["slow_loris"]["kinds"]],
                 ["kind", "count", "cut", "in time", "timeout s", "answer", "min s", "p50 s", "max s"])
    cl = res["client"]
    e = bl.table([[f"{f(cl['server_cpu_pct'])}%", f"{f(cl['client_cpu_pct'])}%", f"{f(cl['other_cpu_pct'])}%",
                   f(cl["loop_lag_p99_ms"], 1), f(cl["loop_lag_max_ms"], 1)]],
                 ["srv cpu", "cli cpu", "other cpu", "cli loop lag p99 ms", "cli loop lag max ms"])
    return (f"## responsiveness (load {res['load_seconds']:g} s)\n{a}\n\n## watchers\n{b}\n\n"
            f"## server memory (VmRSS, MB)\n{c}\n\n## slow-loris (seconds from first byte / connect to the cut)\n"
            f"{d}\n\n## cpu over the load\n{e}")


# --------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000, help="keep-alive connections (default 1000)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between requests per connection (default 5)")
    p.add_argument("--watchers", type=int, default=100, help="WebSocket watchers (default 100)")
    p.add_argument("--window", type=int, default=10, help="watch window (default 10)")
    p.add_argument("--commit", choices=("manual", "auto"), default="manual", help="watchers' commit mode")
    p.add_argument("--rate", type=float, default=50.0, help="producer puts per second (default 50)")
    p.add_argument("--slow-loris", type=int, default=50, help="slow-loris connections (default 50)")
    p.add_argument("--loris-interval", type=float, default=1.0, help="seconds between trickled bytes (default 1)")
    p.add_argument("--loris-slack", type=float, default=1.0, help="allowed lateness of a cut (default 1 s)")
    p.add_argument("--request-timeout", type=float, default=5.0, help="server --request-timeout (default 5)")
    p.add_argument("--keepalive-timeout", type=float, default=10.0, help="server --keepalive-timeout (default 10)")
    p.add_argument("--probe-interval", type=float, default=0.5, help="seconds between fresh-client probes")
    p.add_argument("--probe-timeout", type=float, default=5.0, help="a probe unanswered this long failed")
    p.add_argument("--seconds", type=float, default=20.0, help="load duration (default 20; longer if a "
                   "slow-loris verdict is still pending)")
    p.add_argument("--drain", type=float, default=5.0, help="seconds the watchers get to catch up after the load")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after closing everything before 'after' RSS")
    p.add_argument("--target-ms", type=float, default=100.0, help="probe target (default 100 ms)")
    p.add_argument("--max-growth-mb", type=float, default=200.0, help="memory growth target (default 200 MB)")
    p.add_argument("--fsync", choices=("always", "interval", "never"), default="always", help="qserve --fsync")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False,
                   help="pin server to CPU 0 and this process to CPU 1 (default off: see the docstring)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--data-dir", default=None, help="parent of the temporary data directory (default: system temp)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.interval * 1.5 >= args.keepalive_timeout:
        parser.error("--interval * 1.5 must be below --keepalive-timeout (the connections would be cut as idle)")
    if min(args.connections, args.watchers, args.slow_loris) < 0 or args.rate <= 0:
        parser.error("counts must be >= 0 and --rate > 0")
    manual = args.commit == "manual"
    sockets = (args.connections + args.watchers * (2 if manual else 1) + args.slow_loris
               + PRODUCER_CONNECTIONS + 64)
    soft, hard = raise_nofile_limit()
    if soft < sockets + 256:
        print(f"load: RLIMIT_NOFILE is {soft} (hard {hard}); about {sockets + 256} descriptors are needed",
              file=sys.stderr)
        return 2
    sys.setswitchinterval(0.001)   # the probe thread gets the GIL within ~1 ms of its socket answering
    cpus = bl.default_pinning(args.pin)
    bl.pin_self(cpus[1])
    extra = ["--max-connections", str(sockets), "--request-timeout", str(args.request_timeout),
             "--keepalive-timeout", str(args.keepalive_timeout)]
    bl.progress(f"RLIMIT_NOFILE {soft}/{hard}; server --max-connections {sockets}; pinning: server cpu "
                f"{cpus[0]}, client cpu {cpus[1]}; loadavg {bl.loadavg():.2f}")
    t_all = time.monotonic()
    with bl.TempDataDir(args.data_dir, prefix="qserve-load-") as data_dir:
        with bl.ServerProc.qserve(data_dir, fsync=args.fsync, cpu=cpus[0], extra=extra) as server:
            bl.progress(f"{server.name} on port {server.port}, pid {server.proc.pid}")
            raw = trio.run(run_load, args, server)
            alive = server.alive()
    res = summarize(raw, args)
    if not alive:
        res["errors"] += 1
        res["server_died"] = "\n".join(server.lines[-20:])
    res["targets"] = targets(res, args)
    bl.progress(f"done in {time.monotonic() - t_all:.1f}s, errors {res['errors']}")
    if args.json:
        bl.dump_json({"benchmark": "load", "environment": bl.environment(args), "loadavg": bl.loadavg(),
                      "pinning": {"server_cpu": cpus[0], "client_cpu": cpus[1]},
                      "rlimit_nofile": [soft, hard], **res})
    else:
        print(f"# load: qserve fsync={args.fsync}; {args.connections} keep-alive connections (a request every "
              f"~{args.interval:g} s each), {args.watchers} watchers ({args.commit} commit, window {args.window}), "
              f"{args.rate:g} puts/s, {args.slow_loris} slow-loris; server --request-timeout "
              f"{args.request_timeout:g} --keepalive-timeout {args.keepalive_timeout:g}; server cpu {cpus[0]}, "
              f"client cpu {cpus[1]}; loadavg {bl.loadavg():.2f}")
        print(render(res, args))
        for line in res["targets"]:
            print(line)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
