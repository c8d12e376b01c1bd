#!/usr/bin/env python3
"""Redis backend benchmark (#15): a qserve node on Redis next to a node on the local segment log and
to redis-py against the same Redis, measured in one run, alternating, medians.

    python -m tools.bench.redis                                   # full run (about 3 min on 2 cores)
    python -m tools.bench.redis --quick                           # smoke run (one short run of each)
    python -m tools.bench.redis --peer-python /venv/bin/python    # a Python with redis-py for the reference

What runs (everything on 127.0.0.1; every process started here is stopped by its pid at the end):
- ``redis-server`` in a temporary directory on a free port, ``--appendonly yes --appendfsync always
  --save ''`` (a put Redis answers is on disk), and two qserve nodes, both without a token (the
  reference scripts send none): "local" (``--data-dir`` a temporary directory, ``--fsync always``) and
  "redis" (``--backend redis://127.0.0.1:PORT/0``). Both nodes run throughout; each scenario runs
  on one of them while the other is idle.
- The reference figures come from the scripts of ``../shared/peerbench`` (``--peerbench``), run as they
  are: ``post.lua`` under ``wrk -t1 -c16 --latency`` on ``/api/predict/perf`` (durable put, 16
  connections); ``http_client_seq.py PORT SECONDS /api/predict/perfseq`` (one sequential
  ``http.client`` client); ``redis_streams.py PORT seq|group SECONDS`` (redis-py's XADD one at a time,
  and XREADGROUP COUNT 10 + XACK on a pre-filled stream) with ``--peer-python`` (a Python that
  imports ``redis``; default this one).
- Push + manual commit, window 10, with 1 and 4 consumers: `tools.bench.watch`'s throughput run (a
  fresh queue pre-filled with ``--entries`` entries, one group, each consumer commits what it has
  received, one commit in flight) against each node.
- Each round runs every scenario once per side; the order of the two nodes flips every round, the
  redis-py reference runs right after them. A figure is the median over ``--rounds`` rounds.
- Pinning (``--pin``, default on 2+ CPUs): the node under test on CPU 0; redis-server, the load
  generator (wrk, the client scripts) and this process on CPU 1. The redis-py client takes CPU 0,
  the node's place (the nodes are idle then).
- CPU: of the node, redis-server (/proc/PID/stat utime + stime before and after) and the load
  generator (its rusage once it has exited; this process's own for the watch consumers), in % of
  one core over the run; in the watch runs over the consume phase only (not the pre-fill), the
  consumers being this process.

Output: progress lines on stderr; the table (or ``--json``) on stdout. "vs local" is the redis node's
figure divided by the local node's; "vs redis-py" divides a node's figure by redis-py's (XADD seq for
puts, XREADGROUP + XACK for watch). "node us/op" and "redis us/op" are CPU microseconds per request
(or entry) of the node and of redis-server: unlike the rates they hardly change when other programs
share the machine ("other cpu" says how much they did). Target (from the issue): the redis node's durable put >= 0.7x the
local node's. Without wrk, the peerbench scripts or redis-py, the rows needing them are skipped with one
line saying why. Exit status 1 when a request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

from . import drive, lib as bl
from .watch import throughput

PEERBENCH = bl.REPO.parent / "shared" / "peerbench"
WINDOW = 10
PUT_C16, PUT_SEQ, XADD = "put c16 (wrk)", "put seq (http.client)", "put (redis-py XADD seq, 1 conn)"
GROUP_REF = "watch (redis-py XREADGROUP 10 + XACK)"
TARGET = 0.7
_WRK_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


class RedisProc(bl.ServerProc):
    """``redis-server`` on 127.0.0.1 and a free port, durable (AOF, fsync always), in `directory`;
    started when it answers PING. Stop, kill and the CPU reading are `ServerProc`'s."""

    def __init__(self, directory: Path, *, cpu: int | None) -> None:
        with socket.socket() as s:
            s.bind((bl.LOCALHOST, 0))
            port = s.getsockname()[1]
        super().__init__("redis-server", [
            "redis-server", "--port", str(port), "--bind", bl.LOCALHOST, "--dir", str(directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
            "--logfile", str(directory / "redis.log")], cpu=cpu)
        self.port = port
        self.directory = directory

    def start(self, timeout: float = 20.0) -> "RedisProc":
        cpu = self.cpu
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=self.directory,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)
        deadline = time.monotonic() + timeout
        while not self._pong():
            try:
                self.proc.wait(0.02)          # wait on the process: a server that dies is seen at once
            except subprocess.TimeoutExpired:
                if time.monotonic() < deadline:
                    continue
            self.kill()
            log = (self.directory / "redis.log").read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"redis-server did not start on port {self.port}: " + " | ".join(log))
        return self

    def _pong(self) -> bool:
        try:
            with socket.create_connection((bl.LOCALHOST, self.port), timeout=1.0) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def command_calls(port: int, command: str) -> int | None:
    """How many times the Redis server on 127.0.0.1:``port`` has run ``command`` (``INFO
    commandstats``; 0 before the first); None when it cannot be asked."""
    try:
        with socket.create_connection((bl.LOCALHOST, port), timeout=1.0) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
            data = b""
            while True:   # one bulk string: $<length>\r\n<text>\r\n
                chunk = s.recv(65536)
                if not chunk:
                    return None
                data += chunk
                head, _, rest = data.partition(b"\r\n")
                if head.startswith(b"$") and len(rest) >= int(head[1:]) + 2:
                    break
    except (OSError, ValueError):
        return None
    _, found, tail = data.partition(f"cmdstat_{command.lower()}:calls=".encode())
    return int(tail.split(b",", 1)[0]) if found else 0


