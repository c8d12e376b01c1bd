#!/usr/bin/env python3
"""Nodes benchmark (#16): qserve on one Redis with 1, 2 and 4 nodes, as separate ``qserve serve``
processes and as one ``qserve serve --processes N``, next to a node on the local segment log and to
redis-py against the same Redis; one run, alternating, medians, and the CPU of every process.

    python -m tools.bench.nodes                                   # full run (about 6 min on 2 cores)
    python -m tools.bench.nodes --quick                           # smoke run (1 and 2 nodes, short)
    python -m tools.bench.nodes --peer-python /venv/bin/python    # a Python with redis-py for the reference

What runs (everything on 127.0.0.1; every process started here is stopped by its pid):
- One ``redis-server`` for the whole run (`redis.RedisProc`: AOF, ``appendfsync always``).
- Set-ups, each started when its turn comes and stopped after it (so no idle node renews its lease
  in Redis during another's run): "local" (one node, ``--data-dir``, ``--fsync always``, the
  embedded default); "redis 1 node"; "redis N nodes" (N separate ``qserve serve --backend
  redis://...`` processes, each on its own port); "redis --processes N" (one supervisor and its N
  processes on one port, SO_REUSEPORT: the kernel picks the process of each new connection).
  N is each of ``--nodes`` above 1 (default 2,4). Nodes have no token (the peerbench scripts send
  none) and are the nodes of `redis.node`.
- Durable puts: ``wrk -t1 -d5s --latency -s ../shared/peerbench/post.lua`` on ``/api/predict/perf``
  with 16 connections in all, whatever the set-up: one wrk ``-c16`` on a single port, and for N
  separate nodes one wrk per node with ``-c16/N``, side by side (their req/s added up; "p50" is
  the mean of their p50s). Same offered load everywhere, so a row differs from another only in
  the servers behind the connections.
- Watch: push + manual commit, window 10, ``--consumers`` (4) consumers in one group on a fresh
  queue pre-filled with ``--entries`` entries: `tools.bench.watch`'s throughput run (its `Tally`,
  `consumer`, the commit batcher, the final length check), with consumer i on node i mod N. Its
  `throughput` takes one port; separate nodes need the consumers spread over several, so
  `watch_run` composes the same parts; for one port it measures what `throughput` does. With
  ``--processes`` all consumers use the one port and the kernel decides where each lands.
- The redis-py reference (peerbench ``redis_streams.py seq`` and ``group``, as `tools.bench.redis`
  runs it) after the set-ups. Each round runs every set-up once; the order flips every round. A
  figure is the median over ``--rounds`` (3).
- CPU: of every qserve process (a supervisor and each of its processes, found in
  /proc/PID/task/PID/children), of redis-server (/proc/PID/stat utime + stime before and after),
  of the load generator (wrk's rusage; for the watch runs this process, whose trio run is the
  consumers) and "other" (the machine's busy time less all of these: other programs, the kernel's
  fsync work), in % of one core over the measured phase (the consume phase for the watch runs, not
  the pre-fill). "per process" lists each qserve process's share, highest first (medians by rank;
  a supervisor's own is the first term, "sup+"). "busy" is the machine's total in % of one core,
  out of 100 x the CPUs.
- Pinning: none by default. More processes can only help if the kernel may run them on every CPU;
  pinned (``--pin``: qserve on CPU 0, redis-server, the load generators and this process on CPU 1,
  as `tools.bench.redis` does) N processes share one core by construction.

Reading it: on a machine with C cores the load generator, redis-server and the qserve processes
share the C cores; once "busy" is near 100 x C, more nodes cannot add throughput, they only split
the same CPU (and each pays its own per-request cost: compare "qserve us/op"). "vs 1 node" divides a
figure by the "redis 1 node" one of the same scenario, "vs local" by the local node's.

Output: progress lines on stderr; the table (or ``--json``) on stdout. Without wrk or the peerbench
scripts or redis-py the rows that need them are skipped with one line saying why. Exit status 1
when a request failed, 2 without redis-server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import drive, lib as bl
from .redis import PEERBENCH, RedisProc, available, guarded, node, parse_wrk, run_children
from .redis import Bench as RedisBench
from .watch import _settled_length
from .watch_parts import BODY, Tally, consumer, fresh_service

WINDOW = 10
CONNECTIONS = 16
PUT = f"put c{CONNECTIONS} (wrk)"
ONE_NODE = "redis 1 node"
SUPERVISOR = "sup"


@dataclass
class _Pid:
    pid: int


@dataclass
class ChildProc:
    """A process a supervisor started, read like a `ServerProc` (its CPU from /proc); not ours to stop."""

    name: str
    proc: _Pid
    cpu_seconds = bl.ServerProc.cpu_seconds


@dataclass
class Setup:
    """What one set-up is: its label, the backend, and how many nodes or processes."""

    label: str
    backend: str          # "local" or "redis"
    nodes: int = 1        # separate `qserve serve` processes
    processes: int = 1    # `--processes` of one node

    @property
    def count(self) -> int:
        return self.nodes * self.processes


def setups(counts: list[int]) -> list[Setup]:
    out = [Setup("local", "local"), Setup(ONE_NODE, "redis")]
    out += [Setup(f"redis {n} nodes", "redis", nodes=n) for n in counts if n > 1]
    out += [Setup(f"redis --processes {n}", "redis", processes=n) for n in counts if n > 1]
    return out


@dataclass
class Running:
    """A started set-up: the ports clients use and every qserve process (name -> something with
    `cpu_seconds()`); `stop()` stops the ones started here by pid."""

    setup: Setup
    started: list[bl.ServerProc] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    procs: dict = field(default_factory=dict)

    def stop(self) -> None:
        for server in self.started:
            server.stop()
            if server.proc.returncode not in (0, None):
                bl.progress(f"  {server.name} exited {server.proc.returncode} on SIGTERM")


def start(setup: Setup, tmp: Path, url: str, cpu: int | None, timeout: float = 30.0) -> Running:
    """Start `setup` and wait until every one of its processes listens."""
    run = Running(setup)
    try:
        for i in range(setup.nodes):
            server = node(setup.backend, tmp / "local", url, cpu)
            if setup.processes > 1:
                server.name = f"qserve --processes {setup.processes}"
                server.args += ["--processes", str(setup.processes)]
            run.started.append(server.start())
            run.ports.append(server.port)
            if setup.processes == 1:
                run.procs[f"node{i + 1}"] = server
        if setup.processes > 1:
            supervisor = run.started[0]
            _wait_all_listen(supervisor, setup.processes, timeout)
            run.procs[SUPERVISOR] = supervisor
            pid = supervisor.proc.pid
            for child in sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()):
                run.procs[f"pid{child}"] = ChildProc(f"pid {child}", _Pid(child))
    except BaseException:
        run.stop()
        raise
    return run


def _wait_all_listen(supervisor: bl.ServerProc, processes: int, timeout: float) -> None:
    """Until the supervisor's own "listening ... (N processes" line (bounded; a tool, not a test)."""
    deadline = time.monotonic() + timeout
    want = f"({processes} processes"
    while not any("qserve listening on" in line and want in line for line in supervisor.lines):
        if not supervisor.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{supervisor.name}: not all processes listen: {(supervisor.lines or ['no output'])[-1]}")
        time.sleep(0.05)


