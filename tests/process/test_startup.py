"""Start-up as a user meets it: one data directory per server (none with a Redis backend, which
nodes share), and every refusal one line.

Real `qserve serve` processes on 127.0.0.1; each refusal must be a single line on stderr (no
traceback, no "stopped; all queues synced" line) and a non-zero exit, before the server listens.
A Redis URL's password is never printed.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys

import pytest

from qserve.config import Config
from qserve.server.startup import DATA_LOCK_NAME, StartupError, prepare

from ..helpers.process import ServerProcess
from ..helpers.sdk import client


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `qserve serve` expecting it to refuse to start (bounded in time)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")}
    return subprocess.run([sys.executable, "-m", "qserve", "serve", "--host", "127.0.0.1", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str, status: int = 1) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == status, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qserve: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and "listening" not in proc.stderr


def test_second_server_on_the_same_data_is_refused_and_the_first_loses_nothing(fresh_server, service):
    """The data loss this guards against: two servers on one directory handed out the same indexes
    and a restart kept only one server's entries."""
    fresh_server.start()
    q = client(fresh_server, service)
    acked = [q.put(f"a{i}".encode())[0] for i in range(3)]
    second = serve("--port", "0", "--data-dir", str(fresh_server.data_dir), "--token", "test-token")
    assert_one_line(second, f"data directory {fresh_server.data_dir} is in use by process "
                            f"{fresh_server.proc.pid}")
    acked += [q.put(f"a{i}".encode())[0] for i in range(3, 6)]
    assert acked == [str(i) for i in range(1, 7)]      # no index handed out twice
    assert fresh_server.stop() == 0
    fresh_server.start()
    q = client(fresh_server, service)
    got = [(df.index, df.data) for df in q.get(index=1, length=10, auto_delete=False, timeout="0s")]
    assert got == [(i, f"a{i - 1}".encode()) for i in range(1, 7)]


def test_a_sigkilled_server_leaves_no_stale_lock(fresh_server, service):
    fresh_server.start()
    client(fresh_server, service).put(b"x")
    dead = fresh_server.proc.pid
    fresh_server.kill()
    assert (fresh_server.data_dir / DATA_LOCK_NAME).read_text().strip() == str(dead)
    fresh_server.start()                                  # would be refused if the lock were stale
    assert client(fresh_server, service).attributes()["stream.length"] == "1"


def test_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = serve("--port", str(port), "--data-dir", str(tmp_path / "d"))
    assert_one_line(proc, f"cannot listen on 127.0.0.1:{port}: address already in use")


def test_address_not_available(tmp_path):
    # 192.0.2.1 is TEST-NET-1 (documentation only): no interface here has it, so bind() fails
    # locally; nothing is sent anywhere
    proc = serve("--host", "192.0.2.1", "--insecure", "--port", "0", "--data-dir", str(tmp_path / "d"))
    assert_one_line(proc, "cannot listen on 192.0.2.1:0: address not available on this machine")