def node(side: str, data_dir: Path, redis_url: str, cpu: int | None) -> bl.ServerProc:
    """A qserve node without a token: "local" (segment log, fsync always) or "redis"."""
    where = ["--backend", redis_url] if side == "redis" else ["--data-dir", str(data_dir), "--fsync", "always"]
    return bl.ServerProc(f"qserve {side}", [sys.executable, "-m", "qserve", "serve", "--host", bl.LOCALHOST,
                                            "--port", "0", *where], cpu=cpu)


def run_child(args: list[str], *, cpu: int | None, timeout: float) -> tuple[str, float, float]:
    """Run a load generator to its end: (stdout, its CPU seconds from its rusage, wall seconds)."""
    [out], cpu_seconds, wall = run_children([args], cpu=cpu, timeout=timeout)
    return out, cpu_seconds, wall


def run_children(commands: list[list[str]], *, cpu: int | None, timeout: float) -> tuple[list[str], float, float]:
    """Run load generators side by side to their end: (the stdout of each, their CPU seconds together
    from their rusage, wall seconds until the last one ended). Nothing else of ours exits meanwhile,
    so the growth of RUSAGE_CHILDREN is theirs. Each one's output is small (a report), so reading
    them one after the other cannot stall one on a full pipe."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=bl.REPO,
                              preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)
             for args in commands]
    results = []
    try:
        for args, proc in zip(commands, procs):
            try:
                results.append(proc.communicate(timeout=max(0.0, t0 + timeout - time.perf_counter())))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{Path(args[1] if args[0] == sys.executable else args[0]).name} "
                                   f"did not finish within {timeout:.0f} s") from None
    finally:
        for proc in procs:               # only those still running: a failure or a timeout above
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for args, proc, (_, err) in zip(commands, procs, results):
        if proc.returncode != 0:
            last = (err.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{' '.join(args[:3])} exited {proc.returncode}: {last}")
    return [out for out, _ in results], (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), wall


def measured(servers: dict[str, bl.ServerProc], fn) -> dict:
    """Run `fn()` -> (row, load generator CPU seconds, wall seconds) and add the CPU % of each process,
    and "other": the machine's busy CPU less all of ours (other programs, the kernel's fsync work)."""
    before = {k: s.cpu_seconds() for k, s in servers.items()}
    self0, busy0 = bl.self_cpu_seconds(), bl.system_busy_seconds()
    row, gen_cpu, wall = fn()
    ours = gen_cpu + bl.self_cpu_seconds() - self0
    for k, s in servers.items():
        used = s.cpu_seconds() - before[k]
        ours += used
        row[f"{k}_cpu_pct"] = round(100 * used / wall, 1)
    row["gen_cpu_pct"] = round(100 * gen_cpu / wall, 1)
    row["other_cpu_pct"] = round(max(0.0, 100 * (bl.system_busy_seconds() - busy0 - ours) / wall), 1)
    return row


def parse_wrk(out: str) -> dict:
    """Requests/sec, p50 / p99 (``--latency``) and failures from wrk's report."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError("wrk printed no Requests/sec: " + " | ".join(out.strip().splitlines()[-3:]))
    lat = {p: float(v) * _WRK_UNIT[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    bad += sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {"rate": float(rps.group(1)), "p50_ms": lat.get("50"), "p99_ms": lat.get("99"), "errors": bad}


class _Paired:
    """The node as `watch.throughput`'s CPU meter sees it. The meter reads `cpu_seconds()` once when
    the consumers start and once when the last commit is answered; each reading also takes
    redis-server's, so its CPU over the same phase is known (the pre-fill before it not counted)."""

    def __init__(self, node: bl.ServerProc, redis: RedisProc) -> None:
        self.node, self.redis = node, redis
        self.readings: list[float] = []

    def cpu_seconds(self) -> float:
        self.readings.append(self.redis.cpu_seconds())
        return self.node.cpu_seconds()


class Bench:
    """One run: the processes, the scenarios, the runs recorded per (scenario, side)."""

    def __init__(self, args: argparse.Namespace, cpus: tuple[int | None, int | None],
                 redis: RedisProc, nodes: dict[str, bl.ServerProc]) -> None:
        self.args, self.cpus, self.redis, self.nodes = args, cpus, redis, nodes
        self.runs: dict[tuple[str, str], list[dict]] = {}
        self.peer = Path(args.peerbench)

    def record(self, scenario: str, side: str, row: dict, unit: str) -> None:
        row["unit"] = unit
        self.runs.setdefault((scenario, side), []).append(row)
        cpu = "  ".join(f"{k} {row[f'{k}_cpu_pct']:.0f}%" for k in ("node", "redis", "gen", "other") if f"{k}_cpu_pct" in row)
        p50 = f", p50 {row['p50_ms']:.2f} ms" if row.get("p50_ms") is not None else ""
        bl.progress(f"  {scenario} [{side}]: {row['rate']:,.0f} {unit}{p50}; cpu {cpu}"
                    + (f"; {row['errors']} errors" if row["errors"] else ""))

    def put_wrk(self, side: str) -> None:
        n = self.nodes[side]
        args = ["wrk", "-t1", "-c16", f"-d{max(1, round(self.args.seconds))}s", "--latency", "-s",
                str(self.peer / "post.lua"), f"http://{bl.LOCALHOST}:{n.port}/api/predict/perf"]

        def go():
            out, cpu, wall = run_child(args, cpu=self.cpus[1], timeout=self.args.seconds + 30)
            return parse_wrk(out), cpu, wall
        self.record(PUT_C16, side, measured({"node": n, "redis": self.redis}, go), "req/s")

    def put_seq(self, side: str) -> None:
        n = self.nodes[side]
        args = [sys.executable, str(self.peer / "http_client_seq.py"), str(n.port), str(self.args.seconds),
                "/api/predict/perfseq"]

        def go():
            out, cpu, wall = run_child(args, cpu=self.cpus[1], timeout=self.args.seconds + 30)
            doc = json.loads(out)
            return {"rate": doc["req_per_s"], "p50_ms": doc["p50_us"] / 1000, "p99_ms": doc["p99_us"] / 1000,
                    "errors": doc["non_200"]}, cpu, wall
        self.record(PUT_SEQ, side, measured({"node": n, "redis": self.redis}, go), "req/s")

    def redis_py(self, mode: str, seconds: float) -> None:
        args = [self.args.peer_python, str(self.peer / "redis_streams.py"), str(self.redis.port), mode, str(seconds)]

        def go():
            out, cpu, wall = run_child(args, cpu=self.cpus[0], timeout=seconds + 120)
            doc = json.loads(out)
            return {"rate": doc["ops_per_s"], "p50_ms": doc["p50_us"] / 1000, "p99_ms": doc["p99_us"] / 1000,
                    "errors": 0}, cpu, wall
        # group: the run includes redis_streams.py's pre-fill, so its CPU figures would mislead
        servers = {"redis": self.redis} if mode == "seq" else {}
        row = measured(servers, go)
        if mode != "seq":
            row.pop("gen_cpu_pct")
        self.record(XADD if mode == "seq" else GROUP_REF, "redis-py", row, "ops/s" if mode == "seq" else "entries/s")

    def watch(self, side: str, consumers: int) -> None:
        n = self.nodes[side]
        paired = _Paired(n, self.redis)
        row = trio.run(lambda: throughput(n.port, bl.TOKEN, consumers=consumers, window=WINDOW, auto=False,
                                          entries=self.args.entries, server=paired, timeout=self.args.timeout,
                                          ws_client="lean"))
        redis_pct = round(100 * (paired.readings[-1] - paired.readings[0]) / row["seconds"], 1)
        self.record(f"watch manual w{WINDOW} c{consumers}", side,
                    {"rate": row["entries_per_s"], "p50_ms": None, "errors": row["errors"],
                     "node_cpu_pct": row["server_cpu_pct"], "redis_cpu_pct": redis_pct,
                     "gen_cpu_pct": row["client_cpu_pct"],
                     "other_cpu_pct": round(max(0.0, row["other_cpu_pct"] - redis_pct), 1)}, "entries/s")

    def round(self, i: int, have: dict[str, bool]) -> None:
        sides = ("local", "redis") if i % 2 == 0 else ("redis", "local")
        bl.progress(f"round {i + 1}/{self.args.rounds} (nodes in the order {', '.join(sides)})")
        if have["wrk"]:
            for side in sides:
                self.put_wrk(side)
        if have["scripts"]:
            for side in sides:
                self.put_seq(side)
        if have["redis-py"]:
            self.redis_py("seq", self.args.seconds)
        for consumers in (1, 4):
            for side in sides:
                self.watch(side, consumers)
        if have["redis-py"]:
            self.redis_py("group", self.args.group_seconds)

    def results(self) -> list[dict]:
        """Medians per (scenario, side), with the ratios."""
        med = {}
        for (scenario, side), runs in self.runs.items():
            row = {"scenario": scenario, "side": side, "unit": runs[0]["unit"], "runs": len(runs),
                   "errors": sum(r["errors"] for r in runs), "all": [r["rate"] for r in runs]}
            for key in ("rate", "p50_ms", "node_cpu_pct", "redis_cpu_pct", "gen_cpu_pct", "other_cpu_pct"):
                vals = [r[key] for r in runs if r.get(key) is not None]
                row[key] = statistics.median(vals) if vals else None
            row["node_us"] = bl.per_item_us(row["node_cpu_pct"], row["rate"])
            row["redis_us"] = bl.per_item_us(row["redis_cpu_pct"], row["rate"])
            med[(scenario, side)] = row
        for (scenario, side), row in med.items():
            local = med.get((scenario, "local"))
            ref = med.get((GROUP_REF if scenario.startswith("watch") else XADD, "redis-py"))
            row["vs_local"] = round(row["rate"] / local["rate"], 3) if side == "redis" and local else None
            row["vs_redis_py"] = round(row["rate"] / ref["rate"], 3) if side != "redis-py" and ref else None
        return list(med.values())


def render(rows: list[dict]) -> str:
    order = [PUT_C16, PUT_SEQ, XADD, f"watch manual w{WINDOW} c1", f"watch manual w{WINDOW} c4", GROUP_REF]
    rows = sorted(rows, key=lambda r: (order.index(r["scenario"]), r["side"] != "local"))
    ratio = lambda x: "-" if x is None else f"{x:.2f}x"
    pct = lambda x: "-" if x is None else f"{x:.0f}%"
    return bl.table([[r["scenario"], r["side"], bl.fmt_num(r["rate"]), r["unit"], bl.fmt_num(r["p50_ms"], 2),
                      ratio(r["vs_local"]), ratio(r["vs_redis_py"]), pct(r["node_cpu_pct"]), pct(r["redis_cpu_pct"]),
                      pct(r["gen_cpu_pct"]), pct(r["other_cpu_pct"]), bl.fmt_num(r["node_us"]),
                      bl.fmt_num(r["redis_us"]), r["runs"], r["errors"]] for r in rows],
                    ["scenario", "side", "median", "unit", "p50 ms", "vs local", "vs redis-py", "node cpu",
                     "redis cpu", "loadgen cpu", "other cpu", "node us/op", "redis us/op", "runs", "errors"])


def targets(rows: list[dict]) -> list[str]:
    return [f"target {r['scenario']}: redis node >= {TARGET:.2f}x the local node: {r['vs_local']:.2f}x -> "
            + ("met" if r["vs_local"] >= TARGET else "MISSED") for r in rows
            if r["side"] == "redis" and r["scenario"] in (PUT_C16, PUT_SEQ) and r["vs_local"] is not None]


def available(args: argparse.Namespace) -> dict[str, bool]:
    """What the reference rows need; one line for each thing missing."""
    have = {"wrk": shutil.which("wrk") is not None,
            "scripts": all((Path(args.peerbench) / f).is_file() for f in ("post.lua", "http_client_seq.py",
                                                                           "redis_streams.py"))}
    if not have["scripts"]:
        bl.progress(f"no peerbench scripts in {args.peerbench} (--peerbench): the wrk, http.client and redis-py rows are skipped")
    elif not have["wrk"]:
        bl.progress("wrk not installed (apt-get install wrk): the put c16 rows are skipped")
    have["wrk"] = have["wrk"] and have["scripts"]
    try:
        have["redis-py"] = have["scripts"] and subprocess.run([args.peer_python, "-c", "import redis"],
                                                              capture_output=True).returncode == 0
    except OSError:                  # no such interpreter
        have["redis-py"] = False
    if have["scripts"] and not have["redis-py"]:
        bl.progress(f"{args.peer_python} cannot import redis (pip install redis, or --peer-python): the redis-py rows are skipped")
    return have


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="runs of each scenario per side (default 3; --quick 1)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per put run (default 4; --quick 1)")
    p.add_argument("--group-seconds", type=float, default=None, help="seconds of redis-py's group run (default 3; --quick 1)")
    p.add_argument("--entries", type=int, default=None, help="entries per watch run (default 10000; --quick 200)")
    p.add_argument("--timeout", type=float, default=60.0, help="give up on one watch run after this long")
    p.add_argument("--quick", action="store_true", help="one short run of each")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="node on CPU 0; redis-server, load generator and this process on CPU 1 (default on with 2+ CPUs)")
    p.add_argument("--peerbench", default=str(PEERBENCH), help=f"the reference scripts (default {PEERBENCH})")
    p.add_argument("--peer-python", default=sys.executable, help="the Python that runs redis_streams.py (needs redis-py)")
    p.add_argument("--data-dir", default=None, help="parent of the temporary directories (default: system temp)")
    args = p.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 3)
    args.seconds = args.seconds or (1.0 if quick else 4.0)
    args.group_seconds = args.group_seconds or (1.0 if quick else 3.0)
    args.entries = args.entries or (200 if quick else 10000)
    return guarded("bench redis", run, args)