class Meter:
    """CPU over one phase of several processes (name -> `cpu_seconds()`), of this process and of the
    machine; percentages of one core. `stop(gen)`: `gen` the load generator's CPU seconds when it is
    a child, None when it is this process."""

    def __init__(self, procs: dict) -> None:
        self.procs = procs

    def start(self) -> "Meter":
        self.t0 = (time.perf_counter(), {k: p.cpu_seconds() for k, p in self.procs.items()},
                   bl.self_cpu_seconds(), bl.system_busy_seconds())
        return self

    def stop(self, gen: float | None = None) -> dict:
        t, before, self0, busy0 = self.t0
        wall = time.perf_counter() - t
        used = {k: p.cpu_seconds() - before[k] for k, p in self.procs.items()}
        own = bl.self_cpu_seconds() - self0
        gen = own if gen is None else gen + own
        busy = bl.system_busy_seconds() - busy0
        pct = lambda s: round(100 * s / wall, 1)
        return {"seconds": wall, "cpu": {k: pct(v) for k, v in used.items()}, "gen_cpu_pct": pct(gen),
                "busy_cpu_pct": pct(busy), "other_cpu_pct": max(0.0, pct(busy - gen - sum(used.values())))}


async def watch_run(ports: list[int], *, consumers: int, entries: int, meter: Meter, timeout: float) -> dict:
    """`watch.throughput` (manual commit, window 10) with consumer i on ``ports[i % len(ports)]``."""
    service = f"{fresh_service('nodes', 'manual', WINDOW)}-c{consumers}"
    await drive.put_many(ports[0], service, entries, connections=64, body=BODY, label=f"prefill {service}")
    tally = Tally(expected=entries, manual=True)
    meter.start()
    async with trio.open_nursery() as nursery:
        for i in range(consumers):
            await nursery.start(consumer, i, ports[i % len(ports)], service, WINDOW, False, tally, bl.TOKEN,
                                False, "lean")
        with trio.move_on_after(timeout) as scope:
            await tally.done.wait()
        cpu = meter.stop()
        nursery.cancel_scope.cancel()
    if scope.cancelled_caught:
        tally.error(f"timed out after {timeout:.0f}s with {tally.received}/{entries} received")
    if (length := await _settled_length(ports[0], service, bl.TOKEN)) != 0:
        tally.error(f"stream.length is {length} after the run, expected 0")
    bl.progress(f"  watch split {'/'.join(map(str, tally.per_consumer))}" + (f"; {tally.first_error}" if tally.errors else ""))
    return {"rate": round(tally.received / cpu["seconds"], 1), "p50_ms": None, "errors": tally.errors, **cpu}