def test_the_lock_is_released_when_binding_fails(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        serve("--port", str(busy.getsockname()[1]), "--data-dir", str(tmp_path))
    srv = ServerProcess(tmp_path).start()                # the same data directory is free again
    assert srv.stop() == 0


@pytest.mark.parametrize("layout", ["file", "under-a-file"])
def test_data_directory_that_is_a_file(tmp_path, layout):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    if layout == "file":
        assert_one_line(serve("--port", "0", "--data-dir", str(afile)),
                        f"data directory {afile} is not a directory")
    else:
        assert_one_line(serve("--port", "0", "--data-dir", str(afile / "data")),
                        f"cannot create data directory {afile / 'data'}: Not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses directory permissions")
def test_data_directory_without_permissions(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line(serve("--port", "0", "--data-dir", str(locked)), "not readable and writable")


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [\n")
    assert_one_line(serve("--config", str(bad), "--data-dir", str(tmp_path / "d")),
                    f"config file {bad}:", status=2)


def test_unknown_setting_in_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 8080\n")
    assert_one_line(serve("--config", str(bad), "--data-dir", str(tmp_path / "d")),
                    "unknown setting 'prot'", status=2)


def test_version():
    proc = subprocess.run([sys.executable, "-m", "qserve", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("qserve ") and proc.stdout.count("\n") == 1


def test_interrupted_refusal_leaves_data_untouched(tmp_path):
    """A refused second server writes nothing into the data directory it was refused."""
    srv = ServerProcess(tmp_path).start()
    try:
        before = sorted(p.name for p in tmp_path.iterdir())
        serve("--port", "0", "--data-dir", str(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(20)


# -- the Redis backend's settings -------------------------------------------------------------

def test_help_lists_the_redis_settings():
    proc = subprocess.run([sys.executable, "-m", "qserve", "serve", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stdout.split())   # argparse wraps the help to the terminal's width
    for flag in ("--backend URL", "--redis-wait N", "--redis-wait-timeout SECONDS", "--node-lease SECONDS"):
        assert flag in flat, flag
    assert "redis://[user:password@]host:port[/db] or rediss://...; default: the local segment log in " \
           "--data-dir" in flat


@pytest.mark.parametrize("url,needle", [
    ("http://x", "backend: expected redis://"),
    ("redis://host:notaport", "backend: port 'notaport' is not a number from 1 to 65535"),
])
def test_a_bad_backend_url_is_one_line(tmp_path, url, needle):
    data = tmp_path / "d"
    assert_one_line(serve("--port", "0", "--data-dir", str(data), "--backend", url), needle, status=2)
    assert not data.exists()                                  # refused before anything was touched


def test_a_bad_backend_url_does_not_show_its_password(tmp_path):
    proc = serve("--port", "0", "--data-dir", str(tmp_path / "d"),
                 "--backend", "redis://admin:s3cret@cache:6379/zero")
    assert_one_line(proc, "backend: database 'zero'", "redis://admin:***@cache:6379/zero", status=2)
    assert "s3cret" not in proc.stderr + proc.stdout


def test_a_redis_backend_neither_creates_nor_locks_the_data_directory(tmp_path):
    """Redis nodes share one Redis by design: the data directory's lock (one server per segment
    log) must not stop a second node, and a directory that does not exist is not created."""
    missing = tmp_path / "never-made"
    config = Config(port=0, data_dir=missing, backend="redis://127.0.0.1:6379")
    first, second = prepare(config), prepare(config)
    try:
        assert first.lock is None and second.lock is None
        assert not missing.exists()
        assert first.sockets and second.sockets
    finally:
        first.close()
        second.close()
    local = prepare(dataclasses.replace(config, backend=""))     # the local backend still claims it
    try:
        assert (missing / DATA_LOCK_NAME).exists()
        with pytest.raises(StartupError, match="is in use by process"):
            prepare(dataclasses.replace(config, backend=""))
    finally:
        local.close()


def test_an_unreachable_redis_is_one_line(tmp_path):
    """Nothing listens on the port (a socket is bound there but not listening, so no other
    process can take it meanwhile and every connection is refused): one line naming Redis as
    unreachable, no traceback, no password, no data directory."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        proc = serve("--port", "0", "--data-dir", str(tmp_path / "d"),
                     "--backend", f"redis://admin:s3cret@127.0.0.1:{port}")
    assert_one_line(proc, "redis", f"127.0.0.1:{port}", "unreachable")
    assert "s3cret" not in proc.stderr + proc.stdout
    assert not (tmp_path / "d").exists()


def test_two_redis_nodes_share_one_data_dir_setting_and_never_show_the_password(redis_url, tmp_path, service):
    """What the data directory's lock refuses for the local backend is the point of Redis: two
    nodes given the same --data-dir both start (it is neither created nor locked) and serve the
    same queue; their logs name Redis without the password (Redis's default user takes any)."""
    url = redis_url.replace("redis://", "redis://default:s3cret@", 1)
    data = tmp_path / "shared"
    nodes = [ServerProcess(data, "--backend", url) for _ in range(2)]
    try:
        for node in nodes:
            node.start()
        assert client(nodes[0], service).put(b"from a")[0] == "1"
        got = client(nodes[1], service).get(index=1, length=1, auto_delete=False, timeout="0s")
        assert [(df.index, df.data) for df in got] == [(1, b"from a")]
        assert not data.exists()
    finally:
        statuses = [node.stop() for node in nodes if node.proc is not None]
    assert statuses == [0, 0]
    lines = [line for node in nodes for line in node.lines]
    assert sum("listening on" in line and "redis" in line for line in lines) == 2, lines
    assert not any("s3cret" in line or "Traceback" in line for line in lines), lines
