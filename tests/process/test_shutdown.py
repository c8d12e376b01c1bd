"""Shutdown of real `qserve serve` processes: one SIGTERM drains and exits 0 with one "draining" line;
two SIGINTs exit at once with 130; neither prints a traceback; a named queue that cannot open stops
the start in one line with exit 1. (The drain behaviours, in-process: tests/server/test_shutdown.py.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import trio
import trio_websocket

from ..helpers.peers import Client, read_to_eof
from ..helpers.process import ServerProcess
from ..helpers.queue_files import damaged_queue

REAL = 20    # seconds (real time) for a test that holds an fsync or runs a process


# -- the process and its signals ----------------------------------------------------------------------


async def wait_line(srv: ServerProcess, pattern: str, timeout: float = 10.0) -> str:
    """The first stderr line matching ``pattern`` (polls the collected lines; bounded)."""
    with trio.fail_after(timeout):
        while True:
            for line in list(srv.lines):
                if re.search(pattern, line):
                    return line
            assert srv.proc.poll() is None, "server exited:\n" + "\n".join(srv.lines)
            await trio.sleep(0.02)


def no_traceback(srv: ServerProcess) -> bool:
    text = "\n".join(srv.lines)
    return "Traceback" not in text and "KeyboardInterrupt" not in text


async def test_sigterm_answers_long_polls_closes_watchers_and_exits_zero(tmp_path, service):
    srv = ServerProcess(tmp_path / "data", "--log-level", "DEBUG")
    await trio.to_thread.run_sync(srv.start)
    try:
        with trio.fail_after(REAL):
            result = {}
            base = f"/api/predict/{service}"
            async with trio.open_nursery() as nursery:
                ws = await trio_websocket.connect_websocket_url(
                    nursery, f"ws://127.0.0.1:{srv.port}{base}?_watch_=true",
                    extra_headers=[(b"Authorization", srv.token.encode())])
                poller = Client(await trio.open_tcp_stream("127.0.0.1", srv.port))

                async def long_poll():
                    head, _ = await poller.request("GET", f"{base}?_timeout_=60s", headers=[
                        ("Authorization", srv.token)])
                    result["status"] = head.status_code

                nursery.start_soon(long_poll)
                await wait_line(srv, rf"GET {base}\?_timeout_=60s")   # the server read it
                srv.proc.send_signal(signal.SIGTERM)
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
            status = await trio.to_thread.run_sync(srv.proc.wait, 15)
        assert result == {"status": 204}
        assert closed.value.reason.code == 1001
        assert status == 0
        assert [line for line in srv.lines if "draining" in line][0].endswith("draining 2 connections (up to 10 s)")
        assert len([line for line in srv.lines if "draining" in line]) == 1
        assert any(line.endswith("stopped; all queues synced and closed") for line in srv.lines)
        assert no_traceback(srv), "\n".join(srv.lines)
    finally:
        srv.kill()


async def test_second_sigint_stops_at_once_with_130(tmp_path, service):
    srv = ServerProcess(tmp_path / "data", "--shutdown-timeout", "60", "--request-timeout", "120")
    await trio.to_thread.run_sync(srv.start)
    try:
        with trio.fail_after(REAL):
            slow = await trio.open_tcp_stream("127.0.0.1", srv.port)   # a put whose body never ends
            await slow.send_all(f"POST /api/predict/{service} HTTP/1.1\r\nHost: t\r\nAuthorization: "
                                f"{srv.token}\r\nContent-Length: 100\r\n\r\nxx".encode())
            srv.proc.send_signal(signal.SIGINT)
            await wait_line(srv, r"draining 1 connection \(up to 60 s\)")
            srv.proc.send_signal(signal.SIGINT)
            status = await trio.to_thread.run_sync(srv.proc.wait, 15)   # not the 60 s drain
            assert await read_to_eof(slow) == b""
        assert status == 130
        srv.drained()
        assert any("received SIGINT again: stopping at once" in line for line in srv.lines)
        assert any(line.endswith("stopped; all queues synced and closed") for line in srv.lines)
        assert no_traceback(srv), "\n".join(srv.lines)
    finally:
        srv.kill()


def test_a_named_queue_that_cannot_open_is_one_line_and_exit_1(tmp_path):
    damaged_queue(tmp_path / "data", "bad")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")}
    proc = subprocess.run([sys.executable, "-m", "qserve", "serve", "--host", "127.0.0.1", "--port", "0",
                           "--data-dir", str(tmp_path / "data"), "--token", "t", "--queues", "bad"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.splitlines()   # one line: the refusal, nothing logged before it
    assert line.startswith("qserve: queue bad cannot be opened: damage in ")
    assert "Traceback" not in proc.stderr and "listening" not in proc.stderr and "stopped" not in proc.stderr
