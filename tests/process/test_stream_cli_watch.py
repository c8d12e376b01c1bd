"""`qserve stream watch` against real server processes: new-entries-only (--index -1), and telling
the user when the server goes away and comes back (stopped and restarted on the same port and data)."""

from __future__ import annotations

import re
import signal

from qserve.client import BlockingQueueClient

from ..helpers.process import ServerProcess
from ..helpers.stream_cli import TIMEOUT, LinePump, make_cli, wait_until


def _consumers(q: BlockingQueueClient) -> int:
    return int(q.attributes()["consumers.stats.total"])


def test_watch_index_minus_one_skips_what_is_stored(tmp_path, server, service):
    url = f"{server.url}/api/predict/{service}"
    cli = make_cli(tmp_path, url, server.token)
    with BlockingQueueClient(url, token=server.token) as q:
        q.put(b"old")
        for argv in (("--index", "-1"), ("--index=-1",)):
            proc = cli.popen("watch", *argv, "--commit-all", "-n", "1")
            try:
                out = LinePump(proc.stdout)
                out.wait_for(r"^\[INFO\] Start to watch: index: -1, ")
                wait_until(lambda: _consumers(q) == 1, what="the watch's handshake")
                q.put(b"new")
                assert proc.wait(TIMEOUT) == 0, proc.stderr.read()
                lines = out.rest()
            finally:
                proc.kill()
            assert len(lines) == 2 and lines[1].endswith("] new"), lines
            wait_until(lambda: _consumers(q) == 0, what="the watch's close")
        assert [e.data for e in q.get(length=10, auto_delete=False)] == [b"old"]


def test_watch_reports_losing_and_regaining_the_server(fresh_server, tmp_path, service):
    fresh_server.start()
    port = fresh_server.port
    url = f"{fresh_server.url}/api/predict/{service}"
    cli = make_cli(tmp_path, url, fresh_server.token)
    restarted = None
    proc = cli.popen("watch", "--commit-all")
    try:
        out, err = LinePump(proc.stdout), LinePump(proc.stderr)
        with BlockingQueueClient(url, token=fresh_server.token) as q:
            q.put(b"before")
            out.wait_for(r"\] before$")
            wait_until(lambda: q.attributes()["stream.length"] == "0", what="the commit")
        assert fresh_server.stop() == 0
        m = err.wait_for(r"^\[")        # the server's close reason follows the code, in parentheses
        assert re.fullmatch(rf"\[WARN\] lost http://127\.0\.0\.1:{port}: connection closed: 1001 going away"
                            r"( \(.+\))?; reconnecting", m.string), m.string
        restarted = ServerProcess(fresh_server.data_dir, "--port", str(port), token=fresh_server.token).start()
        assert err.wait_for(r"^\[").string == "[INFO] reconnected"
        with BlockingQueueClient(url, token=fresh_server.token) as q:
            q.put(b"after")
            out.wait_for(r"\] after$")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
        assert [line for line in err.rest() if line] == [m.string, "[INFO] reconnected"]   # once each
    finally:
        proc.kill()
        if restarted is not None:
            restarted.kill()


def test_a_commit_lost_to_an_outage_is_asked_again_after_the_reconnect(fresh_server, tmp_path, service):
    fresh_server.start()
    port = fresh_server.port
    url = f"{fresh_server.url}/api/predict/{service}"
    cli = make_cli(tmp_path, url, fresh_server.token)
    restarted = None
    with BlockingQueueClient(url, token=fresh_server.token) as q:
        q.put(b"a")
    proc = cli.popen("watch")
    try:
        out, err = LinePump(proc.stdout), LinePump(proc.stderr)
        out.wait_for(r"^\[OK\] \[0 - 1\] tags\[.*\] a$")       # now it asks "commit: 1 ? [Y/n]"
        assert fresh_server.stop() == 0
        assert err.wait_for(r"^\[").string.startswith(f"[WARN] lost http://127.0.0.1:{port}: ")
        proc.stdin.write("\n")                                  # yes, while the server is away
        proc.stdin.flush()
        m = err.wait_for(r"^\[")
        assert re.fullmatch(r"\[WARN\] answer to 1 not delivered \(cannot reach http://127\.0\.0\.1:\d+: "
                            r"connection refused\); it comes again after the reconnect", m.string), m.string
        restarted = ServerProcess(fresh_server.data_dir, "--port", str(port), token=fresh_server.token).start()
        assert err.wait_for(r"^\[").string == "[INFO] reconnected"
        out.wait_for(r"^commit: 1 \? \[Y/n\]\[OK\] \[1 - 1\] tags\[.*\] a$")   # delivered and asked again
        proc.stdin.write("\n")
        proc.stdin.flush()
        with BlockingQueueClient(url, token=fresh_server.token) as q:
            wait_until(lambda: q.attributes()["stream.length"] == "0", what="the second commit")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
        assert "Traceback" not in "\n".join(err.rest())
    finally:
        proc.kill()
        if restarted is not None:
            restarted.kill()
