"""Smoke tests of the benchmark tools: the smallest configuration of each runs end to end.

They prove the tools still work against the current server (exit status 0 = no request failed,
and the table or JSON is printed); the numbers themselves are not checked. Each takes a few
seconds; the full benchmarks are run by hand (see the docstrings of tools/bench/*.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers.machine import command_missing, under_ci
from ..helpers.redis_server import require_redis_server


def have_wrk() -> bool:
    """Whether wrk is here for the tools' concurrent rows. Without it a tool leaves those rows out
    and says so, which a developer's machine may test; under CI (`.ci/run` installs it) it must be there."""
    if shutil.which("wrk"):
        return True
    assert not under_ci(), "wrk not installed (apt-get install wrk)"
    return False


def require_peerbench() -> None:
    """The reference scripts the tools measure against (``../shared/peerbench`` next to the
    repository): skip without them (a clone elsewhere), fail under CI."""
    peerbench = Path(__file__).resolve().parents[2].parent / "shared" / "peerbench"   # tools.bench.redis.PEERBENCH
    if not (peerbench / "post.lua").is_file():
        command_missing(f"no reference scripts in {peerbench} (the project's ../shared/peerbench)")

REPO = Path(__file__).resolve().parents[2]


def run_tool(name: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`python -m tools.bench.<name> ...` from the repository root."""
    proc = subprocess.run([sys.executable, "-m", f"tools.bench.{name}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def test_bench_http_quick_prints_table(tmp_path):
    proc = run_tool("http", "--quick", "--seconds", "0.3", "--warmup", "0.1", "--data-dir", str(tmp_path))
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("scenario"))
    for column in ("req/s", "p50 ms", "p99 ms", "ratio"):
        assert column in header
    for row in ("put c1", "put c16", "get c1", "get c16", "put seq c1"):
        assert row in out
    assert "qserve(always)" in out and "bare" in out
    assert "1.00x" in out                      # the bare rows are the ratio's reference
    assert "fsync probe" in out and "target durable put c16" in out
    assert "req/s" in proc.stderr              # progress went to stderr
    assert list(tmp_path.iterdir()) == []      # temporary data directories removed


def test_bench_http_json(tmp_path):
    proc = run_tool("http", "--quick", "--seconds", "0.2", "--warmup", "0.1", "--connections", "2",
                    "--no-seq", "--json", "--data-dir", str(tmp_path))
    doc = json.loads(proc.stdout)
    rows = {(r["scenario"], r["server"]): r for r in doc["results"]}
    assert set(rows) == {("put", "qserve(always)"), ("put", "bare"), ("get", "qserve(always)"), ("get", "bare")}
    for r in rows.values():
        assert r["requests"] > 0 and r["errors"] == 0 and r["p50_ms"] > 0
    assert rows[("put", "bare")]["ratio_to_bare"] == 1.0


@pytest.mark.slow   # every watch mode against a server: about 7 s; `pytest -m slow` runs it
def test_bench_watch_quick_prints_tables(tmp_path):
    proc = run_tool("watch", "--quick", "--data-dir", str(tmp_path))
    out = proc.stdout
    assert "## throughput" in out and "## put -> receive latency" in out
    assert "entries/s" in out and "p50 ms" in out and "p99 ms" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("auto ", "manual "))]
    assert {(r[0], r[1], r[2]) for r in rows} == {("auto", "10", "4"), ("manual", "10", "4")}
    assert all(r[3] == "300" for r in rows)    # every pre-filled entry delivered
    assert "half peak" in out
    assert "target manual commit w10" in out
    # the latency floor (bare trio+h11 server at the same rate) is measured and stated per mode
    assert "floor p50" in out and "put p50" in out and " late " in out
    # CPU per entry at the latency rate, next to the bare server's CPU per request at that rate
    lat_header = next(line for line in out.splitlines() if line.startswith("load ") and "floor p99" in line)
    assert "srv us/entry" in lat_header and "floor us/req" in lat_header
    half = [line for line in out.splitlines() if line.startswith("half peak")]
    assert len(half) == 2 and all("-" not in line.split()[-8:-2] for line in half)   # every figure measured
    notes = [line for line in out.splitlines() if line.startswith("target latency")]
    assert len(notes) == 2 and all("floor p50 here: bare trio+h11 round trip at this rate" in n for n in notes)
    assert all("bare round trip p99" in n for n in notes)
    assert "+ one fsync" in next(n for n in notes if "auto commit" in n)


def test_bench_watch_json(tmp_path):
    proc = run_tool("watch", "--quick", "--entries", "100", "--consumers", "2", "--modes", "manual",
                    "--no-latency", "--json", "--data-dir", str(tmp_path),
                    "--server-arg=--no-fsync-poll")   # passed to `qserve serve` (refused there if unknown)
    doc = json.loads(proc.stdout)
    [row] = doc["throughput"]
    assert (row["mode"], row["window"], row["consumers"]) == ("manual", 10, 2)
    assert row["received"] == 100 and row["final_length"] == 0 and row["duplicates"] == 0 and row["errors"] == 0
    assert doc["latency"] == []


def test_bench_storage_small_run_prints_every_measure(tmp_path):
    proc = run_tool("storage", "--entries", "3000", "--appends", "400", "--every-appends", "40",
                    "--more-clients", "", "--repeat", "1", "--drain-entries", "300", "--dir", str(tmp_path))
    rows = {line.split("  ")[0].strip() for line in proc.stdout.splitlines() if "  " in line}
    for measure in ("fsync of a 16-record round, p50", "drain 300 priority entries, head pending", "appends/s nosync", "ceiling, 16 outstanding, here", "appends/s every",
                    "appends/s interval", "appends/s group-sim", "appends/s group x16", "appends/s group-aio",
                    "reopen 3000 entries", "RAM/entry incl. requestId table, skip links"):
        assert measure in rows, (measure, proc.stdout)


def test_bench_waiters_small_run(tmp_path):
    proc = run_tool("waiters", "--waiters", "0,20", "--seconds", "0.3", "--warmup", "0.1", "--json",
                    "--data-dir", str(tmp_path))
    rows = json.loads(proc.stdout)
    assert [r["waiters"] for r in rows] == [0, 20] and rows[1]["parked"] == 20
    assert all(r["errors"] == 0 and r["puts_per_s"] > 0 for r in rows)


@pytest.mark.slow   # a local and a Redis node with wrk, http.client and watchers: about 10 s; `pytest -m slow` runs it
def test_bench_redis_quick_prints_table(tmp_path):
    """One short run of each scenario against a node on the local backend, a node on Redis and (when
    this Python has redis-py) redis-py itself; every process it started is gone and its temporary
    directories removed."""
    require_redis_server()
    require_peerbench()
    proc = run_tool("redis", "--quick", "--seconds", "1", "--entries", "100", "--data-dir", str(tmp_path),
                    timeout=120.0)
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("scenario"))
    for column in ("median", "vs local", "vs redis-py", "node cpu", "redis cpu", "loadgen cpu", "other cpu"):
        assert column in header
    rows = {tuple(re.split(r"\s{2,}", line)[:2]) for line in out.splitlines() if line.startswith(("put ", "watch "))}
    expected = {("put seq (http.client)", "local"), ("put seq (http.client)", "redis"),
                ("watch manual w10 c1", "local"), ("watch manual w10 c1", "redis"),
                ("watch manual w10 c4", "local"), ("watch manual w10 c4", "redis")}
    if have_wrk():
        expected |= {("put c16 (wrk)", "local"), ("put c16 (wrk)", "redis")}
        assert "target put c16 (wrk): redis node >= 0.70x the local node" in out
    else:
        assert "wrk not installed" in proc.stderr
    assert expected <= rows, out
    assert "redis-server pid" in proc.stderr and "round 1/1" in proc.stderr    # progress went to stderr
    assert list(tmp_path.iterdir()) == []
    running = [pid for pid in Path("/proc").iterdir() if pid.name.isdigit() and _cmdline_has(pid, str(tmp_path))]
    assert running == []                       # redis-server and both nodes stopped


def _cmdline_has(proc_dir: Path, text: str) -> bool:
    try:
        return text in (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:                            # the process ended meanwhile
        return False


@pytest.mark.slow   # every target of #19 with its references: about 20 s; `pytest -m slow` runs it
def test_bench_ratios_quick_prints_table(tmp_path):
    """One short round of every target next to its reference (bare trio+h11, the fsync floor, Redis
    when it is here), the table on stdout; every process it started is gone and its directories removed."""
    require_redis_server()
    require_peerbench()
    proc = run_tool("ratios", "--quick", "--data-dir", str(tmp_path), timeout=240.0)
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("target"))
    for column in ("qserve", "reference", "ratio", "target", "verdict"):
        assert column in header
    for row in ("durable put seq (http.client)", "push+manual commit w10, 4 consumers", "latency manual p50",
                "latency manual p99", "latency auto p50", "server's CPU at work at that rate",
                "of which polling while idle", "group-commit rounds over 5 ms in the run", "its puts' own answers, p50",
                "restart, 5,000 entries",
                "RAM per stored entry", "idle conns"):
        assert row in out, (row, out)
    if have_wrk():
        assert "durable put c16 (wrk)" in out and "bare trio+h11" in out
        assert "writes per fsync round" in out and "fsync rounds' share of the wall time" in out
    assert "round 1/1" in proc.stderr                # progress went to stderr
    if len(os.sched_getaffinity(0)) >= 2:           # pinned: the ceiling's fsync on the servers' CPU,
        assert re.search(r"fsync_bench: p50 \d+ us on the servers' CPU \d+, \d+ us on CPU \d+", proc.stderr)
        assert "same, fsync measured on the client CPU" in out
    assert "writing" not in out                      # the storage bench's progress too
    assert list(tmp_path.iterdir()) == []
    running = [pid for pid in Path("/proc").iterdir() if pid.name.isdigit() and _cmdline_has(pid, str(tmp_path))]
    assert running == []


def test_bench_wakeup_small_run_prints_both_sides():
    """The loopback ping-pong with the answering side asleep and polling: one line per run, then
    the medians; the child processes it starts end with each run."""
    proc = run_tool("wakeup", "--rounds", "1", "--count", "500")
    assert re.search(r"round 1/1, answering side sleeping: round trip p50 [\d.]+ us", proc.stderr)
    assert re.search(r"round 1/1, answering side polling: round trip p50 [\d.]+ us", proc.stderr)
    m = re.search(r"round trip p50: ([\d.]+) us with the answering side asleep, ([\d.]+) us with it polling",
                  proc.stdout)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0


@pytest.mark.slow   # four set-ups on one redis-server, wrk on each: about 15 s; `pytest -m slow` runs it
def test_bench_nodes_quick_prints_table(tmp_path):
    """One short run of each set-up - a local node, one Redis node, two separate Redis nodes, one
    `--processes 2` - on one redis-server; the CPU of every qserve process is in the table, and
    every process it started is gone and its temporary directories removed."""
    require_redis_server()
    require_peerbench()
    proc = run_tool("nodes", "--quick", "--seconds", "1", "--entries", "100", "--data-dir", str(tmp_path),
                    timeout=120.0)
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("scenario"))
    for column in ("median", "vs 1 node", "vs local", "qserve cpu", "per process", "redis cpu", "loadgen cpu",
                   "other cpu", "busy", "qserve us/op"):
        assert column in header
    rows = {tuple(re.split(r"\s{2,}", line)[:2]): re.split(r"\s{2,}", line)
            for line in out.splitlines() if line.startswith(("put ", "watch "))}
    setups = ("local", "redis 1 node", "redis 2 nodes", "redis --processes 2")
    scenarios = ["watch manual w10 c4"] + (["put c16 (wrk)"] if have_wrk() else [])
    assert {(s, d) for s in scenarios for d in setups} <= set(rows), out
    for scenario in scenarios:
        assert rows[(scenario, "redis 1 node")][5] == "1.00x" and rows[(scenario, "local")][6] == "1.00x"
        assert re.fullmatch(r"\d+/\d+", rows[(scenario, "redis 2 nodes")][8])          # each node's CPU
        assert re.fullmatch(r"sup\d+\+\d+/\d+", rows[(scenario, "redis --processes 2")][8])   # supervisor + 2
    assert "redis-server pid" in proc.stderr and "round 1/1" in proc.stderr    # progress went to stderr
    assert list(tmp_path.iterdir()) == []
    running = [pid for pid in Path("/proc").iterdir() if pid.name.isdigit() and _cmdline_has(pid, str(tmp_path))]
    assert running == []                       # redis-server and the local node stopped
    url = "127.0.0.1:%s/0" % re.search(r"redis-server pid \d+ port (\d+)", proc.stderr).group(1)
    running = [pid for pid in Path("/proc").iterdir() if pid.name.isdigit() and _cmdline_has(pid, url)]
    assert running == []                       # every node and process on that Redis too
