"""The servers under test for `qserve chaos`: `python -m qserve serve` children killed and restarted.

Strategy: each server (the one local server, or each node on Redis) gets one fixed loopback port,
picked once, so the clients' URLs stay valid across restarts (they simply reconnect). The child's stderr is pumped by a daemon thread into a bounded list of
lines, which also tells when the server is listening; the trio side only polls that flag, so a
start stays cancellable. `verify_data_dir` runs `qserve log verify`'s checks (`tools.logtool.scan`) on
the data directory, read-only, while the server is down.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import trio

from ..logtool.scan import UsageError, find_queues, verify_queue

__all__ = ["ChaosServer", "ServerStartError", "verify_data_dir", "free_port", "segment_files"]

_REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    """The server exited or did not listen in time. The message is one line (the server's last
    log line says why); ``log`` holds the tail of its log."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


class ChaosServer:
    """A qserve child process on ``127.0.0.1:port``, started with ``qserve serve`` and ``options``
    (its storage: ``--data-dir ...`` or ``--backend ...``). Used from one trio task.

    Attributes:
        name: what messages call it ("the server", "node 2").
        starts: how many times it was started; ``kills``: SIGKILLs sent to a running server.
    """

    def __init__(self, *, port: int, token: str, options: tuple[str, ...], name: str = "the server") -> None:
        self.port = port
        self.token = token
        self.options = tuple(options)
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.starts = 0
        self.kills = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        return [sys.executable, "-m", "qserve", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--token", self.token, *self.options]

    async def start(self, timeout: float = 30.0) -> float:
        """Start the server and wait until it listens. Returns the seconds it took.

        Raises:
            ServerStartError: it exited or did not listen within ``timeout``.
        """
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
        began = time.monotonic()
        proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=_REPO)
        self.proc = proc
        self.starts += 1
        listening = threading.Event()
        lines = self.lines
        lines.append(f"--- start {self.starts} (pid {proc.pid})")

        pump_done = threading.Event()

        def pump() -> None:
            for line in proc.stderr:
                lines.append(line.rstrip("\n"))
                if "listening on http://" in line:
                    listening.set()
            proc.stderr.close()
            pump_done.set()

        threading.Thread(target=pump, name=f"chaos-log-{self.port}", daemon=True).start()
        deadline = began + timeout
        while not listening.is_set():
            if proc.poll() is not None or time.monotonic() > deadline:
                exited = proc.poll() is not None
                self.kill()
                await trio.to_thread.run_sync(pump_done.wait, 2.0)    # its last lines say why
                why = (f"exited with status {proc.returncode}" if exited
                       else f"did not listen within {timeout:g}s")
                raise ServerStartError(f"{self.name} on port {self.port} {why}: {self.last_line()}",
                                       self.log_tail())
            await trio.sleep(0.01)
        return time.monotonic() - began

    def kill(self) -> bool:
        """SIGKILL the server if it runs and reap it. Returns whether it was running."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.kills += 1
        return True

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (the graceful path) and wait; SIGKILL after ``timeout``. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await trio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(list(self.lines)[-n:])

    def last_line(self) -> str:
        """The server's last log line of its latest start, or ``(no output)``."""
        for line in reversed(self.lines):
            if line.startswith("--- start "):
                break
            if line.strip():
                return line.strip()
        return "(no output)"


def segment_files(data_dir: Path) -> frozenset[str]:
    """Every segment-like file (``*.seg``, ``*.seg.tmp``) below ``data_dir``: a change means a roll or a
    compaction is under way."""
    out = []
    for dirpath, _dirs, files in os.walk(data_dir):
        out.extend(os.path.join(dirpath, f) for f in files if f.endswith((".seg", ".seg.tmp")))
    return frozenset(out)


def verify_data_dir(data_dir: Path, *, allow_torn_tail: bool) -> tuple[list[str], int]:
    """`qserve log verify` over every queue below ``data_dir`` (the server must be down).

    Returns ``(problems, torn)``: one line per damage, and how many torn tails of an active segment
    were tolerated (``allow_torn_tail``: right after a SIGKILL, where open truncates them).
    """
    try:
        queues = find_queues(str(data_dir), allow_file=False)
    except UsageError:          # no queue created yet
        return [], 0
    problems, torn = [], 0
    for queue in queues:
        res = verify_queue(queue)
        for p in res.problems:
            if allow_torn_tail and p.reason.startswith("torn tail:"):
                torn += 1
            else:
                problems.append(str(p))
    return problems, torn
