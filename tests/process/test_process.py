"""The server as a process: kill -9 after an acknowledged put, graceful SIGTERM, start-up refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qserve.server.aio import AioSync

from ..helpers.process import ServerProcess
from ..helpers.sdk import client


def test_acknowledged_put_survives_sigkill(fresh_server, service):
    fresh_server.start()
    q = client(fresh_server, service)
    acked = [q.put(f"entry-{i}".encode(), tags={"n": str(i)}) for i in range(50)]
    q.delete(int(acked[0][0]))
    fresh_server.kill()
    fresh_server.start()
    q = client(fresh_server, service)
    assert q.attributes()["stream.length"] == "49"
    for i, (index, rid) in enumerate(acked[1:], start=1):
        [df] = q.get(request_id=rid, auto_delete=False, timeout="0s")
        assert (str(df.index), df.data, df.tags["n"]) == (index, f"entry-{i}".encode(), str(i))
    # the deleted entry stays deleted and no index is reused
    assert q.get(index=1, auto_delete=False, timeout="0s")[0].index == 2
    assert q.put(b"next")[0] == "51"


def test_sigterm_drains_and_exits_zero(fresh_server, service):
    fresh_server.start()
    q = client(fresh_server, service)
    q.put(b"x")
    assert fresh_server.stop() == 0
    aio = AioSync.open()
    mechanism = "threads" if aio is None else "kernel AIO"
    if aio is not None:
        aio.close()
    assert any(f"fsync=always via {mechanism})" in line for line in fresh_server.lines)
    assert any("shutting down" in line for line in fresh_server.lines)
    assert any("stopped; all queues synced and closed" in line for line in fresh_server.lines)
    fresh_server.start()
    assert client(fresh_server, service).attributes()["stream.length"] == "1"
    fresh_server.wait_line("opened: 1 entries")   # the log line may reach our reader after the answer


def test_refuses_non_loopback_without_token(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qserve", "serve", "--host", "0.0.0.0", "--port", "0",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "non-loopback" in proc.stderr and proc.stderr.count("\n") == 1


def test_bad_flag_value_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qserve", "serve", "--max-length", "0",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "max_length" in proc.stderr


def test_restart_redelivers_uncommitted_and_never_committed(fresh_server, service):
    from ..helpers.sdk import collect

    fresh_server.start()
    q = client(fresh_server, service)
    for i in range(6):
        q.put(f"e{i}".encode())
    watcher = q.watch(0, 4, auto_commit=False)
    got = collect(watcher, 4)
    q.commit([got[0].index, got[1].index])             # two committed, two pending at the crash
    watcher.close()
    auto = client(fresh_server, service + "/sink")
    auto.put(b"r0")
    auto.put(b"r1")
    w2 = auto.watch(0, 5, auto_commit=True)
    collect(w2, 2)
    w2.close()
    fresh_server.kill()
    fresh_server.start()
    q = client(fresh_server, service)
    watcher = q.watch(0, 10, auto_commit=False)
    again = collect(watcher, 4)
    watcher.close()
    assert sorted(df.index for df in again) == [3, 4, 5, 6]
    assert client(fresh_server, service + "/sink").attributes()["stream.length"] == "0"



@pytest.mark.parametrize("policy", ["interval", "never"])
def test_other_fsync_policies_lose_nothing_on_a_process_crash(tmp_path, service, policy):
    srv = ServerProcess(tmp_path / "data", "--fsync", policy, "--fsync-interval", "60").start()
    try:
        q = client(srv, service)
        acked = [q.put(f"p{i}".encode())[0] for i in range(20)]
        srv.kill()            # SIGKILL: the page cache survives, only fsync was skipped
        srv.start()
        q = client(srv, service)
        got = q.get(length=100, auto_delete=False, timeout="0s")
        assert [str(df.index) for df in got] == acked
        assert any(f"fsync={policy}" in line for line in srv.lines)
    finally:
        srv.kill()


def test_standalone_server_freezes_its_startup_heap():
    """`qserve serve` moves its start-up objects out of the cyclic collector's reach (run in a child:
    frozen objects stay frozen for the life of the process)."""
    code = ("import gc, qserve.server.server as s; before = gc.get_freeze_count(); n = s.freeze_startup_heap(); "
            "print(before, n)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, frozen = map(int, out.stdout.split())
    assert before == 0 and frozen > 10_000
