"""tools/bench/cycle.py: the CPU readings behind `tools.bench.ratios`' per-cycle rows, on real
processes, sockets and a real redis-server."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from qserve.tools.bench.cycle import CpuWindow, established, per_cycle, redis_calls, run_measured

SPIN = "import pathlib, sys, time\npathlib.Path(sys.argv[1]).touch()\nend = time.monotonic() + float(sys.argv[2])\n" \
       "while time.monotonic() < end:\n    pass\nprint('{\"done\": 1}')\n"


@pytest.fixture
def idle_server():
    """A process standing in for the server: asleep, so its CPU over any window is ~0."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_per_cycle_divides_each_reading_by_the_cycles_in_the_window():
    result = {"server_s": 0.5, "client_s": 0.4, "servers_cpu_busy_s": 0.6, "wall_s": 1.0}
    c = per_cycle(result, 8000.0)   # 800 cycles of 10 in the window
    assert c == pytest.approx({"server_us": 625.0, "servers_cpu_us": 750.0, "client_us": 500.0, "wall_us": 1250.0})
    assert per_cycle(None, 8000.0) is None
    assert per_cycle(result, 0.0) is None


def test_the_window_reads_a_busy_client_and_an_idle_server(tmp_path, idle_server):
    """The client spins after its steady phase begins (the marker file): it is charged about the
    window's length, the sleeping server about nothing."""
    marker = tmp_path / "started"
    meter = CpuWindow(idle_server.pid, None, marker.exists, delay=0.05, window=0.4)
    out = run_measured([sys.executable, "-c", SPIN, str(marker), "1.5"], meter, cpu=None, timeout=30)
    assert out.strip() == '{"done": 1}'
    r = meter.result
    assert r is not None
    assert r["wall_s"] == pytest.approx(0.4, abs=0.1)
    assert 0.15 <= r["client_s"] <= r["wall_s"] + 0.05   # one spinning thread: at most the window
    assert r["server_s"] <= 0.03
    assert r["servers_cpu_busy_s"] >= r["client_s"] - 0.05   # the machine was at least that busy


def test_a_phase_shorter_than_the_window_gives_no_figures(tmp_path, idle_server):
    marker = tmp_path / "started"
    meter = CpuWindow(idle_server.pid, None, marker.exists, delay=0.0, window=2.0)
    run_measured([sys.executable, "-c", SPIN, str(marker), "0.2"], meter, cpu=None, timeout=30)
    assert meter.result is None


def test_a_phase_that_never_begins_gives_no_figures(tmp_path, idle_server):
    meter = CpuWindow(idle_server.pid, None, (tmp_path / "never").exists, delay=0.0, window=0.1)
    run_measured([sys.executable, "-c", "print(1)"], meter, cpu=None, timeout=30)
    assert meter.result is None


def test_a_failing_load_generator_is_one_error(idle_server, tmp_path):
    meter = CpuWindow(idle_server.pid, None, (tmp_path / "never").exists)
    with pytest.raises(RuntimeError, match="exited 3: boom"):
        run_measured([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], meter,
                     cpu=None, timeout=30)


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


def test_redis_calls_counts_one_command(redis_server):
    before = redis_calls(redis_server.port, "xadd")
    assert before is not None
    redis_server.call("XADD", "cycle-test", "*", "d", "x")
    redis_server.call("XADD", "cycle-test", "*", "d", "y")
    assert redis_calls(redis_server.port, "xadd") == before + 2
    assert redis_calls(redis_server.port, "xclaimnever") == 0
    redis_server.call("DEL", "cycle-test")


def test_redis_calls_without_a_server_is_none():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]     # bound, not listening: the connection is refused
        assert redis_calls(port, "xadd") is None