class Bench(RedisBench):
    """The run: `tools.bench.redis`'s (its redis-py reference and progress lines), over set-ups."""

    def __init__(self, args: argparse.Namespace, cpus: tuple[int | None, int | None], redis: RedisProc,
                 tmp: Path) -> None:
        super().__init__(args, cpus, redis, {})
        self.tmp = tmp
        self.url = f"redis://{bl.LOCALHOST}:{redis.port}/0"

    def add(self, scenario: str, setup: str, row: dict, unit: str) -> None:
        """Split the CPU readings into the row's columns and record it."""
        cpu = row.pop("cpu")
        row["redis_cpu_pct"] = cpu.pop("redis")
        row["procs_cpu_pct"] = [cpu.pop(SUPERVISOR)] if SUPERVISOR in cpu else []
        row["procs_cpu_pct"] += sorted(cpu.values(), reverse=True)
        row["node_cpu_pct"] = round(sum(row["procs_cpu_pct"]), 1)
        self.record(scenario, setup, row, unit)

    def put_wrk(self, run: Running) -> None:
        per = CONNECTIONS // len(run.ports)
        commands = [["wrk", "-t1", f"-c{per}", f"-d{max(1, round(self.args.seconds))}s", "--latency", "-s",
                     str(self.peer / "post.lua"), f"http://{bl.LOCALHOST}:{port}/api/predict/perf"] for port in run.ports]
        meter = Meter({**run.procs, "redis": self.redis}).start()
        outs, gen, _ = run_children(commands, cpu=self.cpus[1], timeout=self.args.seconds + 30)
        cpu = meter.stop(gen)
        runs = [parse_wrk(out) for out in outs]
        row = {"rate": round(sum(r["rate"] for r in runs), 1), "errors": sum(r["errors"] for r in runs),
               "p50_ms": statistics.mean(r["p50_ms"] for r in runs) if all(r["p50_ms"] is not None for r in runs) else None,
               **cpu}
        self.add(PUT, run.setup.label, row, "req/s")

    def watch(self, run: Running) -> None:
        meter = Meter({**run.procs, "redis": self.redis})
        row = trio.run(lambda: watch_run(run.ports, consumers=self.args.consumers, entries=self.args.entries,
                                         meter=meter, timeout=self.args.timeout))
        self.add(f"watch manual w{WINDOW} c{self.args.consumers}", run.setup.label, row, "entries/s")

    def one(self, setup: Setup, have: dict[str, bool]) -> None:
        run = start(setup, self.tmp, self.url, self.cpus[0])
        try:
            names = ", ".join(f"{k} {getattr(p.proc, 'pid', '')}" for k, p in run.procs.items())
            bl.progress(f" {setup.label}: ports {', '.join(map(str, run.ports))}; {names}")
            for port in run.ports:          # warm-up: the queue open on every node, the code paths ran once
                trio.run(lambda: drive.put_many(port, "perf", 200, connections=CONNECTIONS, label=f"warm-up {port}"))
            if have["wrk"]:
                self.put_wrk(run)
            self.watch(run)
            for server in run.started:
                if not server.alive():
                    raise RuntimeError(f"{server.name} died: {(server.lines or ['no output'])[-1]}")
        finally:
            run.stop()

    def round(self, i: int, have: dict[str, bool]) -> None:
        order = setups(self.args.nodes)[::1 if i % 2 == 0 else -1]
        bl.progress(f"round {i + 1}/{self.args.rounds}: {', '.join(s.label for s in order)}")
        for setup in order:
            self.one(setup, have)
        if have["redis-py"]:
            self.redis_py("seq", self.args.seconds)
            self.redis_py("group", self.args.group_seconds)

    def results(self) -> list[dict]:
        """Medians per (scenario, set-up), the per-process shares by rank, the ratios."""
        med = {}
        for (scenario, side), runs in self.runs.items():
            row = {"scenario": scenario, "setup": side, "unit": runs[0]["unit"], "runs": len(runs),
                   "errors": sum(r["errors"] for r in runs), "all": [r["rate"] for r in runs]}
            for key in ("rate", "p50_ms", "node_cpu_pct", "redis_cpu_pct", "gen_cpu_pct", "other_cpu_pct",
                        "busy_cpu_pct"):
                vals = [r[key] for r in runs if r.get(key) is not None]
                row[key] = statistics.median(vals) if vals else None
            ranks = [r["procs_cpu_pct"] for r in runs if r.get("procs_cpu_pct")]
            row["procs_cpu_pct"] = [statistics.median(v) for v in zip(*ranks)] if ranks else None
            row["node_us"] = bl.per_item_us(row["node_cpu_pct"], row["rate"])
            row["redis_us"] = bl.per_item_us(row["redis_cpu_pct"], row["rate"])
            med[(scenario, side)] = row
        for (scenario, side), row in med.items():
            one, local = med.get((scenario, ONE_NODE)), med.get((scenario, "local"))
            row["vs_one_node"] = round(row["rate"] / one["rate"], 3) if one and side != "local" else None
            row["vs_local"] = round(row["rate"] / local["rate"], 3) if local else None
        return list(med.values())


