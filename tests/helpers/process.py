"""A real `qserve serve` child process on loopback (`ServerProcess`), for the process tests, the
shared `server` fixture and the tools' live tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

_LISTEN = re.compile(r"listening on http://\[?([0-9a-f.:]+)\]?:(\d+)")

# every server started since the current test's setup began: when the test fails, conftest adds
# each one's log to the report (a node that died mid-test says why there)
started_in_test: list["ServerProcess"] = []


def backend_args(url: str | None) -> list[str]:
    """The `qserve serve` flags that put a `ServerProcess` on the backend at ``url`` (the
    `backend_url` fixture): ``--backend URL`` for Redis, none for the local segment log."""
    return ["--backend", url] if url else []


class ServerProcess:
    """A `python -m qserve serve` child process on 127.0.0.1 with an ephemeral port.

    The log is collected in `self.lines`; `start()` waits (bounded) for the listening line,
    `wait_line()` for any other.
    """

    def __init__(self, data_dir: Path, *extra: str, token: str | None = "test-token") -> None:
        self.data_dir = data_dir
        self.token = token
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.lines: list[str] = []
        self.killed = False
        self._more = threading.Condition()   # notified for each line, and at the end of the output
        self._ended = False

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        args = [sys.executable, "-m", "qserve", "serve", "--host", "127.0.0.1", "--port", "0",
                "--data-dir", str(self.data_dir), *self.extra]
        if self.token:
            args += ["--token", self.token]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")}
        self.killed = False   # by `kill` (SIGKILL from the test), rather than exited on its own
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        started_in_test.append(self)
        found = threading.Event()
        self._ended = False

        def pump():
            for line in self.proc.stderr:
                with self._more:
                    self.lines.append(line.rstrip("\n"))
                    self._more.notify_all()
                m = _LISTEN.search(line)
                if m and not found.is_set():
                    self.port = int(m.group(2))
                    found.set()
            with self._more:
                self._ended = True
                self._more.notify_all()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout) or self.port is None:
            self.kill()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))
        return self

    def wait_line(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list[re.Match]:
        """The first ``count`` matches of ``pattern`` in the log, once there are that many (waits
        on the reader thread's notifications, bounded; fails if the output ends first)."""
        regex = re.compile(pattern)

        def matches() -> list[re.Match]:
            return [m for m in map(regex.search, self.lines) if m][:count]

        with self._more:
            if not self._more.wait_for(lambda: len(matches()) >= count or self._ended, timeout):
                raise AssertionError(f"no {count} lines matching {pattern!r} within {timeout} s:\n"
                                     + "\n".join(self.lines))
            found = matches()
        if len(found) < count:
            raise AssertionError(f"the server's output ended before {count} lines matching {pattern!r}:\n"
                                 + "\n".join(self.lines))
        return found

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.killed = True
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: the graceful path. Returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.drained()
        return status

    def drained(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until the reader thread has taken the exited process's last log line:
        `lines` is complete then (the reader may lag behind the exit)."""
        with self._more:
            self._more.wait_for(lambda: self._ended, timeout)

    def restart(self) -> "ServerProcess":
        self.kill()
        self.port = None
        return self.start()
