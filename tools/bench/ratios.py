#!/usr/bin/env python3
"""Issue #19's performance targets in one command: qserve next to its reference, measured in the
same run, alternating, medians; one table of target, qserve figure, reference figure, ratio, target.

    python -m tools.bench.ratios                                  # full run (about 6 min on 2 cores)
    python -m tools.bench.ratios --quick                          # smoke run (about 1 min)
    python -m tools.bench.ratios --peer-python /tmp/peervenv/bin/python   # a Python with redis-py

What runs (everything on 127.0.0.1; every process started here is stopped by its pid at the end):
- Servers, each started once and idle while another is measured: qserve (``--fsync always``, a
  temporary ``--data-dir``, no token: the reference scripts send none), the bare trio + h11 server
  ``h11_server.py`` of ``--peerbench`` on a free port, and ``redis-server --appendonly yes
  --appendfsync always --save ''`` (`redis.RedisProc`). With ``--pin`` (default on 2+ CPUs) the
  servers run on CPU 0 and the load generators (wrk, the client scripts, this process) on CPU 1.
- The reference scripts run exactly as ``peerbench/README.md`` says. Each round runs every pair
  once, the side that goes first flipping every round; a figure is the median over ``--rounds``:
  durable put c16 = ``wrk -t1 -c16 -d5s -s post.lua`` on ``/api/predict/perf``, qserve / bare;
  durable put seq = ``http_client_seq.py PORT 4 /api/predict/perfseq``, qserve / ceiling where the
  ceiling is 1 / (bare p50 of the same script + ``fsync_bench.py DATA_DIR 2 fsync 1`` p50, run on the
  servers' CPU: the fsync qserve pays where it runs; `Ratios.fsync`), with
  qserve / ``redis_streams.py PORT seq 4`` next to it; push + manual commit, window 10, one
  consumer = ``watch_rate.py PORT 15000`` / ``redis_streams.py PORT group 3``, with each side's CPU
  per cycle of 10 entries read during the steady phase (`cycle`: the server process, the servers'
  CPU as a whole, the consumer; reported); four consumers are `watch.throughput` (the lean client
  of `ws`, one commit in flight per consumer), reported.
- Latency: the end-to-end peak of each commit mode (`watch_parts.e2e_peak`, the median of
  ``--rounds`` runs), then per round an open-loop producer at half of it with one consumer
  (`watch_latency.latency_run`) and the bare server's round trip at the same rate
  (`watch_latency.bare_round_trips`). Manual commit: p50 < 1 ms and p99 < 5 ms; auto commit: p50 <=
  1.5x its floor = bare round trip p50 + fsync p50. Reported under the latency rows: how busy
  the server's work (its CPU less the idle loop's poll) keeps it at that rate, next to the bare
  server's, and the group-commit rounds of each run over 5 ms and the longest (qserve's /metrics
  histogram), which every auto-commit frame waits for and a manual one once its window is out;
  under the auto-commit row, each server's CPU per request at that rate and the poll's part.
- No regression, once each: reopen of a log of ``--entries`` entries (`storage.bench_reopen`: best
  of 3, and RAM per entry with the requestId table) and `load` (1,000 keep-alive connections, 100
  watchers, a fresh-client probe) as a child process.

Output: progress lines on stderr; the table (or ``--json``) on stdout. Without wrk, redis-server,
redis-py (``--peer-python``) or eas-prediction, the rows needing them say "skipped" and why.
Exit status 1 when a request failed or a child tool failed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from . import drive, lib as bl
from .redis import PEERBENCH, RedisProc, command_calls, parse_wrk, run_child
from .storage import TagPool, bench_reopen
from .watch import throughput
from .watch_latency import bare_round_trips, latency_run
from .ratios_table import WINDOW, render, target_rows
from .cycle import (SLOW_ROUND, CpuWindow, established, idle_poll_seconds, metric_sums, metrics_text, per_cycle,
                    run_measured, slow_rounds)
from .watch_parts import e2e_peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind((bl.LOCALHOST, 0))
        return s.getsockname()[1]


class PeerServer(bl.ServerProc):
    """``h11_server.py PORT`` of the peerbench on a free port; started once it accepts connections."""

    def __init__(self, script: Path, *, cpu: int | None) -> None:
        port = free_port()
        super().__init__("bare trio+h11", [sys.executable, str(script), str(port)], cpu=cpu)
        self.port = port

    def start(self, timeout: float = 20.0) -> "PeerServer":
        cpu = self.cpu
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=bl.REPO,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((bl.LOCALHOST, self.port), timeout=1.0).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"{self.args[1]} did not start on port {self.port}") from None
                time.sleep(0.02)


_COMMIT = ("qserve_fsync_round_seconds_count", "qserve_fsync_writes_total", "qserve_fsync_round_seconds_sum")


class Ratios:
    """The run: the processes, every measurement recorded by name (one list of figures per side)."""

    def __init__(self, args: argparse.Namespace, cpus, qserve: bl.ServerProc, bare: PeerServer,
                 redis: RedisProc | None, data_dir: Path, have: dict[str, str | None]) -> None:
        self.args, self.cpus, self.qserve, self.bare, self.redis = args, cpus, qserve, bare, redis
        self.data_dir, self.have = data_dir, have
        self.peer = Path(args.peerbench)
        self.runs: dict[str, list[float]] = {}
        self.errors = 0
        self.rates: dict[str, float] = {}

    def note(self, key: str, value: float | None, label: str = "") -> None:
        if value is not None:
            self.runs.setdefault(key, []).append(value)
        if label:
            bl.progress(f"  {label}")

    def script(self, name: str, *argv: str, python: str | None = None, cpu: int | None = None,
               timeout: float = 120.0, meter: CpuWindow | None = None) -> dict:
        """Run a peerbench script to its end (``meter``: reading its steady phase's CPU); its one JSON line."""
        args = [python or sys.executable, str(self.peer / name), *argv]
        cpu = self.cpus[1] if cpu is None else cpu
        if meter is not None:
            out = run_measured(args, meter, cpu=cpu, timeout=timeout)
        else:
            out, _, _ = run_child(args, cpu=cpu, timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def cycle(self, side: str, meter: CpuWindow, per_second: float) -> None:
        """Note a one-consumer run's CPU per cycle of 10 entries on each side (`cycle`)."""
        c = per_cycle(meter.result, per_second)
        if c is None:
            return
        for key, value in c.items():
            self.note(f"cycle {side} {key}", value)
        polled = f" ({c['polled_us']:.0f} of them polling while idle)" if "polled_us" in c else ""
        bl.progress(f"    per 10 entries [{side}]: server {c['server_us']:.0f} us CPU{polled}, the servers' CPU busy "
                    f"{c['servers_cpu_us']:.0f} us, consumer {c['client_us']:.0f} us CPU, cycle {c['wall_us']:.0f} us")

    # -- the pairs -----------------------------------------------------------------------------
    def wrk(self, side: str) -> None:
        server = self.qserve if side == "qserve" else self.bare
        before = metric_sums(server.port, _COMMIT) if side == "qserve" else None
        out, _, _ = run_child(["wrk", "-t1", "-c16", f"-d{self.args.wrk_seconds}s", "--latency", "-s",
                               str(self.peer / "post.lua"), f"http://{bl.LOCALHOST}:{server.port}/api/predict/perf"],
                              cpu=self.cpus[1], timeout=self.args.wrk_seconds + 30)
        r = parse_wrk(out)
        self.errors += r["errors"]
        self.note(f"wrk {side}", r["rate"], f"wrk c16 [{side}]: {r['rate']:,.0f} req/s, p50 {r['p50_ms']} ms"
                  + (f", {r['errors']} errors" if r["errors"] else ""))
        after = metric_sums(server.port, _COMMIT) if before is not None else None
        if before is not None and after is not None and len(after) == len(_COMMIT):   # {}: no queue yet
            # the group commit under this load (qserve's /metrics): writes per round, an fsync's time
            rounds, writes, seconds = (after[name] - before.get(name, 0.0) for name in _COMMIT)
            if rounds > 0:
                self.note("c16 writes per round", writes / rounds)
                self.note("c16 fsync us per round", seconds / rounds * 1e6)
                self.note("c16 fsync share", 100 * seconds / self.args.wrk_seconds,
                          f"  group commit: {rounds:,.0f} fsync rounds, {writes / rounds:.1f} writes each, "
                          f"{seconds / rounds * 1e6:.0f} us each, {100 * seconds / self.args.wrk_seconds:.0f}% "
                          "of the wall time")

    def seq(self, side: str) -> None:
        server = self.qserve if side == "qserve" else self.bare
        doc = self.script("http_client_seq.py", str(server.port), str(self.args.seq_seconds), "/api/predict/perfseq")
        self.errors += doc["non_200"]
        self.note(f"seq {side}", doc["req_per_s"])
        self.note(f"seq {side} p50", doc["p50_us"] / 1000,
                  f"seq http.client [{side}]: {doc['req_per_s']:,} req/s, p50 {doc['p50_us']:.0f} us")

    def fsync(self) -> None:
        """``fsync_bench.py`` on the servers' CPU: the fsync qserve itself pays, pinned where it runs (the
        ceilings use this one). Where the disk's completion interrupts go to another CPU, an fsync
        waited for on the servers' CPU also pays the cross-CPU wake-up: on the 2-vCPU machine of
        issue #19 every virtio-blk interrupt lands on CPU 1, and fsync_bench's p50 is ~165 us on CPU 0
        against ~115 us on CPU 1. The load generators' CPU is measured too and reported."""
        argv = (str(self.data_dir), str(self.args.fsync_seconds), "fsync", "1")
        doc = self.script("fsync_bench.py", *argv, cpu=self.cpus[0])
        label = f"fsync_bench: p50 {doc['p50_us']:.0f} us"
        if self.cpus[0] is not None:
            other = self.script("fsync_bench.py", *argv)
            self.note("fsync p50 client cpu", other["p50_us"] / 1000)
            label += f" on the servers' CPU {self.cpus[0]}, {other['p50_us']:.0f} us on CPU {self.cpus[1]}"
        self.note("fsync p50", doc["p50_us"] / 1000, label)

    def redis_py(self, mode: str) -> None:
        if self.have["redis"]:
            return
        seconds = self.args.seq_seconds if mode == "seq" else self.args.group_seconds
        meter = None
        if mode == "group":
            port, calls = self.redis.port, command_calls(self.redis.port, "xreadgroup") or 0
            meter = CpuWindow(self.redis.proc.pid, self.cpus[0],
                              lambda: (command_calls(port, "xreadgroup") or 0) > calls)
        doc = self.script("redis_streams.py", str(self.redis.port), mode, str(seconds), python=self.args.peer_python,
                          timeout=seconds + 120, meter=meter)
        self.note(f"redis {mode}", doc["ops_per_s"], f"redis-py {mode}: {doc['ops_per_s']:,} ops/s")
        if meter is not None:
            self.cycle("redis", meter, doc["ops_per_s"])

    def watch_rate(self) -> None:
        if self.have["watch_rate"]:
            return
        port = self.qserve.port   # its watch has begun once a second connection is open (the commits' and the WebSocket)
        meter = CpuWindow(self.qserve.proc.pid, self.cpus[0], lambda: established(port) >= 2,
                          polled=lambda: idle_poll_seconds(port))
        doc = self.script("watch_rate.py", str(port), str(self.args.entries), timeout=300, meter=meter)
        self.note("watch c1", doc["entries_per_s"], f"watch_rate.py [qserve]: {doc['entries_per_s']:,} entries/s")
        self.cycle("qserve", meter, doc["entries_per_s"])

    def watch4(self) -> None:
        row = trio.run(lambda: throughput(self.qserve.port, bl.TOKEN, consumers=4, window=WINDOW, auto=False,
                                          entries=self.args.entries4, server=self.qserve,
                                          timeout=self.args.timeout, ws_client="lean"))
        self.errors += row["errors"]
        self.note("watch c4", row["entries_per_s"])

    def peaks(self) -> None:
        """Each commit mode's end-to-end peak: the median of ``--rounds`` runs, the modes taking
        turns (one short run alone moved from 2,203/s to 3,693/s between two runs of this tool,
        and the latency rows' rate, half of it, with it)."""
        for _ in range(self.args.rounds):
            for mode in ("manual", "auto"):
                row = trio.run(lambda: e2e_peak(self.qserve.port, bl.TOKEN, window=WINDOW, auto=mode == "auto",
                                                server=self.qserve, seconds=self.args.peak_seconds,
                                                warmup=self.args.peak_seconds / 3, ws_client="lean"))
                self.errors += row["errors"]
                self.note(f"peak {mode}", row["received_per_s"])
        for mode in ("manual", "auto"):
            peak = statistics.median(self.runs[f"peak {mode}"])
            self.rates[mode] = max(50.0, peak / 2)
            bl.progress(f"e2e peak {mode} commit: median {peak:,.0f}/s of "
                        + ", ".join(f"{r:,.0f}" for r in self.runs[f"peak {mode}"]))

    def latency(self, side: str) -> None:
        a = self.args
        for mode in ("manual", "auto"):
            rate = self.rates[mode]
            if side == "qserve":
                port = self.qserve.port
                before = metrics_text(port)
                row = trio.run(lambda: latency_run(port, bl.TOKEN, rate=rate, seconds=a.lat_seconds,
                                                   warmup=a.lat_warmup, window=WINDOW, auto=mode == "auto",
                                                   server=self.qserve, ws_client="lean",
                                                   polled=lambda: idle_poll_seconds(port)))
                self.errors += row["errors"]
                self.note(f"lat {mode} p50", row["p50_ms"])
                self.note(f"lat {mode} p99", row["p99_ms"])
                self.note(f"lat {mode} cpu us", row["server_us_per_entry"])
                self.note(f"lat {mode} polled us", row.get("server_polled_us_per_entry"))
                self.note(f"lat {mode} put p50", row["put_answer_p50_ms"])
                # the group-commit rounds of the run: every auto-commit frame waits for one, and a
                # manual one too once its window is out and the commit that frees it waits for one
                rounds = slow_rounds(before, metrics_text(port))
                if rounds is not None:
                    for key, value in rounds.items():
                        self.note(f"lat {mode} {key}", value)
                    longest = f"{rounds['longest_ms']:g} ms" if "longest_ms" in rounds else "beyond every bucket"
                    bl.progress(f"    group commit: {rounds['rounds']:,.0f} rounds, {rounds['slow']:,.0f} over "
                                f"{SLOW_ROUND * 1e3:.0f} ms, the longest <= {longest}")
            else:
                floor = trio.run(lambda: bare_round_trips(self.bare.port, rate=rate, seconds=a.lat_seconds,
                                                          warmup=a.lat_warmup, server=self.bare))
                self.note(f"floor {mode} p50", floor["p50_ms"])
                self.note(f"floor {mode} p99", floor["p99_ms"])
                us = floor["server_us_per_request"]
                self.note(f"floor {mode} cpu us", us)
                self.note(f"floor {mode} busy", None if us is None else us * rate / 1e4)

    def round(self, i: int) -> None:
        first, second = ("qserve", "bare") if i % 2 == 0 else ("bare", "qserve")
        bl.progress(f"round {i + 1}/{self.args.rounds} ({first} first)")
        if not self.have["wrk"]:
            for side in (first, second):
                self.wrk(side)
        for side in (first, second):
            self.seq(side)
        self.fsync()
        self.redis_py("seq")
        if i % 2 == 0:
            self.watch_rate()
            self.redis_py("group")
        else:
            self.redis_py("group")
            self.watch_rate()
        self.watch4()
        for side in (first, second):
            self.latency(side)

    # -- no regression -------------------------------------------------------------------------
    def reopen(self) -> None:
        with tempfile.TemporaryDirectory(prefix="qserve-reopen-", dir=self.args.data_dir) as root:
            ns = argparse.Namespace(big_dir=None, repeat=3)
            with contextlib.redirect_stdout(sys.stderr):   # its progress lines: stdout is the table's
                r = bench_reopen(root, self.args.reopen_entries, ns, TagPool())
        self.note("reopen s", r["reopen_s"])
        self.note("ram B", r["ram_full"], f"reopen {self.args.reopen_entries:,} entries: {r['reopen_s']:.2f} s "
                  f"(runs {', '.join(f'{t:.2f}' for t in r['reopen_all'])}); RAM/entry {r['ram_full']:.1f} B")

    def load(self) -> None:
        a = self.args
        argv = [sys.executable, "-m", "tools.bench.load", "--json", "--connections", str(a.load_connections),
                "--watchers", str(a.load_watchers), "--seconds", str(a.load_seconds),
                "--slow-loris", str(a.load_loris)]
        if a.data_dir:
            argv += ["--data-dir", a.data_dir]
        proc = subprocess.run(argv, cwd=bl.REPO, capture_output=True, text=True, timeout=a.load_seconds + 180)
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            self.have["load"] = f"tools.bench.load exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"
            self.errors += 1
            return
        self.note("load errors", doc["errors"])
        self.errors += doc["errors"]
        self.note("load probe p99", doc["probe"]["p99_ms"],
                  f"load: probe p99 {doc['probe']['p99_ms']} ms, errors {doc['errors']}, memory growth "
                  f"{doc['memory']['growth_mb']} MB")


def available(args: argparse.Namespace) -> dict[str, str | None]:
    """Why each optional part cannot run (None: it can)."""
    peer = Path(args.peerbench)
    missing = [f for f in ("h11_server.py", "post.lua", "http_client_seq.py", "fsync_bench.py",
                           "redis_streams.py", "watch_rate.py") if not (peer / f).is_file()]
    if missing:
        raise RuntimeError(f"peerbench scripts missing in {peer} (--peerbench): {', '.join(missing)}")
    have: dict[str, str | None] = {"wrk": None if shutil.which("wrk") else "wrk not installed",
                                   "redis": None, "watch_rate": None}
    if shutil.which("redis-server") is None:
        have["redis"] = "redis-server not installed"
    else:
        try:
            ok = subprocess.run([args.peer_python, "-c", "import redis"], capture_output=True).returncode == 0
        except OSError:
            ok = False
        have["redis"] = None if ok else f"{args.peer_python} cannot import redis (--peer-python)"
    if subprocess.run([sys.executable, "-c", "import eas_prediction, websocket"], capture_output=True).returncode:
        have["watch_rate"] = "eas-prediction / websocket-client not installed"
    for k, why in have.items():
        if why:
            bl.progress(f"{k}: {why}: its rows are skipped")
    return have


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one short run of each, small sizes (smoke run)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; --quick 1)")
    p.add_argument("--entries", type=int, default=None, help="watch_rate.py entries (default 15000; --quick 300)")
    p.add_argument("--entries4", type=int, default=None, help="4-consumer watch entries (default 10000; --quick 200)")
    p.add_argument("--reopen-entries", type=int, default=None, help="restart log size (default 1000000; --quick 5000)")
    p.add_argument("--load-connections", type=int, default=None, help="load: connections (default 1000; --quick 50)")
    p.add_argument("--load-watchers", type=int, default=None, help="load: watchers (default 100; --quick 5)")
    p.add_argument("--load-seconds", type=float, default=None, help="load: seconds (default 8; --quick 1)")
    p.add_argument("--no-regression", action=argparse.BooleanOptionalAction, default=True,
                   help="run the restart, RAM and load checks (default on)")
    p.add_argument("--timeout", type=float, default=120.0, help="give up on one watch run after this long")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="servers on CPU 0, load generators on CPU 1 (default on with 2+ CPUs)")
    p.add_argument("--peerbench", default=str(PEERBENCH), help=f"the reference scripts (default {PEERBENCH})")
    p.add_argument("--peer-python", default=sys.executable, help="the Python that runs redis_streams.py (needs redis-py)")
    p.add_argument("--data-dir", default=None, help="parent of the temporary directories (default: system temp)")
    args = p.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.entries = args.entries or (300 if q else 15000)
    args.entries4 = args.entries4 or (200 if q else 10000)
    args.reopen_entries = args.reopen_entries or (5000 if q else 1_000_000)
    args.load_connections = args.load_connections if args.load_connections is not None else (50 if q else 1000)
    args.load_watchers = args.load_watchers if args.load_watchers is not None else (5 if q else 100)
    args.load_seconds = args.load_seconds or (1.0 if q else 8.0)
    args.load_loris = 0 if q else 10
    args.wrk_seconds = 1 if q else 5
    args.seq_seconds = 0.5 if q else 4
    args.group_seconds = 0.5 if q else 3
    args.fsync_seconds = 0.5 if q else 2
    args.peak_seconds = 0.6 if q else 3.0
    args.lat_seconds, args.lat_warmup = (0.5, 0.2) if q else (4.0, 0.5)
    try:
        return run(args)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines() or ["failed"]
        print("bench ratios: " + lines[0] + (f" {lines[-1].strip()}" if len(lines) > 1 else ""), file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    cpus = bl.default_pinning(args.pin)
    bl.pin_self(cpus[1])
    have = available(args)
    t0 = time.monotonic()
    with bl.TempDataDir(args.data_dir) as tmp:
        (tmp / "redis").mkdir()
        (tmp / "qserve").mkdir()
        redis = RedisProc(tmp / "redis", cpu=cpus[0]).start() if not have["redis"] else None
        try:
            qserve = bl.ServerProc("qserve", [sys.executable, "-m", "qserve", "serve", "--host", bl.LOCALHOST,
                                              "--port", "0", "--data-dir", str(tmp / "qserve"), "--fsync", "always"],
                                   cpu=cpus[0])
            with qserve, PeerServer(Path(args.peerbench) / "h11_server.py", cpu=cpus[0]) as bare:
                bl.progress(f"qserve pid {qserve.proc.pid} port {qserve.port}; bare pid {bare.proc.pid} port "
                            f"{bare.port}" + (f"; redis-server pid {redis.proc.pid} port {redis.port}" if redis else "")
                            + f"; servers cpu {cpus[0]}, load generators cpu {cpus[1]}")
                for queue in ("perf", "perfseq"):      # warm-up: the queues exist, the code paths ran once
                    trio.run(lambda: drive.put_many(qserve.port, queue, 200, connections=16, label=f"warm-up {queue}"))
                bench = Ratios(args, cpus, qserve, bare, redis, tmp / "qserve", have)
                bench.peaks()
                for i in range(args.rounds):
                    bench.round(i)
                for proc in (qserve, bare, *([redis] if redis else [])):
                    if not proc.alive():
                        raise RuntimeError(f"{proc.name} died: {(proc.lines or ['no output'])[-1]}")
        finally:
            if redis is not None:
                redis.stop()
    if args.no_regression:
        bl.progress("no-regression checks: restart, RAM per entry, load")
        bench.reopen()
        bench.load()
    else:
        for k in ("load",):
            have[k] = "--no-no-regression"
    rows = target_rows(bench.runs, bench.rates, have, args)
    bl.progress(f"done in {time.monotonic() - t0:.1f}s")
    if args.json:
        bl.dump_json({"benchmark": "ratios", "environment": bl.environment(args), "rows": rows,
                      "runs": bench.runs, "latency_rates": bench.rates, "errors": bench.errors})
    else:
        print(f"# bench ratios: medians of {args.rounds} alternating round(s); wrk {args.wrk_seconds} s, "
              f"http_client_seq {args.seq_seconds} s, watch_rate {args.entries} entries, latency "
              f"{args.lat_seconds:g} s at half the end-to-end peak; servers cpu {cpus[0]}, load generators cpu "
              f"{cpus[1]}; fsync always")
        print(render(rows))
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