def render(rows: list[dict], labels: list[str]) -> str:
    order = labels + ["redis-py"]
    rows = sorted(rows, key=lambda r: (r["setup"] == "redis-py", r["scenario"], order.index(r["setup"])))
    ratio = lambda x: "-" if x is None else f"{x:.2f}x"
    pct = lambda x: "-" if x is None else f"{x:.0f}%"

    def procs(r: dict) -> str:
        shares = [f"{x:.0f}" for x in r["procs_cpu_pct"] or []]
        if r["setup"].startswith("redis --processes") and shares:
            return f"{SUPERVISOR}{shares[0]}+" + "/".join(shares[1:])
        return "/".join(shares) or "-"
    return bl.table([[r["scenario"], r["setup"], bl.fmt_num(r["rate"]), r["unit"], bl.fmt_num(r["p50_ms"], 2),
                      ratio(r["vs_one_node"]), ratio(r["vs_local"]), pct(r["node_cpu_pct"]), procs(r),
                      pct(r["redis_cpu_pct"]), pct(r["gen_cpu_pct"]), pct(r["other_cpu_pct"]), pct(r["busy_cpu_pct"]),
                      bl.fmt_num(r["node_us"]), bl.fmt_num(r["redis_us"]), r["runs"], r["errors"]] for r in rows],
                    ["scenario", "setup", "median", "unit", "p50 ms", "vs 1 node", "vs local", "qserve cpu",
                     "per process", "redis cpu", "loadgen cpu", "other cpu", "busy", "qserve us/op", "redis us/op",
                     "runs", "errors"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default=None, help="node / process counts besides 1, comma-separated (default 2,4; --quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="runs of each set-up (default 3; --quick 1)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per wrk run (default 5; --quick 1)")
    p.add_argument("--group-seconds", type=float, default=None, help="seconds of redis-py's group run (default 3; --quick 1)")
    p.add_argument("--entries", type=int, default=None, help="entries per watch run (default 10000; --quick 200)")
    p.add_argument("--consumers", type=int, default=4, help="watch consumers, spread over the nodes (default 4)")
    p.add_argument("--timeout", type=float, default=60.0, help="give up on one watch run after this long")
    p.add_argument("--quick", action="store_true", help="one short run of each, 1 and 2 nodes")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False,
                   help="qserve on CPU 0; redis-server, load generators and this process on CPU 1 (default off)")
    p.add_argument("--peerbench", default=str(PEERBENCH), help=f"the reference scripts (default {PEERBENCH})")
    p.add_argument("--peer-python", default=sys.executable, help="the Python that runs redis_streams.py (needs redis-py)")
    p.add_argument("--data-dir", default=None, help="parent of the temporary directories (default: system temp)")
    args = p.parse_args(argv)
    quick = args.quick
    try:
        args.nodes = sorted({int(n) for n in (args.nodes or ("2" if quick else "2,4")).split(",")} - {1})
    except ValueError:
        p.error(f"--nodes takes whole numbers separated by commas, got {args.nodes!r}")
    if any(n < 1 or CONNECTIONS % n for n in args.nodes):
        p.error(f"--nodes: each count must divide the {CONNECTIONS} wrk connections")
    args.rounds = args.rounds or (1 if quick else 3)
    args.seconds = args.seconds or (1.0 if quick else 5.0)
    args.group_seconds = args.group_seconds or (1.0 if quick else 3.0)
    args.entries = args.entries or (200 if quick else 10000)
    return guarded("bench nodes", run, args)


def run(args: argparse.Namespace) -> int:
    """The whole run; the table (or JSON) on stdout; 1 when a request failed."""
    cpus = bl.default_pinning(args.pin)
    bl.pin_self(cpus[1])
    have = available(args)
    bl.progress(f"{os.cpu_count()} CPUs; pinning: " + (f"qserve cpu {cpus[0]}, redis-server + load generators cpu {cpus[1]}"
                                                       if cpus[0] is not None else "none"))
    t0 = time.monotonic()
    with bl.TempDataDir(args.data_dir) as tmp:
        (tmp / "redis").mkdir()
        with RedisProc(tmp / "redis", cpu=cpus[1]) as redis:
            bl.progress(f"redis-server pid {redis.proc.pid} port {redis.port}")
            bench = Bench(args, cpus, redis, tmp)
            for i in range(args.rounds):
                bench.round(i, have)
            if not redis.alive():
                raise RuntimeError("redis-server died")
    rows = bench.results()
    bl.progress(f"done in {time.monotonic() - t0:.1f}s")
    labels = [s.label for s in setups(args.nodes)]
    if args.json:
        bl.dump_json({"benchmark": "nodes", "environment": bl.environment(args),
                      "pinning": {"qserve_cpu": cpus[0], "redis_and_loadgen_cpu": cpus[1]}, "results": rows,
                      "runs": [{"scenario": s, "setup": d, **r} for (s, d), runs in bench.runs.items() for r in runs]})
    else:
        print(f"# bench_nodes: medians of {args.rounds} alternating run(s) on {os.cpu_count()} CPUs; wrk "
              f"{CONNECTIONS} connections in all for {args.seconds:g} s; watch {args.consumers} consumers, "
              f"{args.entries} entries per run; redis-server appendfsync always; pinning "
              + (f"qserve cpu {cpus[0]}, the rest cpu {cpus[1]}" if cpus[0] is not None else "none"))
        print(render(rows, labels))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
