"""Ctrl-C during `qserve stream put -f`: the summary is printed, the counts are exact, exit status 130.

Real subprocesses and real SIGINTs: one against a real server mid-file (the first Ctrl-C stops
after the entry in flight, so "put" is exactly what the queue holds), one against a listening
socket that never answers (a second Ctrl-C gives up on the entry in flight, reported as unknown).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess

from qserve.client import BlockingQueueClient

from ..helpers.stream_cli import TIMEOUT, LinePump, make_cli

LINES = 200_000     # far more than a put -f sends in the test's lifetime: the SIGINT lands mid-file


def _summary(stdout: list[str]) -> dict[str, int]:
    m = re.fullmatch(r"Total: (\d+), success: (\d+), failed: (\d+), not sent: (\d+)"
                     r"(?:, unknown \(sent, no answer\): (\d+))?", stdout[-1])
    assert m, stdout[-4:]
    total, success, failed, not_sent, unknown = (int(g or 0) for g in m.groups())
    return {"total": total, "success": success, "failed": failed, "not_sent": not_sent, "unknown": unknown}


def test_interrupted_put_file_prints_exact_summary(tmp_path, server, service):
    url = f"{server.url}/api/predict/{service}"
    cli = make_cli(tmp_path, url, server.token)
    data = tmp_path / "big.data"
    data.write_text("".join(f"line-{i}\n" for i in range(LINES)))
    proc = cli.popen("put", "-f", str(data))
    try:
        out, err = LinePump(proc.stdout), LinePump(proc.stderr)
        out.wait_for(r"^\[OK\] 3 requestId=")           # mid-file: a few entries are in
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 130
        stdout, stderr = out.rest(), err.rest()
    finally:
        proc.kill()
    counts = _summary(stdout)
    assert stdout[-4] == "[INFO] Put data interrupted."
    assert counts["failed"] == counts["unknown"] == 0 and counts["total"] == counts["success"]
    assert counts["success"] + counts["not_sent"] == LINES and 3 <= counts["success"] < LINES
    assert sum(line.startswith("[OK] ") for line in stdout) == counts["success"]
    assert [line for line in stderr if not line.startswith("[INFO] ")] == [   # progress lines aside
        f"[WARN] interrupted: {counts['success']} put, 0 failed, {counts['not_sent']} not sent"]
    with BlockingQueueClient(url, token=server.token) as q:
        assert q.attributes()["stream.length"] == str(counts["success"])   # nothing put but not reported


def test_second_ctrl_c_gives_up_on_an_unanswered_put(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent:           # accepts, reads, never answers
        port = silent.getsockname()[1]
        cli = make_cli(tmp_path, f"http://127.0.0.1:{port}/api/predict/x", None)
        data = tmp_path / "three.data"
        data.write_text("a\nb\nc\n")
        proc = cli.popen("put", "-f", str(data), "--request-timeout", "60")
        try:
            silent.settimeout(TIMEOUT)
            conn, _ = silent.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                assert conn.recv(65536).startswith(b"POST /api/predict/x")   # the first put is in flight
                status = None
                while status is None:         # the first SIGINT asks to stop, a later one gives up
                    proc.send_signal(signal.SIGINT)
                    try:
                        status = proc.wait(0.2)
                    except subprocess.TimeoutExpired:
                        pass
                stdout, stderr = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
    assert status == 130 and "Traceback" not in stderr
    lines = stdout.splitlines()
    assert lines[1] == "[INFO] Put data interrupted."
    assert _summary(lines) == {"total": 1, "success": 0, "failed": 0, "not_sent": 2, "unknown": 1}
    assert stderr == "[WARN] interrupted: 0 put, 0 failed, 2 not sent, 1 sent with no answer (it may be stored)\n"
