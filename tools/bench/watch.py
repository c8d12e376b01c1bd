#!/usr/bin/env python3
"""Watch benchmark: entries/s delivered to WebSocket consumers, and put -> receive latency.

    python -m tools.bench.watch                # full run (about 1 min on 2 idle cores)
    python -m tools.bench.watch --quick        # smoke run (a few seconds)
    python -m tools.bench.watch --entries 20000 --json   # deeper queues, longer

What runs:
- qserve as a child process on 127.0.0.1 (``--fsync always`` unless ``--fsync``), pinned to CPU 0
  with ``--pin`` (default on 2+ CPUs); every client (producer, consumers, committers) is this
  process, pinned to CPU 1 - one trio run, one core, so the consumers compete with each other
  for the client core but never with the server.
- Consumers: WebSocket clients on ``ws://127.0.0.1:PORT/api/predict/SVC?_watch_=true&
  _index_=0&_window_=W&_auto_commit_=...`` with the token and ``X-EAS-QueueService-Uid`` (one per
  consumer) / ``-Gid`` (the same for all: one group, so they split the entries). Each binary
  frame is decoded with ``qserve.wire.protobuf.decode_frame``. ``--ws-client lean`` (default) is
  `ws`, a strict minimal client that costs the client core less per frame than
  ``--ws-client trio-websocket`` (the library the server itself uses), so that the server, not
  the one client core, is what is measured.
- Manual commit: each consumer has one keep-alive HTTP connection for ``PUT ?_indexes_=i,j,..``
  and one commit in flight at a time. Batching: every index received since the last commit was
  sent goes into the next commit, which is sent as soon as the previous one is answered (so with
  window W a commit carries at most W indexes; under load it carries whatever arrived during
  the previous commit's round trip, which with fsync=always includes one fsync).
- Throughput: per scenario a fresh queue is pre-filled with N entries (100 bytes, puts on 64
  connections, not timed), then the consumers start and the clock runs until every entry was
  received (auto-commit) or received and its commit answered (manual), and ``stream.length`` is
  checked to be 0 via ``GET ?_attrs_=true``. Scenarios: auto-commit and manual commit, window 10
  and 64 (``--windows``), 1 and 4 consumers (``--consumers``).
- End-to-end peak (per commit mode, the first window, 1 consumer - the latency runs' setup): 16
  keep-alive connections (``--peak-connections``) put 100-byte entries back to back (closed loop)
  into a fresh queue while the consumer receives (and, manual, commits) them; after a warm-up,
  puts answered and entries received are counted for a few seconds (``--peak-seconds``). The
  peak is received/s. A put is not started while ``--peak-backlog`` (500) entries are put but not
  yet received, so the backlog stays bounded even when the producers outrun the consumer ("cap
  waits" > 0: then the consumer side sets the pace). A pre-filled queue's delivery rate (the
  throughput table) is no peak for this: there the server does not take puts at the same time.
- Latency: a producer puts at a fixed rate (open loop: one put scheduled every 1/rate s, on up to
  32 connections) into a fresh queue watched by one consumer; every put carries a tag
  ``t0=<time.perf_counter_ns()>`` taken just before the request is written, and the consumer
  takes receive - t0 when the frame is decoded (same machine, same monotonic clock). The rate is
  half the end-to-end peak of the same commit mode (or ``--rate``), and a light row runs at a tenth
  of the peak (at most 200/s). Measured with an auto-commit consumer and a manual-commit consumer
  (the first window), after a warm-up.
- Latency floor (``--no-floor`` skips it): afterwards the bare trio+h11 server of
  `bare` (parses each request and answers; no storage) runs pinned like qserve and
  gets the same open-loop requests at each latency rate. Its round trip p50 is what any server on
  this stack and machine needs to take a put in and send a message out; an auto-commit frame
  also waits for the fsync that makes the put and its delete durable (PROTOCOL.md
  "Durability"), so its floor adds the fsync probe's p50. The target lines state the floor next
  to the result: when the floor itself is close to 1 ms, so is any implementation.

In the latency table "put p50" is how long the puts themselves took to be answered (durable, with
``--fsync always``): an auto-commit frame cannot leave before its put is durable, so its latency
follows the put's. "late" (auto-commit) is the share of frames that arrived more than 0.3 ms after
their put's answer: those waited for a later fsync round than their put (their delete missed it).

Reading the tables: "per commit" is the mean number of indexes per commit request; "srv us/entry"
is server CPU time per delivered entry (less sensitive to other load on the machine than
entries/s); "other cpu" is CPU used meanwhile by everything except the server and this process
(other programs, steal): when it is high the run was disturbed. In the peak table "backlog" is how
many answered puts had not been received when the measurement ended. In the latency table "backlog" is
how many put entries had not yet been received when the producer stopped: more than a window or
two means the consumer could not keep up at that rate, and the latency then only measures how long
the queue has been growing. Delivery cost depends on the queue's depth (how many entries were
pre-filled, ``--entries``), so compare runs of the same depth.

Output: progress lines on stderr; the tables (or ``--json``) on stdout. Targets (from the issue):
manual commit at window 10 >= 10,000 entries/s for 4 consumers together; put -> receive p50 <
1 ms and p99 < 5 ms at half (end-to-end peak) load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import trio

from . import drive, lib as bl
from .watch_latency import add_floors, latency_run
from .watch_parts import BODY, Tally, e2e_peak, fresh_service, render_peak, run_consumers


async def throughput(port: int, token: str, *, consumers: int, window: int, auto: bool, entries: int,
                     server: bl.ServerProc, timeout: float, ws_client: str) -> dict:
    mode = "auto" if auto else "manual"
    service = f"{fresh_service('tp', mode, window)}-c{consumers}"
    label = f"{mode} commit, window {window}, {consumers} consumer(s)"
    await drive.put_many(port, service, entries, connections=64, body=BODY, token=token, label=f"prefill {service}")
    tally = Tally(expected=entries, manual=not auto)
    timed_out = False

    async def until():
        nonlocal timed_out
        with trio.move_on_after(timeout) as scope:
            await tally.done.wait()
        timed_out = scope.cancelled_caught

    res = await run_consumers(port, service, consumers, window, auto, tally, token, latency=False, until=until,
                              server=server, label=label, ws_client=ws_client)
    if timed_out:
        tally.error(f"timed out after {timeout:.0f}s with {tally.received}/{entries} received, "
                    f"{tally.committed} committed")
    length = await _settled_length(port, service, token)
    if length != 0:
        tally.error(f"stream.length is {length} after the run, expected 0")
    row = {"mode": mode, "window": window, "consumers": consumers, "entries": entries,
           "received": tally.received, "seconds": round(res["seconds"], 3),
           "entries_per_s": round(tally.received / res["seconds"], 1),
           "split": "/".join(map(str, tally.per_consumer)), "commits": tally.commits,
           "entries_per_commit": round(tally.committed / tally.commits, 1) if tally.commits else None,
           "duplicates": tally.duplicates, "errors": tally.errors, "first_error": tally.first_error,
           "server_cpu_pct": res["server_cpu_pct"], "client_cpu_pct": res["client_cpu_pct"],
           "other_cpu_pct": res["other_cpu_pct"], "final_length": length,
           "server_us_per_entry": bl.per_item_us(res["server_cpu_pct"], tally.received / res["seconds"])}
    bl.progress(f"{label}: {row['entries_per_s']:,.0f} entries/s ({entries} in {row['seconds']:.2f}s), "
                f"split {row['split']}, errors {tally.errors}" + (f" ({tally.first_error})" if tally.errors else ""))
    return row


async def _settled_length(port: int, service: str, token: str, wait: float = 5.0) -> int:
    """stream.length, polled until it is 0 (bounded)."""
    deadline = time.monotonic() + wait
    while True:
        length = int((await drive.attributes(port, service, token))["stream.length"])
        if length == 0 or time.monotonic() > deadline:
            return length
        await trio.sleep(0.05)


def render(tp_rows: list[dict], peak_rows: list[dict], lat_rows: list[dict]) -> str:
    a = bl.table([[r["mode"], r["window"], r["consumers"], r["received"], f"{r['seconds']:.2f}",
                   bl.fmt_num(r["entries_per_s"]), r["split"], bl.fmt_num(r["entries_per_commit"], 1),
                   f"{bl.fmt_num(r['server_cpu_pct'])}%", bl.fmt_num(r["server_us_per_entry"]),
                   f"{bl.fmt_num(r['client_cpu_pct'])}%", f"{bl.fmt_num(r['other_cpu_pct'])}%",
                   r["duplicates"], r["errors"]] for r in tp_rows],
                 ["commit", "window", "consumers", "entries", "seconds", "entries/s", "split", "per commit",
                  "srv cpu", "srv us/entry", "cli cpu", "other cpu", "dups", "errors"])
    b = bl.table([[r["load"], r["mode"], r["window"], 1, bl.fmt_num(r["rate_target"]), bl.fmt_num(r["rate_achieved"]),
                   r["measured"], bl.fmt_num(r["p50_ms"], 2), bl.fmt_num(r["p99_ms"], 2), bl.fmt_num(r["max_ms"], 2),
                   bl.fmt_num(r["put_answer_p50_ms"], 2),
                   "-" if r["mode"] != "auto" or r.get("late_frames_pct") is None else f"{r['late_frames_pct']:.0f}%",
                   r["backlog_at_end"], bl.fmt_num(r.get("floor_p50_ms"), 2), bl.fmt_num(r.get("floor_p99_ms"), 2),
                   f"{bl.fmt_num(r['server_cpu_pct'])}%", bl.fmt_num(r["server_us_per_entry"]),
                   bl.fmt_num(r.get("floor_server_us_per_request")),
                   f"{bl.fmt_num(r['client_cpu_pct'])}%", f"{bl.fmt_num(r['other_cpu_pct'])}%", r["errors"]]
                  for r in lat_rows],
                 ["load", "commit", "window", "consumers", "target/s", "put/s", "measured", "p50 ms", "p99 ms", "max ms",
                  "put p50", "late", "backlog", "floor p50", "floor p99", "srv cpu", "srv us/entry", "floor us/req",
                  "cli cpu", "other cpu", "errors"])
    out = "## throughput (pre-filled queue, until all delivered" + " and committed)\n" + a
    if peak_rows:
        out += ("\n\n## end-to-end peak (closed-loop puts and 1 consumer at once; the latency runs' half load)\n"
                + render_peak(peak_rows))
    if not lat_rows:
        return out
    return (out + "\n\n## put -> receive latency (open-loop producer; floor: this machine's bare trio+h11 round "
                  "trip at the same rate, + one fsync for auto-commit in p50; floor us/req: that server's CPU "
                  "time per request)\n" + b)


def _floor_note(r: dict) -> str:
    if r.get("floor_p50_ms") is None:
        return ""
    fsync = r["floor_p50_ms"] - r["floor_rtt_p50_ms"]
    parts_ = f"bare trio+h11 round trip at this rate {r['floor_rtt_p50_ms']:.2f} ms" + (
        f" + one fsync {fsync:.2f} ms" if r["mode"] == "auto" and fsync > 0 else "")
    return (f" (floor p50 here: {parts_} = {r['floor_p50_ms']:.2f} ms; bare round trip p99 "
            f"{r['floor_p99_ms']:.2f} ms)")


def targets(tp_rows: list[dict], lat_rows: list[dict]) -> list[str]:
    lines = []
    for r in tp_rows:
        if r["mode"] == "manual" and r["window"] == 10 and r["consumers"] == 4:
            ok = r["entries_per_s"] >= 10000
            lines.append(f"target manual commit w10, 4 consumers >= 10000 entries/s: {r['entries_per_s']:.0f}/s -> "
                         f"{'met' if ok else 'MISSED'}")
    for r in lat_rows:
        if r["load"] != "half peak":
            continue
        ok = r["p50_ms"] < 1 and r["p99_ms"] < 5
        basis = (f"= half the e2e peak {r['peak_per_s']:.0f}/s" if r.get("peak_per_s") else "from --rate")
        lines.append(f"target latency at half load ({r['mode']} commit, {r['rate_target']:.0f} puts/s {basis}) "
                     f"p50 < 1 ms and p99 < 5 ms: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms -> "
                     f"{'met' if ok else 'MISSED'}" + _floor_note(r))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=None, help="entries per throughput scenario (default 5000; --quick 300)")
    p.add_argument("--consumers", default="1,4", help="consumer counts (default 1,4)")
    p.add_argument("--windows", default="10,64", help="windows (default 10,64); the first one sets the latency peak")
    p.add_argument("--modes", default="auto,manual", help="commit modes (default auto,manual)")
    p.add_argument("--rate", type=float, default=None, help="latency producer rate (default: half the end-to-end "
                   "peak of the same commit mode)")
    p.add_argument("--light-rate", type=float, default=None, help="latency is also measured at this light load "
                   "(default: 10%% of the peak, at most 200/s; 0 = skip)")
    p.add_argument("--peak-seconds", type=float, default=None, help="end-to-end peak: measured seconds per mode "
                   "(default 3, after 1 s warm-up; --quick 0.5 after 0.2 s)")
    p.add_argument("--peak-connections", type=int, default=16, help="end-to-end peak: put connections (default 16)")
    p.add_argument("--peak-backlog", type=int, default=500, help="end-to-end peak: no put is started while this many "
                   "entries are put but not received (default 500)")
    p.add_argument("--seconds", type=float, default=None, help="latency: measured seconds per run (default 4; --quick 0.5)")
    p.add_argument("--warmup", type=float, default=None, help="latency: uncounted seconds first (default 0.5)")
    p.add_argument("--no-latency", action="store_true", help="skip the end-to-end peak and latency runs")
    p.add_argument("--no-floor", action="store_true", help="skip measuring the latency floor (the bare trio+h11 "
                   "server of tools.bench.bare at each latency rate)")
    p.add_argument("--ws-client", choices=("lean", "trio-websocket"), default="lean",
                   help="the consumers' WebSocket client (default lean: tools/bench/ws.py)")
    p.add_argument("--fsync", choices=("always", "interval", "never"), default="always", help="qserve --fsync (default always)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for `qserve serve` (repeatable), e.g. --server-arg=--no-fsync-poll")
    p.add_argument("--timeout", type=float, default=60.0, help="give up on one throughput scenario after this long")
    p.add_argument("--quick", action="store_true", help="smallest configuration")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin server to CPU 0 and clients to CPU 1 (default on with 2+ CPUs)")
    p.add_argument("--data-dir", default=None, help="parent of the temporary data directory (default: system temp)")
    args = p.parse_args(argv)
    if args.entries is None:
        args.entries = 300 if args.quick else 5000
    if args.seconds is None:
        args.seconds = 0.5 if args.quick else 4.0
    if args.warmup is None:
        args.warmup = 0.2 if args.quick else 0.5
    if args.peak_seconds is None:
        args.peak_seconds = 0.5 if args.quick else 3.0
    peak_warmup = 0.2 if args.quick else 1.0
    consumers = [int(x) for x in args.consumers.split(",")]
    windows = [int(x) for x in args.windows.split(",")]
    modes = args.modes.split(",")
    if args.quick:
        consumers, windows = consumers[-1:], windows[:1]

    cpus = bl.default_pinning(args.pin)
    bl.pin_self(cpus[1])
    probe = bl.fsync_probe(Path(args.data_dir or os.environ.get("TMPDIR") or "/tmp"))
    bl.progress(f"fsync probe: p50 {probe['p50_ms']:.2f} ms, p99 {probe['p99_ms']:.2f} ms; "
                f"pinning: server cpu {cpus[0]}, clients cpu {cpus[1]}")
    t_all = time.monotonic()
    tp_rows: list[dict] = []
    lat_rows: list[dict] = []
    peak_rows: list[dict] = []
    with bl.TempDataDir(args.data_dir) as data_dir:
        with bl.ServerProc.qserve(data_dir, fsync=args.fsync, cpu=cpus[0], extra=args.server_arg) as server:
            port, token = server.port, bl.TOKEN
            bl.progress(f"{server.name} on port {port}")
            for mode in modes:
                for window in windows:
                    for n in consumers:
                        tp_rows.append(trio.run(lambda: throughput(
                            port, token, consumers=n, window=window, auto=mode == "auto", entries=args.entries,
                            server=server, timeout=args.timeout, ws_client=args.ws_client)))
            if not args.no_latency:
                lat_modes = ("auto", "manual")
                peaks: dict[str, float] = {}
                for mode in lat_modes:
                    row = trio.run(lambda: e2e_peak(
                        port, token, window=windows[0], auto=mode == "auto", server=server,
                        seconds=args.peak_seconds, warmup=peak_warmup, connections=args.peak_connections,
                        max_backlog=args.peak_backlog, ws_client=args.ws_client))
                    peak_rows.append(row)
                    peaks[mode] = row["received_per_s"]
                # per mode: (half-peak rate, light rate)
                rates = {}
                for mode in lat_modes:
                    half = args.rate if args.rate is not None else (peaks[mode] / 2 or 500.0)
                    light = args.light_rate
                    if light is None:
                        light = 0 if args.quick else min(half / 5, 200.0)
                    rates[mode] = {"half peak": half, "light": light}
                for load in ("half peak", "light"):
                    for mode in lat_modes:
                        r = rates[mode][load]
                        if r <= 0:
                            continue
                        row = trio.run(lambda: latency_run(
                            port, token, rate=r, seconds=args.seconds, warmup=args.warmup, window=windows[0],
                            auto=mode == "auto", server=server, ws_client=args.ws_client))
                        lat_rows.append({"load": load, "peak_per_s": None if args.rate is not None else peaks[mode],
                                         **row})
            if not server.alive():
                raise RuntimeError("qserve died:\n" + "\n".join(server.lines[-20:]))
        if lat_rows and not args.no_floor:
            add_floors(lat_rows, cpu=cpus[0], fsync_p50_ms=probe["p50_ms"] if args.fsync == "always" else 0.0,
                       seconds=args.seconds, warmup=args.warmup)
    bl.progress(f"done in {time.monotonic() - t_all:.1f}s")
    if args.json:
        bl.dump_json({"benchmark": "watch", "environment": bl.environment(args), "fsync": args.fsync,
                      "fsync_probe": probe, "pinning": {"server_cpu": cpus[0], "client_cpu": cpus[1]},
                      "ws_client": args.ws_client, "throughput": tp_rows, "e2e_peak": peak_rows, "latency": lat_rows,
                      "targets": targets(tp_rows, lat_rows)})
    else:
        print(f"# bench_watch: qserve fsync={args.fsync}; {args.entries} entries per throughput run; e2e peak "
              f"{args.peak_seconds:g} s after {peak_warmup:g} s warm-up; latency "
              f"{args.seconds:g} s after {args.warmup:g} s warm-up; fsync probe p50 {probe['p50_ms']:.2f} ms / "
              f"p99 {probe['p99_ms']:.2f} ms; server cpu {cpus[0]}, clients cpu {cpus[1]}; "
              f"{args.ws_client} WebSocket client")
        print(render(tp_rows, peak_rows, lat_rows))
        for line in targets(tp_rows, lat_rows):
            print(line)
    errors = sum(r["errors"] for r in tp_rows + peak_rows + lat_rows)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
