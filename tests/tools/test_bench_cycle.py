"""tools/bench/cycle.py and the readers it shares with the other tools (`lib.process_cpu_seconds`,
`lib.system_busy_seconds`, `redis.command_calls`): the CPU readings behind `tools.bench.ratios`'
per-cycle rows, on real processes, sockets and a real redis-server. Nothing here sleeps: each
child runs until a condition (a file, its stdin closing), and the meter's window is its own."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time

import pytest

from qserve.tools.bench import lib as bl
from qserve.tools.bench.cycle import (CpuWindow, bucket_sums, established, idle_poll_seconds, metric_sums,
                                     metrics_text, per_cycle, run_measured, slow_rounds)
from qserve.tools.bench.redis import command_calls

from ..helpers.process import ServerProcess

# a load generator: says its phase began (a file), spins until told to stop (another file; 30 s at most)
SPIN = ("import os, sys, time\nopen(sys.argv[1], 'w').close()\nend = time.monotonic() + 30\n"
        "while not os.path.exists(sys.argv[2]) and time.monotonic() < end:\n    pass\nprint('{\"done\": 1}')\n")


@pytest.fixture
def idle_server():
    """A process standing in for the server: blocked reading its stdin, so its CPU over any window
    is ~0; it ends when the test closes that."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def test_per_cycle_divides_each_reading_by_the_cycles_in_the_window():
    result = {"server_s": 0.5, "client_s": 0.4, "servers_cpu_busy_s": 0.6, "wall_s": 1.0}
    c = per_cycle(result, 8000.0)   # 800 cycles of 10 in the window
    assert c == pytest.approx({"server_us": 625.0, "servers_cpu_us": 750.0, "client_us": 500.0, "wall_us": 1250.0})
    assert per_cycle(None, 8000.0) is None
    assert per_cycle(result, 0.0) is None
    polled = per_cycle({**result, "polled_s": 0.2}, 8000.0)   # a qserve that polled while idle
    assert polled == pytest.approx({**c, "polled_us": 250.0})


def test_idle_poll_seconds_reads_a_live_servers_metrics(server):
    """The per-cycle rows' polling figure, from a real server's /metrics (on by default), and
    None from a port where nothing listens."""
    polled = idle_poll_seconds(server.port, server.token)
    assert polled is not None and polled >= 0.0
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert idle_poll_seconds(port) is None


def test_metric_sums_adds_each_name_over_its_labels(tmp_path):
    """What the ratios tool reads around its wrk run: a fresh server's group-commit counters,
    summed over its queues (each sequential durable put is one write its round made durable). A
    server of its own: its first scrape is rendered then (a rendering answers for 0.25 s)."""
    srv = ServerProcess(tmp_path / "data").start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        for i in range(3):
            for service in ("a", "b"):
                conn.request("POST", f"/api/predict/{service}", body=b"x", headers={"Authorization": srv.token})
                assert conn.getresponse().read().isdigit()
        conn.close()
        names = ("qserve_puts_total", "qserve_fsync_writes_total", "qserve_fsync_round_seconds_count",
                 "qserve_no_such_total")
        sums = metric_sums(srv.port, names, srv.token)
        text = metrics_text(srv.port, srv.token)
    finally:
        srv.stop()
    assert "qserve_no_such_total" not in sums
    assert sums["qserve_puts_total"] == 6 and sums["qserve_fsync_writes_total"] == 6
    assert 2 <= sums["qserve_fsync_round_seconds_count"] <= 6   # two queues, a round each at least
    buckets = bucket_sums(text, "qserve_fsync_round_seconds")   # both queues' rounds under each bound
    assert buckets[float("inf")] == sums["qserve_fsync_round_seconds_count"]
    assert list(buckets.values()) == sorted(buckets.values())   # cumulative
    rounds = slow_rounds("", text)   # every round since the start
    assert rounds["rounds"] == sums["qserve_fsync_round_seconds_count"]
    assert rounds["slow"] == rounds["rounds"] - buckets[0.005]
    assert buckets[rounds["longest_ms"] / 1e3] == rounds["rounds"]
    assert all(n < rounds["rounds"] for bound, n in buckets.items() if bound < rounds["longest_ms"] / 1e3)


def _rounds_text(**queues: dict[str, int]) -> str:
    """/metrics lines of qserve_fsync_round_seconds for some queues: {queue: {le: cumulative count}}."""
    return "".join(f'qserve_fsync_round_seconds_bucket{{le="{le}",queue="input",service="{name}"}} {n}.0\n'
                   for name, buckets in queues.items() for le, n in buckets.items())