def guarded(name: str, fn, args: argparse.Namespace) -> int:
    """`fn(args)`'s exit status; 2 in one line without redis-server, 1 in one line when `fn` raises
    RuntimeError (a process that did not start or died, a tool that failed)."""
    if shutil.which("redis-server") is None:
        print(f"{name}: redis-server not installed (apt-get install redis-server): nothing to measure",
              file=sys.stderr)
        return 2
    try:
        return fn(args)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines() or ["failed"]
        print(f"{name}: " + lines[0] + (f" {lines[-1].strip()}" if len(lines) > 1 else ""), file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    """The whole run; the table (or JSON) on stdout; 1 when a request failed."""
    cpus = bl.default_pinning(args.pin)
    bl.pin_self(cpus[1])
    have = available(args)
    probe = bl.fsync_probe(Path(args.data_dir or os.environ.get("TMPDIR") or "/tmp"))
    bl.progress(f"fsync probe: p50 {probe['p50_ms']:.2f} ms; pinning: node cpu {cpus[0]}, "
                f"redis-server + load generator cpu {cpus[1]}")
    t0 = time.monotonic()
    with bl.TempDataDir(args.data_dir) as tmp:
        (tmp / "redis").mkdir()
        with RedisProc(tmp / "redis", cpu=cpus[1]) as redis:
            url = f"redis://{bl.LOCALHOST}:{redis.port}/0"
            with node("local", tmp / "local", url, cpus[0]) as local, node("redis", tmp / "local", url, cpus[0]) as rnode:
                nodes = {"local": local, "redis": rnode}
                bl.progress(f"redis-server pid {redis.proc.pid} port {redis.port}; "
                            + "; ".join(f"qserve {k} pid {n.proc.pid} port {n.port}" for k, n in nodes.items()))
                for n in nodes.values():           # warm-up: the queues exist, the code paths ran once
                    for q in ("perf", "perfseq"):
                        trio.run(lambda: drive.put_many(n.port, q, 200, connections=16, label=f"warm-up {n.name}"))
                bench = Bench(args, cpus, redis, nodes)
                for i in range(args.rounds):
                    bench.round(i, have)
                for n in (redis, *nodes.values()):
                    if not n.alive():
                        raise RuntimeError(f"{n.name} died: {(n.lines or ['no output'])[-1]}")
    rows = bench.results()
    bl.progress(f"done in {time.monotonic() - t0:.1f}s")
    if args.json:
        bl.dump_json({"benchmark": "redis", "environment": bl.environment(args), "fsync_probe": probe,
                      "pinning": {"node_cpu": cpus[0], "redis_and_loadgen_cpu": cpus[1]}, "results": rows,
                      "runs": [{"scenario": s, "side": d, **r} for (s, d), runs in bench.runs.items() for r in runs],
                      "targets": targets(rows)})
    else:
        print(f"# bench_redis: medians of {args.rounds} alternating run(s); puts {args.seconds:g} s, watch "
              f"{args.entries} entries per run; redis-server appendfsync always; fsync probe p50 "
              f"{probe['p50_ms']:.2f} ms; node cpu {cpus[0]}, redis-server + load generator cpu {cpus[1]}")
        print(render(rows))
        for line in targets(rows):
            print(line)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
