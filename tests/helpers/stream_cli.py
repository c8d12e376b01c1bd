"""Running `qserve stream` as a subprocess against a real server, and reading its output as it comes.

`make_cli(tmp_path, url, token)` returns a runner with a config directory of its own; `LinePump`
collects a child's stdout or stderr lines in a thread so a test can wait (bounded) for a line
instead of sleeping; `wait_until` polls a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import queue as queue_mod
import re
import subprocess
import sys
import threading
import time

TIMEOUT = 30


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qserve", "stream", *args]


def make_cli(tmp_path, url: str, token: str | None):
    """A runner of `qserve stream ARGS` configured for the queue at `url`.

    ``run(*args, input=..., check=status)`` runs one command; ``run.many([(args, input), ...])``
    runs independent commands at once (each one pays the interpreter's start-up);
    ``run.popen(*args)`` starts one with pipes (the caller stops it by its pid).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")}
    env["QSERVE_CONFIG_DIR"] = str(tmp_path / "cfg")

    def run(*args: str, input: str | None = "", check: int | None = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run(command(*args), input=input, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        if check is not None:
            assert proc.returncode == check, (proc.stdout, proc.stderr)
        return proc

    def many(commands: list[tuple[tuple[str, ...], str]]) -> list[subprocess.CompletedProcess]:
        procs = [subprocess.Popen(command(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, text=True) for args, _ in commands]
        done = []
        try:
            for proc, (args, input) in zip(procs, commands):
                out, err = proc.communicate(input, timeout=TIMEOUT)
                done.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
        finally:
            for proc in procs:
                proc.kill()
        return done

    def popen(*args: str) -> subprocess.Popen:
        # SIGINT back to its default in the child: Python then turns it into KeyboardInterrupt
        import signal
        return subprocess.Popen(command(*args), env=env, text=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    run.many, run.popen, run.url, run.env = many, popen, url, env
    run.config = tmp_path / "cfg" / "stream.json"
    run.config.parent.mkdir(exist_ok=True)
    run.config.write_text(json.dumps({"url": url, "token": token}))
    return run


class LinePump:
    """Every line of a text pipe, read by a daemon thread into a bounded-by-the-child queue."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._queue: queue_mod.Queue[str | None] = queue_mod.Queue()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """The first new line matching `pattern` (re.search); fails at the deadline or end of output."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(remaining, 0))
            except queue_mod.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s: {self.lines}") from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"output ended without {pattern!r}: {self.lines}")
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def rest(self, timeout: float = TIMEOUT) -> list[str]:
        """The remaining lines once the pipe closes (the child has exited)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the pipe did not close"
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        self._queue.put(None)
        return self.lines


def wait_until(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Poll `predicate()` (each call is a request to a real server: it paces the loop) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
