#!/usr/bin/env python3
"""What scraping `GET /metrics` costs the put rate: 16 connections putting, with and without a scraper.

    python -m tools.bench.metrics_cost                  # 3 rounds; the scraper 1,000 scrapes back to back
    python -m tools.bench.metrics_cost --interval 0.01  # the scraper: one scrape every 10 ms
    python -m tools.bench.metrics_cost --path /healthz  # the control: a loop of the cheapest request
    python -m tools.bench.metrics_cost --quick          # smoke run (100 scrapes, 1 round)

What runs:
- One qserve node (local backend, ``--fsync always``, no token), on CPU 0 with ``--pin`` (default on
  2+ CPUs); ``--queues N`` other services hold one entry each, so that the exposition has the size of a
  server with N + 1 services (each queue adds its own figures).
- The load: ``wrk -t1 -c16 --latency -s post.lua`` on ``/api/predict/perf`` (durable puts of 100
  bytes, as ``../shared/peerbench`` drives them), on CPU 1 with this process.
- The scraper (a thread of this process): ``--scrapes`` GET /metrics on one keep-alive connection,
  back to back, or one each ``--interval`` seconds; every answer must be a 200 holding
  ``qserve_puts_total``. wrk is stopped (SIGINT: it prints its report) when the scraper is done.
  ``--path /healthz`` runs the same loop on the cheapest request there is: back to back, any
  request loop is one more client sharing the node's CPU with the 16 putting, and this control says
  how much of the cost is that rather than the scrape.
- Each round runs the load once with the scraper and once without it for the same wall time; the
  order flips every round (without-first rounds reuse the last with-scraper wall time). Figures are
  medians over ``--rounds``.

Output: progress lines on stderr; the table (or ``--json``) on stdout: put/s, p50/p99 (wrk), the
node's CPU (% of one core) and CPU microseconds per put, "other" CPU (everything else on the
machine: when high, the run was disturbed), and the scrapes' p50/p99 and count. "cost" is
1 - (put/s with the scraper) / (put/s without). Target (from the issue): < 5 %. Exit status 1 when a
put or a scrape failed.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import lib as bl
from .redis import parse_wrk

PEERBENCH = bl.REPO.parent / "shared" / "peerbench"
TARGET = 0.05


class Scraper(threading.Thread):
    """``count`` scrapes of /metrics on one keep-alive connection (``interval`` apart, 0: back to back)."""

    def __init__(self, port: int, count: int, interval: float, path: str) -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.interval, self.path = port, count, interval, path
        self.latencies_ns: list[int] = []
        self.errors = 0
        self.size = 0
        self.wall = 0.0

    def run(self) -> None:
        conn = http.client.HTTPConnection(bl.LOCALHOST, self.port, timeout=30)
        began = time.perf_counter()
        for i in range(self.count):
            t = time.perf_counter_ns()
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200 and (self.path != "/metrics" or b"qserve_puts_total" in body)
                self.size = len(body)
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
            self.latencies_ns.append(time.perf_counter_ns() - t)
            self.errors += not ok
            if self.interval:
                time.sleep(max(0.0, began + (i + 1) * self.interval - time.perf_counter()))
        self.wall = time.perf_counter() - began
        conn.close()


def put_run(node: bl.ServerProc, lua: Path, cpu: int | None, *, scrapes: int, interval: float, path: str,
            wall: float | None) -> dict:
    """One load run: with a scraper (``scrapes`` > 0: it sets the wall time) or for ``wall`` seconds."""
    before_cpu, busy0, self0 = node.cpu_seconds(), bl.system_busy_seconds(), bl.self_cpu_seconds()
    wrk = subprocess.Popen(["wrk", "-t1", "-c16", "-d3600s", "--latency", "-s", str(lua),
                            f"http://{bl.LOCALHOST}:{node.port}/api/predict/perf"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)
    t0 = time.perf_counter()
    scraper = None
    try:
        if scrapes:
            scraper = Scraper(node.port, scrapes, interval, path)
            scraper.start()
            scraper.join()
        else:
            time.sleep(wall)
    finally:
        wrk.send_signal(signal.SIGINT)
        out, err = wrk.communicate(timeout=30)
    elapsed = time.perf_counter() - t0
    row = parse_wrk(out)
    used = node.cpu_seconds() - before_cpu
    row.update(wall=elapsed, node_cpu_pct=100 * used / elapsed, node_us_per_put=bl.per_item_us(100 * used / elapsed, row["rate"]),
               other_cpu_pct=max(0.0, 100 * (bl.system_busy_seconds() - busy0 - used - (bl.self_cpu_seconds() - self0))
                                 / elapsed))
    if scraper is not None:
        lat = bl.summary(scraper.latencies_ns)
        row.update(scrapes=len(scraper.latencies_ns), scrape_errors=scraper.errors, scrape_p50_ms=lat["p50_ms"],
                   scrape_p99_ms=lat["p99_ms"], exposition_bytes=scraper.size)
    side = "with scraper" if scraper else "without"
    bl.progress(f"  {side}: {row['rate']:,.0f} put/s, p50 {row['p50_ms']:.2f} ms over {elapsed:.1f} s; node cpu "
                f"{row['node_cpu_pct']:.0f}%, other {row['other_cpu_pct']:.0f}%"
                + (f"; {row['scrapes']} scrapes, p50 {row['scrape_p50_ms']:.2f} ms" if scraper else ""))
    return row


def prepare(node: bl.ServerProc, queues: int) -> None:
    """Give the node ``queues`` other services of one entry each (their figures are in every scrape)."""
    conn = http.client.HTTPConnection(bl.LOCALHOST, node.port, timeout=30)
    for i in range(queues):
        conn.request("POST", f"/api/predict/other{i}", b"x")
        conn.getresponse().read()
    conn.close()


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scrapes", type=int, default=1000, help="scrapes per run with the scraper (default 1000)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between scrapes (default 0: back to back)")
    p.add_argument("--path", default="/metrics", help="what the scraper asks for (/healthz: the control)")
    p.add_argument("--queues", type=int, default=4, help="other services in the node (default 4)")
    p.add_argument("--quick", action="store_true", help="1 round of 100 scrapes")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--data-dir", help="parent of the node's temporary data directory")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.scrapes = 1, 100
    lua = PEERBENCH / "post.lua"
    if shutil.which("wrk") is None or not lua.is_file():
        print(f"metrics_cost: needs wrk on PATH and {lua}", file=sys.stderr)
        return 2
    server_cpu, client_cpu = bl.default_pinning(args.pin)
    bl.pin_self(client_cpu)
    runs: dict[str, list[dict]] = {"without": [], "with scraper": []}
    with bl.TempDataDir(args.data_dir) as data:
        node = bl.ServerProc("qserve", [sys.executable, "-m", "qserve", "serve", "--host", bl.LOCALHOST, "--port", "0",
                                        "--data-dir", str(data), "--fsync", "always"], cpu=server_cpu)
        with node:
            prepare(node, args.queues)
            wall = None
            for n in range(args.rounds):
                bl.progress(f"round {n + 1}/{args.rounds}")
                order = ["with scraper", "without"] if n % 2 == 0 or wall is None else ["without", "with scraper"]
                for side in order:
                    scraping = side == "with scraper"
                    row = put_run(node, lua, client_cpu, scrapes=args.scrapes if scraping else 0,
                                  interval=args.interval, path=args.path, wall=wall)
                    if scraping:
                        wall = row["wall"]
                    runs[side].append(row)
    base, scraped = median(runs["without"], "rate"), median(runs["with scraper"], "rate")
    cost = 1 - scraped / base
    errors = sum(r["errors"] for rs in runs.values() for r in rs) + sum(r["scrape_errors"] for r in runs["with scraper"])
    doc = {"environment": bl.environment(args), "runs": runs, "put_rate_without": base, "put_rate_with": scraped,
           "ratio": scraped / base, "cost": cost, "target": TARGET, "errors": errors}
    if args.json:
        bl.dump_json(doc)
    else:
        rows = [[side, bl.fmt_num(median(rs, "rate")), bl.fmt_num(median(rs, "p50_ms"), 2),
                 bl.fmt_num(median(rs, "p99_ms"), 2), bl.fmt_num(median(rs, "node_cpu_pct")),
                 bl.fmt_num(median(rs, "node_us_per_put"), 1), bl.fmt_num(median(rs, "other_cpu_pct")),
                 bl.fmt_num(median(rs, "scrapes")), bl.fmt_num(median(rs, "scrape_p50_ms"), 2),
                 bl.fmt_num(median(rs, "scrape_p99_ms"), 2)] for side, rs in runs.items()]
        bl.table(rows, ["run", "put/s", "p50 ms", "p99 ms", "node cpu %", "node us/put", "other cpu %",
                        "scrapes", "scrape p50 ms", "scrape p99 ms"], file=sys.stdout)
        size = median(runs["with scraper"], "exposition_bytes")
        print(f"\nratio {scraped / base:.3f}, cost {100 * cost:.1f}% (target < {100 * TARGET:.0f}%); "
              f"{args.scrapes} GET {args.path} a run {'back to back' if not args.interval else f'every {args.interval} s'}, "
              f"exposition {bl.fmt_num(size)} bytes; {errors} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