def test_slow_rounds_between_two_readings_sums_the_queues():
    before = _rounds_text(a={"0.002": 5, "0.005": 5, "0.01": 5, "+Inf": 5}, b={"0.002": 1, "0.005": 1, "0.01": 1,
                                                                              "+Inf": 1})
    after = _rounds_text(a={"0.002": 8, "0.005": 9, "0.01": 10, "+Inf": 10}, b={"0.002": 3, "0.005": 3, "0.01": 3,
                                                                               "+Inf": 3})
    assert slow_rounds(before, after) == {"rounds": 7.0, "slow": 1.0, "longest_ms": 10.0}
    beyond = _rounds_text(a={"0.002": 5, "0.005": 5, "0.01": 5, "+Inf": 6}, b={"0.002": 1, "0.005": 1, "0.01": 1,
                                                                             "+Inf": 1})
    assert slow_rounds(before, beyond) == {"rounds": 1.0, "slow": 1.0}   # past the last bound: no longest
    assert slow_rounds(before, before) is None and slow_rounds(None, after) is None


def test_the_window_reads_a_busy_client_and_an_idle_server(tmp_path, idle_server):
    """The client spins once its steady phase begins (the first file): it is charged about the
    window's length, the blocked server about nothing."""
    started, stop = tmp_path / "started", tmp_path / "stop"
    client = subprocess.Popen([sys.executable, "-c", SPIN, str(started), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        meter = CpuWindow(idle_server.pid, None, started.exists, delay=0.05, window=0.4)
        meter.run(client.pid, time.monotonic() + 30)   # returns after its window
    finally:
        stop.touch()
        out, _ = client.communicate(timeout=30)
    assert out.strip() == '{"done": 1}'
    r = meter.result
    assert r is not None
    assert r["wall_s"] == pytest.approx(0.4, abs=0.1)
    assert 0.15 <= r["client_s"] <= r["wall_s"] + 0.05   # one spinning thread: at most the window
    assert r["server_s"] <= 0.03
    assert r["servers_cpu_busy_s"] >= r["client_s"] - 0.05   # the machine was at least that busy


def test_a_phase_shorter_than_the_window_gives_no_figures(tmp_path, idle_server):
    """The client says its phase began and ends at once: the meter stops when it does (long before
    its window would have ended) and reports nothing."""
    started = tmp_path / "started"
    meter = CpuWindow(idle_server.pid, None, started.exists, delay=0.0, window=60.0)
    t0 = time.monotonic()
    out = run_measured([sys.executable, "-c", f"open({str(started)!r}, 'w').close(); print(1)"], meter, cpu=None,
                       timeout=30)
    assert out.strip() == "1"
    assert meter.result is None
    assert time.monotonic() - t0 < 30


def test_a_phase_that_never_begins_gives_no_figures(tmp_path, idle_server):
    meter = CpuWindow(idle_server.pid, None, (tmp_path / "never").exists, delay=0.0, window=0.1)
    run_measured([sys.executable, "-c", "print(1)"], meter, cpu=None, timeout=30)
    assert meter.result is None


def test_a_failing_load_generator_is_one_error(idle_server, tmp_path):
    meter = CpuWindow(idle_server.pid, None, (tmp_path / "never").exists)
    with pytest.raises(RuntimeError, match="exited 3: boom"):
        run_measured([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], meter,
                     cpu=None, timeout=30)


def test_process_cpu_seconds_is_none_once_a_process_has_ended(idle_server):
    assert bl.process_cpu_seconds(idle_server.pid) is not None
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait(timeout=30)
    assert bl.process_cpu_seconds(ended.pid) is None
    assert bl.system_busy_seconds(0) <= bl.system_busy_seconds()   # one CPU's share of the machine's


def test_established_counts_the_server_side_of_each_connection():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        assert established(port) == 0
        with socket.create_connection(("127.0.0.1", port)) as a:
            assert established(port) == 1     # queued for accept(): established all the same
            with socket.create_connection(("127.0.0.1", port)) as b:
                assert established(port) == 2
                assert established(a.getsockname()[1]) == 1 and established(b.getsockname()[1]) == 1


def test_command_calls_counts_one_command(redis_server):
    before = command_calls(redis_server.port, "xadd")
    assert before is not None
    redis_server.call("XADD", "cycle-test", "*", "d", "x")
    redis_server.call("XADD", "cycle-test", "*", "d", "y")
    assert command_calls(redis_server.port, "xadd") == before + 2
    assert command_calls(redis_server.port, "xclaimnever") == 0
    redis_server.call("DEL", "cycle-test")


def test_command_calls_without_a_server_is_none():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]     # bound, not listening: the connection is refused
        assert command_calls(port, "xadd") is None
