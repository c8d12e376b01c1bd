"""The one-file distribution: `python -m tools.build_pyz` (run from the repository root, as the
README says) builds a shiv zipapp, and a Python with nothing installed runs `serve` from it.

"Nothing installed": the venv's base interpreter with ``-I -S`` (no site-packages at all, not even
the base interpreter's own, which may hold some of our dependencies), an environment of only PATH,
HOME and SHIV_ROOT (both in the test's directory), and a fresh working directory; the test first
checks that qserve and its dependencies cannot be imported there.
"""

from __future__ import annotations

import http.client
import os
import re
import select
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)   # the interpreter under the venv
PLAIN = [BASE_PYTHON, "-I", "-S"]
# the server's line; with --processes N, the supervisor's, once every process listens
_LISTEN = {1: re.compile(rb"qserve: qserve listening on http://127\.0\.0\.1:(\d+)"),
           2: re.compile(rb"qserve.supervisor: qserve listening on http://127\.0\.0\.1:(\d+) \(2 processes")}
TOKEN = "pyz-token"


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("dist") / "qserve.pyz"
    proc = subprocess.run([sys.executable, "-m", "tools.build_pyz", "--output", str(output)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert (f"for CPython {sys.version_info.major}.{sys.version_info.minor} on {sysconfig.get_platform()}"
            in proc.stdout), proc.stdout
    assert output.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    return output


@pytest.fixture
def machine(tmp_path) -> dict:
    """A bare machine's environment and working directory (HOME and SHIV_ROOT under tmp_path)."""
    for name in ("home", "shiv", "cwd"):
        (tmp_path / name).mkdir()
    env = {"PATH": os.defpath, "HOME": str(tmp_path / "home"), "SHIV_ROOT": str(tmp_path / "shiv")}
    return {"env": env, "cwd": tmp_path / "cwd"}


def test_the_plain_python_has_none_of_the_dependencies(machine):
    code = ("import importlib.util; print([m for m in ('qserve', 'trio', 'h11', 'trio_websocket', 'msgpack', "
            "'coredis', 'prometheus_client', 'shtab') if importlib.util.find_spec(m)])")
    proc = subprocess.run([*PLAIN, "-c", code], capture_output=True, text=True, timeout=60, **machine)
    assert (proc.returncode, proc.stdout.strip()) == (0, "[]"), proc.stderr


def _wait_listening(proc: subprocess.Popen, line: re.Pattern, timeout: float) -> int:
    """The port from the 'listening on' ``line`` (waits on the server's stderr, bounded)."""
    seen, deadline, fd = b"", time.monotonic() + timeout, proc.stderr.fileno()
    while (m := line.search(seen)) is None:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no listening line within {timeout} s:\n{seen.decode()}"
        chunk = os.read(fd, 65536)
        assert chunk, f"the server ended before listening (status {proc.wait(10)}):\n{seen.decode()}"
        seen += chunk
    return int(m.group(1))


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Authorization": TOKEN})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


@pytest.mark.parametrize("backend, processes", [("local", 1), ("redis", 2)])
def test_a_plain_python_serves_from_the_file(pyz, machine, tmp_path, request, backend, processes):
    # on Redis (coredis's compiled modules) with --processes 2: the supervisor starts `python -m
    # qserve` children, which find qserve through the PYTHONPATH the file's bootstrap extends
    data = tmp_path / "data"
    backend_args = ["--backend", request.getfixturevalue("redis_url")] if backend == "redis" else []
    proc = subprocess.Popen([*PLAIN, str(pyz), "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir",
                             str(data), "--token", TOKEN, "--processes", str(processes), *backend_args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **machine)
    try:
        port = _wait_listening(proc, _LISTEN[processes], timeout=60)
        assert _request(port, "POST", "/api/predict/pyz", b"one file") == (200, b"1")
        status, body = _request(port, "GET", "/api/predict/pyz?_index_=1&_auto_delete_=false&_timeout_=0s")
        assert (status, body) == (200, b"one file")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    # unpacked once into SHIV_ROOT, nothing into HOME or the working directory
    assert [p.name.split("_")[0] for p in Path(machine["env"]["SHIV_ROOT"]).glob("qserve.pyz_*")] == ["qserve.pyz"]
    assert list(Path(machine["env"]["HOME"]).iterdir()) == [] == list(machine["cwd"].iterdir())


def test_a_python_that_cannot_load_the_compiled_modules_is_refused_in_one_line(tmp_path):
    # the preamble as shiv's runtime runs it, on a site-packages holding a module for another ABI
    site = tmp_path / "site-packages"
    (site / "fastpkg").mkdir(parents=True)
    (site / "fastpkg" / "_speed.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")
    (site / "fastpkg.libs").mkdir()
    (site / "fastpkg.libs" / "libvendored-1a2b.so").write_bytes(b"")   # a shared library, not a module
    preamble = REPO / "tools" / "build_pyz" / "preamble.py"
    code = (f"import runpy; runpy.run_path({str(preamble)!r}, init_globals={{'site_packages': {str(site)!r}}}, "
            "run_name='__main__')")
    proc = subprocess.run([*PLAIN, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("qserve.pyz: its compiled modules are for cpython-39-x86_64-linux-gnu "
                                  "(fastpkg/_speed.cpython-39-x86_64-linux-gnu.so), which Python ")
    assert "python -m tools.build_pyz" in proc.stderr
    # and the same preamble lets a site-packages of this Python's own modules through
    (site / "fastpkg" / "_speed.cpython-39-x86_64-linux-gnu.so").unlink()
    (site / "fastpkg" / f"_speed{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"")
    proc = subprocess.run([*PLAIN, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
