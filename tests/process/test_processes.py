"""`qserve serve --processes N` as real processes on a real redis-server: N server processes share
one port (SO_REUSEPORT) and the kernel spreads the connections over them; the supervisor restarts a
process killed with SIGKILL, gives up (exit 1) when a process keeps dying before it listens, stops
them all on SIGTERM (exit 0) or at once on a second SIGINT (130); the local backend is refused in one
line (exit 2).

Which process holds a connection is read from /proc: the server side of each established TCP
connection on the port is a socket inode, and /proc/PID/fd says whose it is. The supervisor's
processes are /proc/PID/task/PID/children. Every process is stopped by its pid at the end.
"""

from __future__ import annotations

import http.client
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..helpers.process import ServerProcess

READY = r"listening on http://127\.0\.0\.1:(\d+) \(2 processes, queues at redis://"
CHILD_READY = r"listening on http://127\.0\.0\.1:(\d+) \(queues in redis at \S+, node [^:\s]+:(\d+):"


def children(pid: int) -> set[int]:
    """The live child processes of ``pid``."""
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def established(port: int) -> set[int]:
    """The socket inodes of the established TCP connections whose local port is ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":   # 01: ESTABLISHED
                inodes.add(int(fields[9]))
    return inodes


def holders(pids: set[int], port: int) -> set[int]:
    """Which of ``pids`` hold at least one established connection on ``port``."""
    wanted = {f"socket:[{inode}]" for inode in established(port)}
    found = set()
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in os.listdir(fds):
            try:
                if os.readlink(fds / fd) in wanted:
                    found.add(pid)
                    break
            except FileNotFoundError:   # closed meanwhile
                continue
    return found


def wait_gone(pids: set[int], timeout: float = 20.0) -> set[int]:
    """Wait (on pidfds, bounded) until the processes ``pids`` have exited; those still running."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:   # exited and reaped already
            continue
    try:
        deadline = time.monotonic() + timeout
        left = dict(fds)
        while left:
            ready, _, _ = select.select(list(left), [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for fd in ready:
                del left[fd]
        return set(left.values())
    finally:
        for fd in fds:
            os.close(fd)


def stop_all(srv: ServerProcess, pids: set[int]) -> None:
    """Kill the supervisor and then what is left of its processes, by pid."""
    srv.kill()
    for pid in wait_gone(pids, timeout=0.1):
        os.kill(pid, signal.SIGKILL)
    wait_gone(pids)


class Box:
    """One supervisor with 2 processes on the test's Redis."""

    def __init__(self, tmp_path: Path, redis_url: str, *extra: str) -> None:
        self.srv = ServerProcess(tmp_path / "unused", "--backend", redis_url, "--processes", "2",
                                 "--shutdown-timeout", "3", *extra)
        self.seen: set[int] = set()   # every process pid seen, for the clean-up

    def start(self) -> "Box":
        self.srv.start()
        self.srv.wait_line(READY)
        self.seen |= self.pids()
        return self

    def pids(self) -> set[int]:
        pids = children(self.srv.proc.pid)
        self.seen |= pids
        return pids

    def request(self, method: str, path: str, body: bytes | None = None, conn=None) -> tuple[int, bytes]:
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=10)
        conn.request(method, path, body=body, headers={"Authorization": self.srv.token})
        resp = conn.getresponse()
        return resp.status, resp.read()


@pytest.fixture
def box(tmp_path, redis_url):
    box = Box(tmp_path, redis_url)
    yield box
    stop_all(box.srv, box.seen)


def test_two_processes_share_the_port_and_both_serve(box, service):
    box.start()
    pids = box.pids()
    assert len(pids) == 2 and box.srv.proc.pid not in pids
    ports = {int(m.group(1)) for m in box.srv.wait_line(CHILD_READY, count=2)}
    assert ports == {box.srv.port}, "the supervisor's port, picked once, is every process's"
    assert {int(m.group(2)) for m in box.srv.wait_line(CHILD_READY, count=2)} == pids

    status, body = box.request("POST", f"/api/predict/{service}", b"through one port")
    assert (status, body) == (200, b"1")
    conns = []
    try:   # new connections until both processes hold one (the kernel hashes each connection)
        while holders(pids, box.srv.port) != pids:
            assert len(conns) < 64, "64 connections all went to one process"
            conn = http.client.HTTPConnection("127.0.0.1", box.srv.port, timeout=10)
            conns.append(conn)
            status, body = box.request("GET", f"/api/predict/{service}?_index_=1&_auto_delete_=false", conn=conn)
            assert (status, body) == (200, b"through one port")
    finally:
        for conn in conns:
            conn.close()


def test_a_killed_process_is_restarted_and_service_goes_on(box, service):
    box.start()
    victim, survivor = sorted(box.pids())
    os.kill(victim, signal.SIGKILL)
    box.srv.wait_line(rf"process [12] \(pid {victim}\) was killed by SIGKILL; restarting it")
    third = box.srv.wait_line(CHILD_READY, count=3)[2]   # the new process listens
    new = int(third.group(2))
    assert new not in (victim, survivor) and int(third.group(1)) == box.srv.port
    assert box.pids() == {survivor, new}

    for i in range(1, 11):   # each on a new connection: the kernel spreads them over both
        assert box.request("POST", f"/api/predict/{service}", b"after %d" % i) == (200, str(i).encode())
    for i in range(1, 11):
        assert box.request("GET", f"/api/predict/{service}?_index_={i}") == (200, b"after %d" % i)
    assert box.srv.proc.poll() is None


def test_sigterm_stops_every_process_cleanly_with_status_zero(box, service):
    box.start()
    pids = box.pids()
    assert box.request("POST", f"/api/predict/{service}", b"x") == (200, b"1")
    assert box.srv.stop() == 0
    assert wait_gone(pids, timeout=0) == set(), "the supervisor exits after its processes"
    box.srv.wait_line(r"stopped; all queues synced and closed", count=2)
    box.srv.wait_line(r"stopped: every process exited")
    assert "Traceback" not in "\n".join(box.srv.lines)


def supervised(pid: int) -> set[int]:
    """The children of ``pid`` that are its server processes (``--processes 1`` on their command line;
    not, say, the short-lived fork of an ``ldconfig`` during the supervisor's imports)."""
    found = set()
    for child in children(pid):
        try:
            if b"\0--processes\x001\0" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
        except OSError:   # exited meanwhile
            continue
    return found


@pytest.mark.parametrize("starting", [1, 2])
def test_sigterm_while_processes_start_stops_them_cleanly(tmp_path, redis_url, starting):
    """SIGTERM as soon as process ``starting`` exists, long before it listens (it is still importing
    Python: ~0.5 s): the supervisor stops what runs and exits 0 (it exited 1: a process killed by that
    SIGTERM before it had a handler for it counted as a failed stop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")}
    proc = subprocess.Popen([sys.executable, "-m", "qserve", "serve", "--host", "127.0.0.1", "--port", "0",
                             "--backend", redis_url, "--processes", "2", "--shutdown-timeout", "3",
                             "--token", "test-token"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while len(seen) < starting:   # a condition on /proc, bounded; no sleep
            assert proc.poll() is None and time.monotonic() < deadline, "the processes did not start"
            seen |= supervised(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert wait_gone(seen, timeout=0) == set(), "the supervisor exits after its processes"
        assert "while stopping" not in err and "Traceback" not in err, err
        assert "stopped: every process exited" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in wait_gone(seen, timeout=0.1):
            os.kill(pid, signal.SIGKILL)
        wait_gone(seen)


def test_a_second_sigint_stops_at_once(box):
    box.start()
    pids = box.pids()
    box.srv.proc.send_signal(signal.SIGINT)
    box.srv.wait_line(r"received SIGINT: stopping 2 processes")
    box.srv.proc.send_signal(signal.SIGINT)
    assert box.srv.proc.wait(20) == 130
    assert wait_gone(pids, timeout=0) == set()
    assert "Traceback" not in "\n".join(box.srv.lines)


@pytest.mark.slow   # five failed starts against an unreachable Redis with the backoff between them: about 17 s
def test_a_process_that_keeps_dying_before_listening_makes_it_give_up(tmp_path, fresh_redis_server):
    fresh_redis_server.start()
    box = Box(tmp_path, fresh_redis_server.url)
    try:
        box.start()
        victim, survivor = sorted(box.pids())
        fresh_redis_server.stop()       # a new process cannot start now: Redis is unreachable
        os.kill(victim, signal.SIGKILL)
        assert box.srv.proc.wait(60) == 1
        box.srv.wait_line(r"process [12] failed to start 5 times in a row \(the last one exited with status 1\); "
                          r"giving up: stopping all processes")
        assert wait_gone({survivor}, timeout=0) == set()
        assert len([line for line in box.srv.lines if "restarting it" in line]) == 5   # 1 + 4 before listening
        assert "Traceback" not in "\n".join(box.srv.lines)
    finally:
        stop_all(box.srv, box.seen)


def test_a_supervisor_killed_with_sigkill_leaves_no_process_behind(box):
    box.start()
    pids = box.pids()
    box.srv.kill()   # the kernel sends each process SIGTERM (PR_SET_PDEATHSIG): they drain and exit
    assert wait_gone(pids) == set()


def _serve(tmp_path: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")} | env_vars
    return subprocess.run([sys.executable, "-m", "qserve", "serve", "--port", "0", "--data-dir",
                           str(tmp_path / "data"), *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("args, message", [
    ((), "qserve: processes: 2 server processes need --backend redis://...: a segment log has one owner "
         "(the local backend runs in one process)"),
    (("--backend", "redis://127.0.0.1:1", "--worker", "demo"), "qserve: processes: --worker runs inside one "
     "server process; with --processes run `qserve worker` beside the servers"),
])
def test_refused_in_one_line_with_status_two(tmp_path, args, message):
    done = _serve(tmp_path, "--processes", "2", *args)
    assert (done.returncode, done.stderr) == (2, message + "\n")
    assert not (tmp_path / "data").exists()


def test_processes_zero_is_refused(tmp_path):
    done = _serve(tmp_path, "--processes", "0")
    assert (done.returncode, done.stderr) == (2, "qserve: processes: must be >= 1\n")


def test_the_environment_sets_it_too(tmp_path):
    done = _serve(tmp_path, QSERVE_PROCESSES="3")
    assert (done.returncode, done.stderr.split(": a segment")[0]) == (
        2, "qserve: processes: 3 server processes need --backend redis://...")


def test_an_unreachable_redis_is_the_first_process_s_one_line(tmp_path):
    done = _serve(tmp_path, "--processes", "3", "--backend", "redis://127.0.0.1:1/0")
    assert done.returncode == 1
    [line] = done.stderr.splitlines()   # process 1's own line, as without --processes
    assert line.startswith("qserve: cannot use redis at 127.0.0.1:1/0: unreachable")


def test_one_process_is_a_plain_server(tmp_path, service):
    srv = ServerProcess(tmp_path / "data", "--processes", "1").start()
    try:
        assert children(srv.proc.pid) == set()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("POST", f"/api/predict/{service}", body=b"x", headers={"Authorization": srv.token})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        assert srv.stop() == 0
