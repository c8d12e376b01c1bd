"""tools/bench/load.py end to end: a real server under many keep-alive connections, watchers and slow-loris.

The default suite runs a scaled-down load (200 connections, 20 watchers, 10 slow-loris connections
against a 2 s request timeout, about 4 s of load) and checks the issue's properties with generous
bounds, since the CI machine is busy with other work: every fresh-client probe answered with p99 <
500 ms, every slow-loris connection cut at its timeout (+2 s), the watchers received every entry,
RSS growth < 200 MB. The full-size run (1000 connections, 100 watchers, 50 slow-loris, 20 s) is
`slow`; it checks the issue's own 100 ms target and needs a quiet machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_load(tmp_path: Path, *args: str, timeout: float) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "-m", "tools.bench.load", "--json", "--data-dir", str(tmp_path),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.stdout, f"no output (exit {proc.returncode})\nstderr:\n{proc.stderr[-3000:]}"
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def check(doc: dict, *, connections: int, watchers: int, loris: int, probe_p99_ms: float, stderr: str) -> None:
    context = f"\n{json.dumps({k: v for k, v in doc.items() if k != 'environment'}, indent=1)}\n{stderr[-2000:]}"
    probe = doc["probe"]
    assert probe["probes"] >= 3 and probe["failed"] == 0 and probe["answered"] == probe["probes"], context
    assert probe["p99_ms"] < probe_p99_ms, context
    ka = doc["keepalive"]
    assert ka["opened"] == connections and ka["errors"] == 0 and ka["requests"] >= connections, context
    watch = doc["watch"]
    assert watch["connected"] == watchers and watch["errors"] == 0, context
    assert doc["producer"]["puts"] > 0 and doc["producer"]["errors"] == 0, context
    assert watch["received"] >= doc["producer"]["puts"] and watch["undelivered"] == 0, context
    assert watch["duplicates"] == 0 and watch["committed"] == watch["received"], context
    lo = doc["slow_loris"]
    assert lo["count"] == loris and lo["cut"] == loris and lo["in_time"] == loris, context
    answers = {k["kind"]: k["status"] for k in lo["kinds"]}
    assert answers == {"head": "408", "body": "408", "idle": "closed"}, context
    mem = doc["memory"]
    assert 0 < mem["start_mb"] and mem["growth_mb"] < 200, context
    assert doc["errors"] == 0 and "server_died" not in doc, context


@pytest.mark.slow   # the load tool against a server: about 6 s
def test_load_scaled_down(tmp_path):
    code, doc, stderr = run_load(
        tmp_path, "--connections", "200", "--interval", "1", "--watchers", "20", "--slow-loris", "10", "--rate", "30",
        "--request-timeout", "2", "--keepalive-timeout", "3", "--loris-interval", "0.5", "--loris-slack", "2",
        "--seconds", "4", "--drain", "5", "--settle", "0.5", timeout=120)
    check(doc, connections=200, watchers=20, loris=10, probe_p99_ms=500, stderr=stderr)
    assert code == 0
    assert list(tmp_path.iterdir()) == []      # the temporary data directory was removed


@pytest.mark.slow
def test_load_full_size(tmp_path):
    code, doc, stderr = run_load(tmp_path, timeout=300)
    check(doc, connections=1000, watchers=100, loris=50, probe_p99_ms=100, stderr=stderr)
    assert doc["probe"]["max_ms"] < 100
    assert code == 0
